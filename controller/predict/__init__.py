"""The Prediction Engine: quantile forecasts of every workload's CPU, memory and I/O, served with onnxruntime.

- `features`: pure numpy feature building (training, serving and backtest share it)
- `net`, `train`, `export`: the numpy-trained network and its ONNX file (with metadata)
- `model`: loading and checking a model file; `fallback`: the statistical forecaster used without one
- `engine`: `PredictionEngine`, one batched forecast per control-loop cycle
- `allocation`: the pure function from a quantile curve to a shadow allocation
- `events`: event-weighted training windows and the champion/challenger decision
- `baselines`, `metrics`, `backtest`, `traces`: the proof against today's recommenders

See docs/prediction.md.
"""
