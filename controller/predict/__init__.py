"""The Prediction Engine as the controller runs it: quantile forecasts of every workload's CPU, memory
and I/O, served with onnxruntime and numpy alone.

- `features`: pure numpy feature building (serving, training and the backtest share it)
- `model`: loading and checking a model file; `fallback`: the statistical forecaster used without one
- `series`: the store's telemetry as series on the model's step grid
- `engine`: `PredictionEngine`, one batched forecast per control-loop cycle
- `allocation`: the pure function from a quantile curve to a shadow allocation
- `champion`: whether a newly trained model may replace the running one

Training, the backtest and its baselines are the `training` package (`shadowctl train|backtest` only).
See docs/prediction.md.
"""
