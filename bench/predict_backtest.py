"""The backtest table: every NAB trace, scored by a model that never saw it (leave-one-out), through the
controller's own scaling path with the controller's defaults.

For each trace, a model is trained exactly like the packaged default (`shadowctl train` defaults: the other
traces plus the synthetic series) but without that trace, written to an ONNX file, loaded back through
onnxruntime, and replayed on the trace at lead 1 by `training.backtest.run_backtest`: the scaling loop's
steps (forecast, calibration on the limit in force, target, seed rule, floors, ceilings, lower hold) with
`ScalingConfig()`'s defaults, printed below. Beside it: VPA-style as configured and scaled in hindsight to
the project's coverage (the fair comparison), the seed rule fed the last value, Autopilot-style, and the
hindsight bound (an oracle's limit with 7 changes a day: what no forecaster can beat under that budget).
A trace passes when coverage >= 0.99, slack <= 0.5 x VPA-style's at equal coverage and limit changes <= 7
a day.

    .venv/bin/python bench/predict_backtest.py [--traces DIR] [--lead N] [--fallback]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from controller.config import ScalingConfig
from controller.predict.fallback import StatisticalForecaster
from controller.predict.model import load_model
from training.backtest import HINDSIGHT, VPA_EQUAL, BacktestReport, run_backtest
from training.synthetic import synthetic_traces
from training.traces import load_trace_dir
from training.train import series_from_trace, train_model, weight_by_events

ROOT = Path(__file__).resolve().parents[1]
TARGET_COVERAGE, TARGET_RATIO, TARGET_CHANGES = 0.99, 0.5, 7.0


def values_of(r: BacktestReport, fb: BacktestReport | None) -> dict[str, float]:
    p, vpa = r.project.scores, r.result("VPA-style").scores
    eq, hs = r.result(VPA_EQUAL).scores, r.result(HINDSIGHT).scores
    seed, ap = r.result("seed rule").scores, r.result("Autopilot-style").scores
    q = list(r.quantiles)
    v = {
        "cov": p.coverage,
        "slack": p.slack,
        "chg": p.changes_per_day,
        "eq_slack": eq.slack,
        "ratio": r.slack_vs(),
        "vpa_cov": vpa.coverage,
        "vpa_ratio": r.slack_vs("VPA-style"),
        "hs_ratio": hs.slack / eq.slack if eq.slack > 0 else math.inf,
        "seed_cov": seed.coverage,
        "seed_slack": seed.slack,
        "ap_cov": ap.coverage,
        "ap_slack": ap.slack,
        "pin99": r.forecast.pinball[q.index(0.99)],
        "mase": r.forecast.mase,
    }
    if fb is not None:
        v["fb_cov"] = fb.project.scores.coverage
        v["fb_ratio"] = fb.slack_vs()
    return v


def passes(v: dict[str, float]) -> bool:
    return v["cov"] >= TARGET_COVERAGE and v["ratio"] <= TARGET_RATIO and v["chg"] <= TARGET_CHANGES


def line(name: str, v: dict[str, float], mark: bool = True) -> str:
    cols = [
        f"{name[:34]:<34}",
        f"{v['cov']:>6.4f} {v['slack']:>8.3g} {v['chg']:>5.1f} |",
        f"{v['eq_slack']:>8.3g} {v['ratio']:>6.2f} |",
        f"{v['vpa_cov']:>6.4f} {v['vpa_ratio']:>6.2f} |",
        f"{v['hs_ratio']:>6.2f} |",
        f"{v['seed_cov']:>6.4f} {v['seed_slack']:>8.3g} |",
        f"{v['ap_cov']:>6.4f} {v['ap_slack']:>8.3g} |",
        f"{v['pin99']:>6.4f} {v['mase']:>5.2f}",
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
    print(f"controller defaults replayed: {asdict(ScalingConfig())}")
    print()
    head = " ".join(
        [
            f"{'trace':<34}",
            f"{'---- shadowplane ------':<23}",
            f"{'VPA @ equal cov':<17}",
            f"{'VPA as config.':<15}",
            f"{'bound':<8}",
            f"{'seed rule':<17}",
            f"{'Autopilot':<17}",
            f"{'forecast':<12}",
        ]
    )
    sub = " ".join(
        [
            f"{'':<34}",
            f"{'cov':>6} {'slack':>8} {'chg/d':>5} |",
            f"{'slack':>8} {'RATIO':>6} |",
            f"{'cov':>6} {'ratio':>6} |",
            f"{'ratio':>6} |",
            f"{'cov':>6} {'slack':>8} |",
            f"{'cov':>6} {'slack':>8} |",
            f"{'pin99':>6} {'MASE':>5}",
        ]
    )
    if args.fallback:
        head += " fallback"
        sub += f" | {'cov':>6} {'RATIO':>6}"
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
    print(f"{'max':<34} {'':>6} {'':>6} {max(v['chg'] for v in values):>5.1f}")
    passed = sum(1 for v in values if passes(v))
    print()

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"targets (median over held-out traces): coverage >= {TARGET_COVERAGE} -> {med['cov']:.4f} "
        f"({met(med['cov'] >= TARGET_COVERAGE)}); slack <= {TARGET_RATIO} x VPA-style at equal coverage -> "
        f"{med['ratio']:.2f} x ({met(med['ratio'] <= TARGET_RATIO)}); limit changes <= {TARGET_CHANGES:g} a "
        f"day -> median {med['chg']:.1f}, max {max(v['chg'] for v in values):.1f} "
        f"({met(max(v['chg'] for v in values) <= TARGET_CHANGES)})"
    )
    print(
        f"the hindsight bound (an oracle with 7 changes a day) reaches a median {med['hs_ratio']:.2f} x "
        "VPA-style at equal coverage"
    )
    took = time.monotonic() - t_start
    print(f"traces meeting all three: {passed} of {len(values)}; total time {took:.0f} s")
    print(
        "columns: cov = share of scored steps with limit >= usage; slack = unused limit / total demand;\n"
        "chg/d = limit changes per day; RATIO = slack / VPA-style's slack when scaled in hindsight to the\n"
        "project's coverage on that trace; ratio (VPA as configured) = slack / VPA-style's own slack;\n"
        "bound = the hindsight oracle's slack / VPA @ equal coverage; pin99 = P99 pinball loss / usage;\n"
        "MASE = P50 error / seasonal-naive error."
    )
    if any(math.isinf(v["ratio"]) for v in values):
        print("ratio inf: VPA-style had no slack on that trace")


if __name__ == "__main__":
    main()
