"""`shadowctl train` and `shadowctl backtest`: the Prediction Engine's offline tools.

Both run locally (no controller needed). Bad input gets one line naming the problem and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from controller.config import ScalingConfig, load_controller_config
from controller.predict.champion import decide_champion, recent_loss
from controller.predict.fallback import StatisticalForecaster
from controller.predict.model import DEFAULT_MODEL, Forecaster, ModelError, load_model
from controller.predict.series import Series, series_from_store
from shadowplane.config import ConfigError
from training import train as tr
from training.backtest import BacktestError, format_report, run_backtest, write_alloc_csv
from training.event_weights import Event, load_events
from training.net import TrainSettings
from training.synthetic import synthetic_traces
from training.traces import TraceError, load_trace, load_trace_dir

log = logging.getLogger(__name__)
USAGE_ERROR = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train a prediction model (ONNX) from trace CSVs or the controller's store",
        description="Train the quantile forecaster and write it as an ONNX model with its metadata. If a "
        "model already exists at --out (or --champion is given), the new one replaces it only if it beats it "
        "on the most recent data (champion/challenger).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--traces", type=Path, metavar="DIR", help="directory of CSV traces (timestamp,value)")
    src.add_argument("--store", type=Path, metavar="PATH", help="the controller's SQLite store")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL.onnx", help="where to write the model")
    p.add_argument(
        "--since-hours", type=float, default=168.0, help="--store: how much history to use (0: all of it)"
    )
    p.add_argument("--step-seconds", type=int, default=300, help="--store: resample to this step")
    p.add_argument(
        "--exclude", action="append", default=[], metavar="NAME", help="leave this trace out (repeatable)"
    )
    p.add_argument(
        "--synthetic", type=int, default=24, metavar="N", help="add N synthetic series (see docs; 0: none)"
    )
    p.add_argument("--events", type=Path, metavar="FILE", help="JSON list of failover events to weight")
    p.add_argument("--champion", type=Path, metavar="MODEL.onnx", help="the running model (default: --out)")
    p.add_argument(
        "--holdout-hours",
        type=float,
        default=24.0,
        help="the recent data champion and challenger are scored on",
    )
    p.add_argument(
        "--min-improvement", type=float, default=0.01, help="relative loss gain a challenger needs to replace"
    )
    p.add_argument("--force", action="store_true", help="write the new model without comparing")
    p.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    p.add_argument("--hidden", type=int, default=TrainSettings.hidden)
    p.add_argument("--seed", type=int, default=TrainSettings.seed)
    p.set_defaults(func=train_cmd)

    p = sub.add_parser(
        "backtest",
        help="replay a trace through the controller's scaling step vs the seed rule, VPA and Autopilot",
        description="At each step, decide the shadow's limit from data up to --lead steps earlier exactly as "
        "the controller's scaling loop does with its configuration (--config; default: the controller's "
        "defaults): forecast, calibration on the limit in force, target, seed rule, floors, ceilings, "
        "memory's guard. Print coverage, shortfall, slack, limit changes per day (and for memory the steps "
        "with the limit below usage) for the project and the baselines, and the forecast's pinball loss and "
        "MASE. The first day is warm-up and is not scored.",
    )
    p.add_argument("--trace", type=Path, required=True, metavar="FILE.csv", help="CSV timestamp,value")
    p.add_argument(
        "--config",
        type=Path,
        metavar="controller.toml",
        help="the controller's configuration: its [scaling] table is replayed (default: its defaults)",
    )
    p.add_argument(
        "--model", type=Path, metavar="MODEL.onnx", help="default: --config's scaling.model, or the packaged"
    )
    p.add_argument("--fallback", action="store_true", help="use the statistical fallback instead of a model")
    p.add_argument(
        "--lead", type=int, default=1, metavar="STEPS", help="decide from data this many steps old"
    )
    p.add_argument("--out", type=Path, required=True, metavar="alloc.csv", help="per-step allocation CSV")
    p.add_argument(
        "--resource", choices=("cpu", "memory"), default="cpu", help="what the trace measures (default cpu)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply the trace's values by F to get cores (cpu) or bytes (memory), e.g. 0.01 for percent "
        "of a core; the configured floors and ceilings are in those units",
    )
    p.add_argument(
        "--host-capacity",
        type=float,
        default=0.0,
        metavar="N",
        help="the shadow host's cores or bytes: the ceiling never exceeds it (default 0: unbounded)",
    )
    p.set_defaults(func=backtest_cmd)


def _fail(msg: str) -> int:
    print(f"shadowctl: {msg}", file=sys.stderr)
    return USAGE_ERROR


def backtest_cmd(args: argparse.Namespace) -> int:
    if args.lead < 1:
        return _fail(f"--lead must be >= 1, got {args.lead}")
    if not (args.scale > 0 and math.isfinite(args.scale)):
        return _fail(f"--scale must be a positive number, got {args.scale}")
    if not (args.host_capacity >= 0 and math.isfinite(args.host_capacity)):
        return _fail(f"--host-capacity must be >= 0 (0: unbounded), got {args.host_capacity}")
    scaling = ScalingConfig()
    if args.config is not None:
        try:
            scaling = load_controller_config(args.config).scaling
        except (ConfigError, OSError) as e:
            return _fail(f"--config {args.config}: {e}")
    try:
        trace = load_trace(args.trace)
    except TraceError as e:
        return _fail(str(e))
    if args.scale != 1.0:
        trace = replace(trace, values=trace.values * args.scale)
    forecaster: Forecaster
    notes = []
    if args.fallback:
        forecaster = StatisticalForecaster()
    else:
        path = args.model or scaling.model or DEFAULT_MODEL
        try:
            model = load_model(path)
        except ModelError as e:
            return _fail(f"{e} (or pass --fallback to backtest the statistical forecaster)")
        forecaster = model
        if trace.name in model.info.training_data.get("series", []):
            notes.append(
                f"the model was trained on {trace.name}: these scores are in-sample; for a fair test train "
                f"with `shadowctl train --exclude {trace.name}`"
            )
        if model.info.step_seconds != trace.step_seconds:
            notes.append(
                f"the trace's step is {trace.step_seconds} s, the model was trained at "
                f"{model.info.step_seconds} s; features are in steps, so it still applies"
            )
    try:
        report = run_backtest(
            trace,
            forecaster,
            args.lead,
            scaling,
            resource=args.resource,
            host_capacity=args.host_capacity,
        )
    except BacktestError as e:
        return _fail(str(e))
    report.notes.extend(notes)
    try:
        write_alloc_csv(args.out, trace, report)
    except OSError as e:
        return _fail(f"{args.out}: cannot write: {e.strerror}")
    print(format_report(report))
    print(f"wrote {args.out} ({report.rows} rows)")
    return 0


def train_cmd(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.hidden < 1:
        return _fail("--epochs and --hidden must be >= 1")
    try:
        if args.traces is not None:
            traces = load_trace_dir(args.traces)
            unknown = set(args.exclude) - {t.name for t in traces}
            if unknown:
                return _fail(f"--exclude {', '.join(sorted(unknown))}: no such trace in {args.traces}")
            series = [tr.series_from_trace(t) for t in traces if t.name not in set(args.exclude)]
            source = f"traces {args.traces}"
        else:
            series, source = _store_series(args)
        if args.events:
            events: list[Event] = load_events(args.events)
        elif args.store is not None:
            events = _store_failovers(args.store)
        else:
            events = []
    except (TraceError, ValueError) as e:
        return _fail(str(e))
    if not series:
        return _fail("nothing to train on")

    champion_path = args.champion or (args.out if args.out.exists() else None)
    champion: Forecaster | None = None
    if champion_path is not None and not args.force:
        try:
            champion = load_model(champion_path)
        except ModelError as e:
            log.warning("champion unusable, the new model will not be compared: %s", e)
            print(f"champion {champion_path} unusable ({e}); the new model takes over")

    # Learn from events: the failovers given, plus wherever the running model (or the fallback) was badly
    # wrong on this data.
    judge: Forecaster = champion if champion is not None else StatisticalForecaster()
    series, events = tr.weight_by_events(series, events, judge)
    n_fail = sum(1 for e in events if e.kind == "failover")
    print(
        f"{len(series)} series from {source}; {n_fail} failover and {len(events) - n_fail} forecast-miss "
        "windows weighted"
    )

    settings = TrainSettings(epochs=args.epochs, hidden=args.hidden, seed=args.seed)
    train_series: list[Series] = series
    since: dict[str, float] = {}
    if champion is not None:
        train_series, since = tr.split_recent(series, args.holdout_hours * 3600)
    extra = [tr.series_from_trace(t) for t in synthetic_traces(args.synthetic, seed=args.seed)]
    if extra:
        source += f" + {len(extra)} synthetic series (seed {args.seed})"
    t0 = time.monotonic()
    try:
        model = tr.train_model(train_series + extra, source, settings=settings)
    except ValueError as e:
        return _fail(str(e))
    print(f"trained {model.version} in {time.monotonic() - t0:.1f} s (training loss {model.train_loss:.4f})")

    if champion is not None:
        decision = decide_champion(
            champion.name,
            recent_loss(champion, series, since),
            model.version,
            recent_loss(tr.NumpyForecaster(model), series, since),
            args.min_improvement,
        )
        log.info("champion/challenger: %s", decision.reason)
        print(decision.reason)
        if not decision.promote:
            rejected = args.out.with_name(args.out.stem + ".rejected.onnx")
            model.save(rejected)
            print(f"wrote the rejected challenger to {rejected}; {args.out} unchanged")
            return 0
    model.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _store_failovers(path: Path) -> list[Event]:
    """The failovers the controller recorded: their windows weigh more in training."""
    from controller.store.sqlite import SqliteStore
    from training.event_weights import failover_events_from_records

    store = SqliteStore(path)
    try:
        rows = [(e.kind, e.service, e.unix_ms, e.detail) for e in store.events(limit=100_000)]
        workloads = {(a.host, w.service): w.name for a in store.agents() for w in a.hello.workloads}
    finally:
        store.close()
    return failover_events_from_records(rows, workloads)


def _store_series(args: argparse.Namespace) -> tuple[list[Series], str]:
    from controller.store.sqlite import SqliteStore

    if not args.store.exists():
        raise ValueError(f"{args.store}: store file not found (the controller's [store] path)")
    store = SqliteStore(args.store)
    try:
        since_ms = int((time.time() - args.since_hours * 3600) * 1000) if args.since_hours > 0 else 0
        cols = store.resource_series(since_ms=since_ms)
    finally:
        store.close()
    window = f"last {args.since_hours:g} h" if args.since_hours > 0 else "all samples"
    if not cols:
        raise ValueError(f"{args.store}: no samples ({window})")
    series = series_from_store(cols, args.step_seconds)
    return series, f"store {args.store} ({window}, {args.step_seconds} s steps)"
