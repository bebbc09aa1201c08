"""What only `shadowctl train` and `shadowctl backtest` run: never imported by the daemons.

- `net`, `train`, `export`: the numpy-trained network and its ONNX file (with metadata); needs `onnx`
- `traces`, `synthetic`: the series it learns from (CSV traces, generated shapes)
- `event_weights`: failovers and forecast misses as training weights
- `backtest`, `baselines`, `scores`: replaying a trace against today's recommenders, and scoring it

The controller serves models with `controller.predict` (features, model, fallback, engine, allocation),
which this package builds on; see docs/prediction.md.
"""
