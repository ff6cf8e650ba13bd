"""A device install (`pip install edgeserve[agent]`) stays light: no torch, TensorFlow, coremltools."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "tensorflow", "coremltools", "onnx2tf", "tf_keras", "keras")


@pytest.mark.slow
def test_agent_extra_installs_and_imports_without_heavy_frameworks(tmp_path: Path) -> None:
    """A fresh venv with only edgeserve[agent] imports the agent and has no heavy frameworks."""
    env_dir = tmp_path / "agent-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{REPO}[agent]"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True)
    names = {p["name"].lower().replace("-", "_") for p in json.loads(listed.stdout)}
    assert not names & {"torch", "tensorflow", "tensorflow_cpu", "coremltools", "onnx2tf",
                        "tf_keras"}, names
    assert {"onnxruntime", "ai_edge_litert", "paho_mqtt", "msgspec"} <= names
    assert "pydantic" not in names, "the agent's documents need no pydantic (about 15 MB of RSS)"
    probe = (
        "import sys, json, edgeserve.device_agent, edgeserve.contract, edgeserve.package;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    # cwd outside the repository, so its source folders cannot shadow the installed package
    imported = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                              check=False, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == []
    cli = subprocess.run([str(env_dir / "bin" / "edgeserve"), "agent", "--help"],
                         capture_output=True, text=True, check=False, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    convert = subprocess.run([str(env_dir / "bin" / "edgeserve"), "convert", "x"],
                             capture_output=True, text=True, check=False, cwd=tmp_path)
    assert convert.returncode != 0 and "Traceback" not in convert.stderr


def test_core_import_is_light() -> None:
    """Importing the core and the agent package in this interpreter pulls no heavy framework."""
    probe = ("import sys, json, edgeserve, edgeserve.cli, edgeserve.device_agent;"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout) == []
