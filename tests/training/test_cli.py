"""`shadowctl train` and `shadowctl backtest`: the happy paths and every bad input's exit code 2."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from controller.predict.model import load_model
from shadowctl.cli import main

TINY = ["--epochs", "1", "--hidden", "4", "--synthetic", "0"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "file not found"),
        ("time,cpu\n2014-01-01 00:00:00,1\n", "expected 'timestamp,value'"),
        ("timestamp,value\n2014-01-01 00:00:00,abc\n", "line 2: value 'abc' is not a number"),
        ("timestamp,value\nyesterday,1\n", "line 2: timestamp 'yesterday' is not a time"),
        ("timestamp,value\n2014-01-01 00:00:00,1,2\n", "line 2: 3 columns"),
        ("timestamp,value\n2014-01-01 00:00:00,nan\n", "not a finite number"),
        ("timestamp,value\n" + "".join(f"2014-01-01 00:{m:02d}:00,1\n" for m in range(20)), "warm-up"),
        ("timestamp,value\n2014-01-01 00:00:00,1\n", "1 rows; at least 16"),
    ],
)
def test_backtest_bad_trace_exits_2_naming_the_problem(
    content: str | None, phrase: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.csv"
    if content is not None:
        trace.write_text(content)
    code, out, err = run(
        capsys, "backtest", "--trace", str(trace), "--fallback", "--out", str(tmp_path / "a.csv")
    )
    assert code == 2 and phrase in err and out == ""


def test_backtest_bad_model_or_lead_exits_2(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = str(data_dir / "nab_rds_cpu_cc0c53_3d.csv")
    out = str(tmp_path / "a.csv")
    code, _, err = run(
        capsys, "backtest", "--trace", trace, "--model", str(tmp_path / "no.onnx"), "--out", out
    )
    assert code == 2 and "model file not found" in err and "--fallback" in err
    code, _, err = run(capsys, "backtest", "--trace", trace, "--fallback", "--lead", "0", "--out", out)
    assert code == 2 and "--lead must be >= 1" in err
    code, _, err = run(capsys, "backtest", "--trace", trace, "--fallback", "--lead", "9", "--out", out)
    assert code == 2 and "beyond the forecast horizon" in err


def test_backtest_prints_the_table_and_writes_one_row_per_trace_row(
    data_dir: Path, tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = data_dir / "nab_rds_cpu_cc0c53_3d.csv"
    out = tmp_path / "alloc.csv"
    code, text, _ = run(
        capsys,
        "backtest",
        "--trace",
        str(trace),
        "--model",
        str(tiny_model_path),
        "--lead",
        "2",
        "--out",
        str(out),
    )
    assert code == 0
    for name in ("shadowplane", "seed rule", "VPA-style", "Autopilot-style", "slack vs VPA-style", "MASE"):
        assert name in text
    assert "in-sample" in text, "the tiny model was trained on this trace: the report must say so"
    rows = list(csv.reader(out.open()))
    assert rows[0][:3] == ["timestamp", "usage", "allocation"] and "q0.99" in rows[0]
    assert len(rows) - 1 == 864
    assert rows[1][2] == rows[2][2] == "0.0" and float(rows[3][2]) > 0, "lead 2: the first limit is at row 3"


def test_train_from_traces_writes_a_model_that_loads(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    code, text, _ = run(
        capsys,
        "train",
        "--traces",
        str(data_dir),
        "--out",
        str(out),
        "--exclude",
        "nab_rds_cpu_cc0c53_3d",
        *TINY,
    )
    assert code == 0 and f"wrote {out}" in text
    info = load_model(out).info
    assert info.training_data["series"] == ["nab_ec2_cpu_5f5533_3d"]
    assert info.training_data["source"].startswith("traces ")
    code, _, err = run(
        capsys, "train", "--traces", str(data_dir), "--out", str(out), "--exclude", "nope", *TINY
    )
    assert code == 2 and "--exclude nope" in err
    code, _, err = run(capsys, "train", "--traces", str(tmp_path / "none"), "--out", str(out), *TINY)
    assert code == 2 and "not a directory" in err


def test_retraining_onto_a_running_model_is_a_champion_challenger_decision(
    data_dir: Path, tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "running.onnx"
    shutil.copy(tiny_model_path, out)
    before = out.read_bytes()
    code, text, _ = run(
        capsys, "train", "--traces", str(data_dir), "--out", str(out), "--holdout-hours", "12", *TINY
    )
    assert code == 0 and "challenger" in text and "champion" in text
    rejected = tmp_path / "running.rejected.onnx"
    if "keeping the champion" in text:
        assert out.read_bytes() == before and rejected.exists()
    else:
        assert "beats" in text and out.read_bytes() != before and not rejected.exists()
    load_model(out)


def test_train_from_a_bad_events_file_exits_2(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ev = write(tmp_path / "ev.json", '{"not": "a list"}')
    code, _, err = run(
        capsys,
        "train",
        "--traces",
        str(data_dir),
        "--out",
        str(tmp_path / "m.onnx"),
        "--events",
        str(ev),
        *TINY,
    )
    assert code == 2 and "expected a JSON list" in err


def allocations(path: str) -> list[float]:
    with open(path) as fh:
        return [float(r["allocation"]) for r in csv.DictReader(fh)]


def test_backtest_replays_the_controllers_configuration(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = str(data_dir / "nab_rds_cpu_cc0c53_3d.csv")
    out = str(tmp_path / "a.csv")
    base = ["backtest", "--trace", trace, "--fallback", "--out", out, "--scale", "0.01"]
    code, text, _ = run(capsys, *base)
    assert code == 0 and "VPA @ equal cov." in text and "slack vs VPA-style at equal coverage" in text
    default_rows = allocations(out)
    # the trace is CPU percent: at --scale 0.01 it is well under 1 core, so a configured floor of 2 decides
    cfg = tmp_path / "controller.toml"
    cfg.write_text("[tls]\nplaintext = true\n[scaling]\ncpu_floor_cores = 2.0\n")
    code, text, _ = run(capsys, *base, "--config", str(cfg))
    assert code == 0
    assert min(allocations(out)[2:]) == 2.0 and min(default_rows[2:]) < 1.0
    # memory: OOM-risk steps are reported
    code, text, _ = run(capsys, *base, "--resource", "memory", "--scale", str(2**30))
    assert code == 0 and "OOM-risk steps" in text and "(memory)" in text


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--scale", "0"], "--scale must be a positive number"),
        (["--host-capacity", "-1"], "--host-capacity must be >= 0"),
        (["--config", "{missing}"], "--config"),
        (["--config", "{bad}"], "scaling.target_coverage"),
    ],
)
def test_backtest_bad_options_exit_2_naming_them(
    extra: list[str], phrase: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[tls]\nplaintext = true\n[scaling]\ntarget_coverage = 2\n")
    extra = [e.format(missing=tmp_path / "none.toml", bad=bad) for e in extra]
    trace = str(data_dir / "nab_rds_cpu_cc0c53_3d.csv")
    code, out, err = run(
        capsys, "backtest", "--trace", trace, "--fallback", "--out", str(tmp_path / "a.csv"), *extra
    )
    assert code == 2 and phrase in err and out == ""
