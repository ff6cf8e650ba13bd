"""docs/quickstart.md, walked as a new user walks it, with models of their own.

Every ``edgeserve`` command of sections 1-4 is read from the document itself and run as written
(its own process, in a fresh directory with a private data home), with only what a user on this
machine has to change: their model file and its data instead of ``model.onnx``/``calib.npz``,
the machine's Mosquitto instead of the fleet's embedded broker (port 1883 is taken here), free
ports, and a fleet name no other test uses. If the document and the program disagree (an
option renamed, an output path moved, a step that cannot work with one device), this fails.

The models are the kinds a newcomer brings: a scikit-learn Pipeline, TorchScript, ``.pt2``,
Keras ``.keras`` and a TensorFlow SavedModel, each trained on scikit-learn's digits. Version
2.0.0 is the same model trained a little differently, converted "the same way" (section 1's
command with ``--version 2.0.0``), published and rolled out to the device by the fleet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgeserve._process import popen
from tests.services import free_port, unique_name
from tests.support import stop_process, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"
EDGESERVE = str(Path(sys.executable).with_name("edgeserve"))
KINDS = ("sklearn-pipeline", "torchscript", "pt2", "keras", "savedmodel")


def doc_commands(text: str) -> list[tuple[str, str]]:
    """(section title, command) for each command in the fenced blocks of sections 1-4, with
    continuation lines joined and trailing comments dropped."""
    found: list[tuple[str, str]] = []
    section = ""
    for block_title, block in re.findall(r"^## (.+?)$|^```\n(.*?)^```", text, re.M | re.S):
        if block_title:
            section = block_title
            continue
        if not section or section[0] not in "1234":
            continue
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                found.append((section, re.sub(r"\s+", " ", line)))
    return found


@dataclass
class Walk:
    """One newcomer's directory, environment and the processes they started."""

    root: Path
    kind: str
    fleet: str
    http_port: int
    agent_port: int
    env: dict[str, str]
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, line: str, version: str = "1.0.0") -> list[str]:
        """The document's command with this user's file names, ports and fleet."""
        line = line.replace("FLEET-HOST", "127.0.0.1").replace("factory", self.fleet)
        line = line.replace("--port 8000", f"--port {self.agent_port}")
        line = line.replace("localhost:8000", f"localhost:{self.agent_port}")
        args = shlex.split(line)
        if args[:2] == ["edgeserve", "convert"]:
            args[2] = str(self.root / SOURCES[self.kind][0])
            args += SOURCES[self.kind][1]
            args[args.index("--version") + 1] = version
        if args[:3] == ["edgeserve", "fleet", "serve"]:
            args += ["--broker", "mqtt://127.0.0.1:1883", "--http-port", str(self.http_port),
                     "--public-url", f"http://127.0.0.1:{self.http_port}"]
        if args[:3] == ["edgeserve", "agent", "run"]:
            args += ["--port", str(self.agent_port)]
        if args[0] == "edgeserve":
            args[0] = EDGESERVE
        return args

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True,
                                text=True, timeout=timeout, check=False)
        assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
        return result

    def start(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.root / log).open("wb") as sink:
            process = popen(args, cwd=self.root, env=self.env, stdout=sink,
                            stderr=subprocess.STDOUT)
        self.background.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_process(process, 30)


SOURCES = {
    "sklearn-pipeline": ("model.pkl", []),
    "torchscript": ("model.pt", ["--input-shape", "x=Nx1x8x8"]),
    "pt2": ("model.pt2", []),
    "keras": ("model.keras", []),
    "savedmodel": ("saved_model", []),
}
"""kind -> (the user's file in place of model.onnx, what the quickstart's prose says such a
source needs added)"""

_BUILD = r'''
import os, sys, pickle, warnings
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
from sklearn.datasets import load_digits
kind, root, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
digits = load_digits()
x = (digits.data / 16.0).astype("float32")
y = digits.target
rng = np.random.default_rng(seed)
order = rng.permutation(len(x))
x, y = x[order], y[order]
train, calib, ev = slice(0, 1200), slice(1200, 1500), slice(1500, 1797)
images = x.reshape(-1, 1, 8, 8)
if kind == "sklearn-pipeline":
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.ensemble import RandomForestClassifier
    model = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=8 + seed,
                                                                   max_depth=6, random_state=seed))
    model.fit(x[train], y[train])
    pickle.dump(model, open(root + "/model.pkl", "wb"))
    data = x
elif kind in ("torchscript", "pt2"):
    import torch
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy(images[train]), torch.from_numpy(y[train])
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchscript":
            torch.jit.trace(net, torch.zeros(1, 1, 8, 8)).save(root + "/model.pt")
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.export.export(net, (torch.zeros(2, 1, 8, 8),),
                                          dynamic_shapes=({0: batch},))
            torch.export.save(program, root + "/model.pt2")
    data = images
else:
    import keras, tensorflow as tf
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,), name="pixels"),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[train], y[train], epochs=5, verbose=0)
    if kind == "keras":
        model.save(root + "/model.keras")
    else:
        model.export(root + "/saved_model")
    data = x
np.savez(root + "/calib.npz", x=data[calib])
np.savez(root + "/eval.npz", x=data[ev], labels=y[ev])
np.save(root + "/sample.npy", data[ev][:1])
'''


