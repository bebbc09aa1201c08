"""The running controller treats a changed model file as a challenger: champion/challenger, recorded."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from controller.config import ControllerConfig, ScalingConfig
from controller.event_log import EventLog
from controller.predict.model import DEFAULT_MODEL
from controller.registry import AgentRegistry
from controller.scaling.loop import ScalingLoop
from controller.store import SqliteStore
from shadowplane.tls import TlsConfig


def test_changed_model_file_is_considered_and_the_decision_recorded(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(DEFAULT_MODEL, model)
    store = SqliteStore(tmp_path / "c.db")
    cfg = ControllerConfig(tls=TlsConfig(plaintext=True), scaling=ScalingConfig(model=str(model)))
    loop = ScalingLoop(cfg, store, AgentRegistry(), EventLog(store))
    assert loop.engine.source == "model"
    asyncio.run(loop.consider_new_model())  # first look: remembers the file
    assert not [e for e in store.events() if e.kind == "model"]
    os.utime(model, (1, 1))  # "retrained"
    asyncio.run(loop.consider_new_model())
    (ev,) = [e for e in store.events() if e.kind == "model"]
    assert "champion/challenger" in ev.reason and ev.detail["promoted"] in ("True", "False")
