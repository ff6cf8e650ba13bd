"""The agent's event log (``agent events``), eval files for ``agent predict``, and an agent
start without third-party noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeserve.cli import main
from edgeserve.contract import ErrorInfo, ModelReport, Reported
from edgeserve.device_agent import Agent
from edgeserve.device_agent.events import EventLog
from edgeserve.device_agent.run import AgentRun

from .models import mlp_weights

EDGESERVE = str(Path(sys.executable).parent / "edgeserve")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_cli_operations_land_in_the_event_log(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              agent_assets: dict[str, Path]) -> None:
    """Installs, an activation, a rollback and a removal made through the CLI are listed by
    ``agent events`` in order, with versions and details, and --model/--limit filter them."""
    common = ["--cache", str(tmp_path / "cache"), "--trusted-key", str(agent_assets["public_key"])]
    for args in (["install", str(agent_assets["pkg_v1"])],
                 ["install", str(agent_assets["pkg_v2"]), "--no-activate"],
                 ["activate", "toy", "1.1.0"], ["rollback", "toy"],
                 ["remove", "toy", "--version", "1.1.0"]):
        code, _, err = _run(capsys, "agent", *args, *common)
        assert code == 0, err
    code, out, _ = _run(capsys, "agent", "events", *common, "--json")
    events = json.loads(out)
    assert code == 0
    assert [(e["event"], e["version"]) for e in events] == [
        ("installed", "1.0.0"), ("installed", "1.1.0"), ("activated", "1.1.0"),
        ("rolled-back", "1.0.0"), ("removed", "1.1.0")]
    assert "staged" in events[1]["detail"] and "previous: 1.0.0" in events[2]["detail"]
    assert all(e["model"] == "toy" and e["ts"] > 0 for e in events)
    code, out, _ = _run(capsys, "agent", "events", *common, "--json", "--limit", "2")
    assert [e["event"] for e in json.loads(out)] == ["rolled-back", "removed"]
    code, out, _ = _run(capsys, "agent", "events", *common, "--model", "other")
    assert code == 0 and "no events" in out
    code, out, _ = _run(capsys, "agent", "events", *common)
    assert "rolled-back" in out and "1.1.0" in out


def test_event_log_is_bounded_and_skips_damaged_lines(tmp_path: Path) -> None:
    """Past its size the log keeps its newest events (not the oldest), and a torn line in the
    file does not hide the others."""
    log = EventLog(tmp_path, max_bytes=4096)
    for i in range(400):
        log.add("activated", "m", f"{i}.0.0", "x" * 20)
    assert log.path.stat().st_size <= 4096
    kept = log.read()
    assert kept[-1].version == "399.0.0" and 10 < len(kept) < 400
    assert [int(e.version.split(".")[0]) for e in kept] == sorted(  # type: ignore[union-attr]
        int(e.version.split(".")[0]) for e in kept)  # type: ignore[union-attr]
    with log.path.open("a") as f:
        f.write('{"ts": 1, "event": "torn"\n')
    log.add("removed", "m", "0.0.1")
    assert log.read(limit=1)[0].event == "removed"
    assert "torn" not in {e.event for e in log.read()}


def test_update_outcomes_are_logged_once_each(tmp_path: Path,
                                              agent_assets: dict[str, Path]) -> None:
    """What ``agent run`` reports about an update - committed, a health failure with its
    reason - is written to the event log once, however often the same report is re-sent."""
    agent = Agent(tmp_path / "cache", trusted_keys=[agent_assets["public_key"]])
    run = AgentRun.build(agent)
    try:
        def report(state: str, error: str | None = None) -> Reported:
            last = ErrorInfo(code="HealthCheckFailed", message=error, version="2.0.0") \
                if error else None
            model = ModelReport(active="1.0.0" if error else "2.0.0", target="2.0.0",
                                state=state, last_error=last)  # type: ignore[arg-type]
            return Reported(device_id="d1", revision=3, models={"toy": model})

        for reported in (report("downloading"), report("health-check"), report("committed"),
                         report("committed"), report("rolled-back", "error rate 0.4 > 0.05"),
                         report("rolled-back", "error rate 0.4 > 0.05")):
            run._report(reported)
        events = agent.events.read()
        assert [(e.event, e.version) for e in events] == [("committed", "2.0.0"),
                                                          ("health-failed", "2.0.0")]
        assert "error rate 0.4" in events[1].detail and "rolled back to 1.0.0" in \
            events[1].detail
    finally:
        run.stop()


def test_predict_takes_an_eval_file_with_labels(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                agent_assets: dict[str, Path]) -> None:
    """An .npz with the inputs and a 'labels' array (the converter's eval file) predicts every
    sample and reports top-1 accuracy; labels that are not class indices are ignored, said so."""
    cache = str(tmp_path / "cache")
    code, _, err = _run(capsys, "agent", "install", str(agent_assets["pkg_v1"]), "--cache", cache,
                        "--trusted-key", str(agent_assets["public_key"]))
    assert code == 0, err
    x = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)
    truth = mlp_weights().forward(x).argmax(axis=1)
    labels = truth.copy()
    labels[:3] = (labels[:3] + 1) % 3  # three wrong on purpose
    np.savez(tmp_path / "eval.npz", x=x, labels=labels)
    code, out, err = _run(capsys, "agent", "predict", "toy", "--input",
                          str(tmp_path / "eval.npz"), "--cache", cache, "--json")
    data = json.loads(out)
    assert code == 0, err
    assert data["samples"] == 10 and data["accuracy"] == pytest.approx(0.7)
    assert np.asarray(data["outputs"]["y"]).shape == (10, 3)
    code, out, _ = _run(capsys, "agent", "predict", "toy", "--input",
                        str(tmp_path / "eval.npz"), "--cache", cache)
    assert "accuracy 0.7000" in out and "more rows" in out
    np.savez(tmp_path / "odd.npz", x=x, labels=np.linspace(0, 1, 10))
    code, out, _ = _run(capsys, "agent", "predict", "toy", "--input",
                        str(tmp_path / "odd.npz"), "--cache", cache, "--json")
    assert code == 0 and json.loads(out)["labels"] == "ignored"


@pytest.mark.slow
def test_agent_start_is_quiet_on_a_profile_with_missing_delegates(
        tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """``agent run`` on a TFLite model with a profile whose GPU/NNAPI delegates are missing here
    prints our own one-line notes only: no traceback from LiteRT, no XNNPACK banner, no
    deprecation walls, and the status line is not folded."""
    cache = tmp_path / "cache"
    with Agent(cache, "pixel-8", [agent_assets["public_key"]]) as agent:
        assert agent.install(agent_assets["pkg_v1"]).format == "tflite"
    result = subprocess.run(
        [EDGESERVE, "agent", "run", "--cache", str(cache), "--profile", "pixel-8", "--port", "0",
         "--duration", "1", "--trusted-key", str(agent_assets["public_key"])],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "EDGESERVE_TRUSTED_KEYS": "", "COLUMNS": ""})
    assert result.returncode == 0, result.stderr
    noise = ("Traceback", "Exception ignored", "XNNPACK delegate for CPU", "Warning",
             "DeprecationWarning")
    assert not [n for n in noise if n in result.stderr], result.stderr
    status = [line for line in result.stdout.splitlines() if line.startswith("agent running")]
    assert len(status) == 1 and status[0].endswith("60 s windows")
