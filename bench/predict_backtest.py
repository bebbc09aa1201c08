"""The backtest table: every NAB trace, scored by a model that never saw it (leave-one-out).

For each trace, a model is trained exactly like the packaged default (`shadowctl train` defaults: the other
traces plus the synthetic series) but without that trace, written to an ONNX file, loaded back through
onnxruntime, and replayed on the trace at lead 1 next to the seed rule, VPA-style and Autopilot-style
recommenders. Prints one row per trace and the median; a trace passes when coverage >= 0.99 and slack <=
0.6 x VPA-style's slack.

    .venv/bin/python bench/predict_backtest.py [--traces DIR] [--lead N] [--fallback]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from controller.predict.fallback import StatisticalForecaster
from controller.predict.model import load_model
from training.backtest import BacktestReport, run_backtest
from training.synthetic import synthetic_traces
from training.traces import load_trace_dir
from training.train import series_from_trace, train_model, weight_by_events

ROOT = Path(__file__).resolve().parents[1]
TARGET_COVERAGE, TARGET_RATIO = 0.99, 0.6


def values_of(r: BacktestReport, fb: BacktestReport | None) -> dict[str, float]:
    p, vpa = r.project.scores, r.result("VPA-style").scores
    seed, ap = r.result("seed rule").scores, r.result("Autopilot-style").scores
    q = list(r.quantiles)
    v = {
        "cov": p.coverage,
        "slack": p.slack,
        "short": p.shortfall,
        "chg": p.changes_per_day,
        "vpa_cov": vpa.coverage,
        "vpa_slack": vpa.slack,
        "ratio": r.slack_vs(),
        "seed_cov": seed.coverage,
        "seed_slack": seed.slack,
        "ap_cov": ap.coverage,
        "ap_slack": ap.slack,
        "ap_chg": ap.changes_per_day,
        "pin50": r.forecast.pinball[q.index(0.5)],
        "pin99": r.forecast.pinball[q.index(0.99)],
        "mase": r.forecast.mase,
    }
    if fb is not None:
        v["fb_cov"] = fb.project.scores.coverage
        v["fb_ratio"] = fb.slack_vs()
    return v


def passes(v: dict[str, float]) -> bool:
    return v["cov"] >= TARGET_COVERAGE and v["ratio"] <= TARGET_RATIO


def line(name: str, v: dict[str, float], mark: bool = True) -> str:
    cols = [
        f"{name[:34]:<34}",
        f"{v['cov']:>6.4f} {v['slack']:>6.3f} {v['short']:>6.4f} {v['chg']:>5.1f} |",
        f"{v['vpa_cov']:>6.4f} {v['vpa_slack']:>6.3f} {v['ratio']:>6.2f} |",
        f"{v['seed_cov']:>6.4f} {v['seed_slack']:>6.3f} |",
        f"{v['ap_cov']:>6.4f} {v['ap_slack']:>6.2f} {v['ap_chg']:>4.1f} |",
        f"{v['pin50']:>6.4f} {v['pin99']:>6.4f} {v['mase']:>5.2f}",
    ]
    if "fb_cov" in v:
        cols.append(f"| {v['fb_cov']:>6.4f} {v['fb_ratio']:>6.2f}")
    if mark and passes(v):
        cols.append(" pass")
    return " ".join(cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=ROOT.parent / "shared" / "traces" / "nab")
    ap.add_argument("--lead", type=int, default=1)
    ap.add_argument("--fallback", action="store_true", help="also score the statistical fallback")
    args = ap.parse_args()
    traces = load_trace_dir(args.traces)
    synthetic = [series_from_trace(t) for t in synthetic_traces(24, seed=0)]
    print(
        f"leave-one-out over {len(traces)} traces in {args.traces}, lead {args.lead}; each model: the other "
        f"{len(traces) - 1} traces + {len(synthetic)} synthetic series, `shadowctl train` defaults"
    )
    print()
    head = " ".join(
        [
            f"{'trace':<34}",
            f"{'------- shadowplane -------':<28}",
            f"{'---- VPA-style -----':<22}",
            f"{'seed rule':<15}",
            f"{'Autopilot-style':<20}",
            f"{'forecast':<19}",
        ]
    )
    sub = " ".join(
        [
            f"{'':<34}",
            f"{'cov':>6} {'slack':>6} {'short':>6} {'chg/d':>5} |",
            f"{'cov':>6} {'slack':>6} {'ratio':>6} |",
            f"{'cov':>6} {'slack':>6} |",
            f"{'cov':>6} {'slack':>6} {'chg':>4} |",
            f"{'pin50':>6} {'pin99':>6} {'MASE':>5}",
        ]
    )
    if args.fallback:
        head += " fallback"
        sub += f" | {'cov':>6} {'ratio':>6}"
    print(head)
    print(sub)
    values = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for i, trace in enumerate(traces):
            others = [series_from_trace(t) for j, t in enumerate(traces) if j != i]
            # as `shadowctl train` does without a running model: the fallback's bad misses weigh double
            others, _ = weight_by_events(others, [], StatisticalForecaster())
            model = train_model(others + synthetic, f"leave-one-out without {trace.name}")
            path = Path(tmp) / f"without_{trace.name}.onnx"
            model.save(path)
            served = load_model(path)
            assert trace.name not in served.info.training_data["series"]
            report = run_backtest(trace, served, args.lead)
            fb = run_backtest(trace, StatisticalForecaster(), args.lead) if args.fallback else None
            v = values_of(report, fb)
            print(line(trace.name, v), flush=True)
            values.append(v)
    med = {k: statistics.median(v[k] for v in values) for k in values[0]}
    print()
    print(line("median", med, mark=False))
    passed = sum(1 for v in values if passes(v))
    print()
    print(
        f"target (median over held-out traces): coverage >= {TARGET_COVERAGE} -> {med['cov']:.4f} "
        f"({'met' if med['cov'] >= TARGET_COVERAGE else 'NOT met'}); slack <= {TARGET_RATIO} x VPA-style -> "
        f"{med['ratio']:.2f} x ({'met' if med['ratio'] <= TARGET_RATIO else 'NOT met'})"
    )
    print(f"traces meeting both: {passed} of {len(values)}; total time {time.monotonic() - t_start:.0f} s")
    print("columns: cov = share of scored steps with allocation >= usage; slack and short(fall) relative to")
    print("total demand; chg/d = limit changes per day; ratio = slack / VPA-style slack; pin50/pin99 =")
    print("pinball loss of the P50/P99 forecast / mean usage; MASE = P50 error / seasonal-naive error.")
    if any(math.isinf(v["ratio"]) for v in values):
        print("ratio inf: VPA-style had no slack on that trace")


if __name__ == "__main__":
    main()