def _build(kind: str, root: Path, version: str) -> None:
    """The user's model (and its data) for ``version``, trained in a process of its own."""
    subprocess.run([sys.executable, "-c", _BUILD, kind, str(root), version[0]], check=True,
                   capture_output=True, timeout=600, cwd=root)


@pytest.fixture(params=KINDS)
def walk(request: pytest.FixtureRequest, tmp_path: Path,
         mqtt_broker: tuple[str, int]) -> Iterator[Walk]:
    root = tmp_path / "newcomer"
    root.mkdir()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("EDGESERVE_CACHE", None)
    made = Walk(root, request.param, unique_name("factory"), free_port(), free_port(), env)
    try:
        yield made
    finally:
        for process in reversed(made.background):
            made.stop(process)


def test_the_quickstart_works_with_a_model_of_ones_own(walk: Walk) -> None:
    """Sections 1-4 as written: keys, convert (both profiles), inspect and verify, install,
    predict, serve and query, run the fleet and the agent, publish 2.0.0 and roll it out; the
    device ends on 2.0.0 with the fleet's rollout completed."""
    commands = doc_commands(DOC.read_text(encoding="utf-8"))
    assert len(commands) >= 15, commands
    _build(walk.kind, walk.root, "1.0.0")
    serving: subprocess.Popen[bytes] | None = None
    for _section, line in commands:
        args = walk.command(line)
        if "pause|resume|promote|rollback" in line:
            continue  # a synopsis of four commands, not one to type
        if line.startswith("curl "):
            wait_until(lambda: _get(f"http://127.0.0.1:{walk.agent_port}/v2/models/digits"),
                       60, "agent serve to answer")
            body = json.loads(_get(f"http://127.0.0.1:{walk.agent_port}/v2/models/digits"))
            assert body["name"] == "digits" and body["versions"] == ["1.0.0"], body
            assert serving is not None
            walk.stop(serving)  # as the reader does before section 3 (the port is needed)
            continue
        if args[1:3] == ["agent", "serve"]:
            serving = walk.start(args, "agent-serve.log")
            continue
        if args[1:3] == ["fleet", "serve"]:
            walk.start(args, "fleet-serve.log")
            wait_until(lambda: _get(f"http://127.0.0.1:{walk.http_port}/healthz"), 60,
                       "fleet serve to answer")
            continue
        if args[1:3] == ["agent", "run"]:
            walk.start(args, "agent-run.log")
            wait_until(lambda: _devices(walk), 60, "the device to register with the fleet")
            continue
        if args[1:3] == ["fleet", "publish"]:
            # "a later version converted the same way": section 1's command, version 2.0.0
            _build(walk.kind, walk.root, "2.0.0")
            convert = next(c for s, c in commands if c.startswith("edgeserve convert"))
            walk.run(walk.command(convert, version="2.0.0"))
        if args[1:4] == ["fleet", "rollout", "status"] and "--watch" in args:
            watcher = walk.start(args, "rollout-watch.log")
            wait_until(lambda: _phase(walk) in ("completed", "rolled-back"), 300,
                       "the rollout to finish", progress=lambda: _phase(walk))
            assert _phase(walk) == "completed", _rollout(walk)
            # --watch ends by itself once the rollout is done: on its next refresh (1 s),
            # which on a busy machine comes after the API already says so
            with contextlib.suppress(subprocess.TimeoutExpired):
                watcher.wait(60)
            finished = watcher.returncode
            walk.stop(watcher)
            log = (walk.root / "rollout-watch.log").read_text()
            assert finished == 0 and "completed" in log, (finished, log[-2000:])
            continue
        walk.run(args)
    assert (walk.root / "dist" / "digits-1.0.0.edgepkg").exists()
    assert (walk.root / "dist" / "digits-2.0.0.report.json").exists()
    device = _devices(walk)[0]
    assert device["models"] == {"digits": "2.0.0"}, device


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def _cli_json(walk: Walk, *args: str) -> object:
    result = walk.run([EDGESERVE, *args, "--json"], timeout=60)
    return json.loads(result.stdout)


def _devices(walk: Walk) -> list[dict[str, object]]:
    devices = _cli_json(walk, "fleet", "devices")
    assert isinstance(devices, list)
    return [d for d in devices if d.get("profile")]


def _rollout(walk: Walk) -> dict[str, object]:
    found = _cli_json(walk, "fleet", "rollout", "list", "--all")
    assert isinstance(found, list) and found, found
    latest = found[-1]
    assert isinstance(latest, dict)
    return latest


def _phase(walk: Walk) -> str:
    return str(_rollout(walk)["phase"])


def test_the_walk_reads_every_section_of_the_quickstart() -> None:
    """The reader finds the commands of sections 1-4 and skips section 0's set-up."""
    commands = [c for _, c in doc_commands(DOC.read_text(encoding="utf-8"))]
    assert commands[0].startswith("edgeserve keys generate")
    assert any(c.startswith("edgeserve fleet rollout create") for c in commands)
    assert not any(c.startswith(("git clone", "make demo", "source")) for c in commands)
