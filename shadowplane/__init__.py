"""Shadowplane: predictive shadow failover for bare-metal Linux fleets (shared code and the generated API)."""

__version__ = "0.1.0"
