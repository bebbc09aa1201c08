"""Packaged model files (a package only so that setuptools ships `default.onnx`)."""
