"""`edgeserve agent feedback`: rewards and labels posted to a running agent, precise refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeserve.cli import main
from edgeserve.device_agent.agent import Agent
from edgeserve.device_agent.server import start_http_server
from edgeserve.testing import KeyPair

from .models import build_mlp_package


@pytest.fixture
def served(tmp_path: Path, keypair: KeyPair) -> Iterator[tuple[Agent, str]]:
    with Agent(tmp_path / "cache", "generic-cpu", [keypair.public_path], feedback=True) as agent:
        agent.install(build_mlp_package(tmp_path / "v1.edgepkg", keypair, tflite=False))
        handle = start_http_server(agent, workers=1)
        try:
            yield agent, handle.url
        finally:
            handle.stop()


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["agent", "feedback", *args])
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def test_feedback_is_accepted_and_reaches_the_window_sums(
        served: tuple[Agent, str], capsys: pytest.CaptureFixture[str]) -> None:
    """A reward and a label name for a past prediction are accepted and summed per version."""
    agent, url = served
    result = agent.predict("toy", {"x": np.zeros((1, 4), np.float32)})
    assert result.request_id is not None
    code, out, _ = _run(capsys, result.request_id, "--model", "toy", "--reward", "1", "--label",
                        "b", "--url", url, "--json")
    assert code == 0 and json.loads(out)["model_version"] == "1.0.0"
    assert agent.feedback_log is not None
    summary = agent.feedback_log.drain()[("toy", "1.0.0")]
    assert (summary.count, summary.rewarded, summary.reward_sum, summary.labeled) == (1, 1, 1.0, 1)


def test_malformed_feedback_is_refused_with_the_reason(
        served: tuple[Agent, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown id, wrong type, out of range, nothing given, a wrong model and an unreachable
    agent each end in one line saying what was wrong."""
    agent, url = served
    result = agent.predict("toy", {"x": np.zeros((1, 4), np.float32)})
    assert result.request_id is not None
    rid = result.request_id
    for args, exit_code, message in (
            (("nope", "--model", "toy", "--reward", "1"), 7, "unknown or expired prediction id"),
            ((rid, "--model", "toy", "--reward", "abc"), 2, "'abc' is not a valid float"),
            ((rid, "--model", "toy", "--reward", "1e12"), 7, "out of range"),
            ((rid, "--model", "toy", "--label", "7"), 7, "label 7 is out of range"),
            ((rid, "--model", "toy", "--label", "zebra"), 7, "not one of the model's labels"),
            ((rid, "--model", "toy"), 7, "needs --reward, --label"),
            ((rid, "--model", "other", "--reward", "1"), 7, "made by model 'toy'"),
    ):
        code, _, err = _run(capsys, *args, "--url", url)
        err = " ".join(err.split())
        assert code == exit_code and message in err and "Traceback" not in err, (args, err)
    code, _, err = _run(capsys, rid, "--model", "toy", "--reward", "1", "--url",
                        "http://127.0.0.1:9", "--timeout", "2")
    assert code == 2 and "cannot reach the agent" in err
    code, _, _ = _run(capsys, rid, "--model", "toy", "--reward", "0", "--url", url)
    assert code == 0  # none of the refusals counted: the prediction still takes its feedback
    assert agent.feedback_log is not None
    assert agent.feedback_log.drain()[("toy", "1.0.0")].count == 1
