"""Benchmark the device agent, side by side with its baselines, in one run.

(a) In-process: ``Agent.predict`` vs a bare ``onnxruntime.InferenceSession.run`` (on the very
    session the agent loaded) and a bare LiteRT ``Interpreter.invoke``, on a tiny model
    (4 → 16 → 3 MLP, batch 1) and a small CNN (3×8×8 image): overhead as a ratio and in µs/call.
(b) HTTP and gRPC: ``edgeserve agent serve`` vs MLServer 1.7.1 with a minimal custom runtime
    calling ONNX Runtime, the same ONNX model, the same request, the same number of inference
    workers and ONNX Runtime threads, at concurrency 1 and 8: HTTP (JSON) driven by ``wrk``, gRPC
    (``ModelInfer``, ``fp32_contents``) by ``h2load`` with one stream per connection; throughput,
    p50, p99. The ceiling runs beside them: ``bench/bare_server.py``, one Starlette route and one
    ``grpc.aio`` handler calling the same session with nothing else (no validation, limits or
    telemetry).
(c) Dynamic batching: two ~1 ms CNNs (a compute-bound one with a pooled head, a weight-bound
    one with a dense head) called by 8 threads at once through ``Agent.predict``, unbatched and
    batched (``BatchPolicy(8, 2000)``): throughput, p50, p99, the mean batch. ONNX Runtime runs
    them with a dynamic batch axis; the weight-bound one also runs on LiteRT, converted by
    ``edgeserve convert`` for a profile asking for a batch-8 variant (the static route).
(d) Footprint: ``agent serve`` and ``agent run`` (MQTT link up, when a broker is on
    127.0.0.1:1883) with one small ONNX or TFLite model: RSS after 50 requests and seconds from
    spawn to ready, beside the runtime's own floor (Python + runtime + that model); and the RSS
    each import of the serving path adds.

Usage::

    .venv/bin/python bench/agent.py                 # everything (creates bench/.venv-mlserver)
    .venv/bin/python bench/agent.py --skip-http     # (a), (c) and (d)
    .venv/bin/python bench/agent.py --parts c       # only (c)
    .venv/bin/python bench/agent.py --duration 5    # shorter HTTP runs

MLServer lives in its own venv (``bench/.venv-mlserver``, created on first use, with
``uvloop==0.21.0``: MLServer 1.7.1 crashes at start with newer uvloop). ``wrk`` comes from Debian
(``apt-get install wrk``; the script tries that when it is missing). Results are printed and
written to ``bench/out/agent.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgeserve._process import popen  # noqa: E402
from edgeserve.device_agent import Agent  # noqa: E402
from edgeserve.profiles import load_profile  # noqa: E402
from edgeserve.testing import make_keypair, write_test_profile  # noqa: E402
from tests.device_agent.models import (  # noqa: E402
    build_conv_package,
    build_mlp_package,
    write_profile,
)

console = Console()
MLSERVER_VENV = REPO / "bench" / ".venv-mlserver"
DEVICE_VENV = REPO / "bench" / ".venv-agent"
MLSERVER_PINS = ["mlserver==1.7.1", "onnxruntime==1.32.0", "uvloop==0.21.0", "numpy==2.4.6"]
RUNTIME_PY = '''
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = {threads}
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.settings.parameters.uri, options,
                                            providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {{i.name: NumpyCodec.decode_input(i) for i in payload.inputs}}
        outputs = self.session.run(self.names, feeds)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output(n, o) for n, o in zip(self.names, outputs)])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- (a) in-process overhead -----------------------------------------------------------------------

def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _compare(bares: list[Callable[[], object]], agent: Callable[[], object], calls: int,
             rounds: int) -> dict[str, float]:
    """Alternate bare and agent rounds (so drift hits both); the fastest round of each.

    The minimum is the usual estimator for micro-benchmarks on a shared machine: other
    processes only ever add time, so the fastest round is closest to the code's own cost.
    With several bare forms (ONNX Runtime with and without run options) the fastest counts.
    """
    for _ in range(calls // 10):
        for bare in bares:
            bare()
        agent()
    bare_us: list[float] = []
    agent_us: list[float] = []
    for _ in range(rounds):
        bare_us.extend(_per_call_us(bare, calls) for bare in bares)
        agent_us.append(_per_call_us(agent, calls))
    b, a = min(bare_us), min(agent_us)
    return {"bare_us": b, "agent_us": a, "overhead_us": a - b, "ratio": a / b}


def bench_inprocess(work: Path, key: Any, calls: int, rounds: int) -> list[dict[str, Any]]:
    from ai_edge_litert.interpreter import Interpreter

    mlp = build_mlp_package(work / "toy.edgepkg", key)
    conv = build_conv_package(work / "conv.edgepkg", key)
    profiles = work / "profiles"
    one_thread = write_profile(profiles, "bench-onnx", '[[artifacts]]\nformat = "onnx"\n'
                                                      'precision = "fp32"\n')
    lite = write_profile(profiles, "bench-tflite", '[[artifacts]]\nformat = "tflite"\n'
                                                   'precision = "fp32"\n')
    rows = []
    for label, pkg, name, feed in (
            ("MLP 4-16-3", mlp, "toy", {"x": np.random.default_rng(0).normal(
                size=(1, 4)).astype(np.float32)}),
            ("CNN 3x8x8", conv, "conv", {"image": np.random.default_rng(0).normal(
                size=(1, 3, 8, 8)).astype(np.float32)})):
        with Agent(work / f"cache-onnx-{name}", load_profile(one_thread), [key.public_path]) as a:
            a.install(pkg)
            loaded = a.model(name)
            session = loaded.runtime._session  # type: ignore[attr-defined]
            options = loaded.runtime._run_options  # type: ignore[attr-defined]
            outs = [o.name for o in session.get_outputs()]
            row = _compare([lambda s=session, f=feed, o=outs: s.run(o, f),
                            lambda s=session, f=feed, o=outs, r=options: s.run(o, f, r)],
                           lambda a=a, n=name, f=feed: a.predict(n, f), calls, rounds)
            rows.append({"model": label, "runtime": "ONNX Runtime", "layout_us": 0.0, **row})
        with Agent(work / f"cache-lite-{name}", load_profile(lite), [key.public_path]) as a:
            a.install(pkg)
            loaded = a.model(name)
            record = loaded.record
            content = a.cache.read_verified(record.files[loaded.artifact.path], "bench")
            interp = Interpreter(model_content=content, num_threads=1)
            interp.allocate_tensors()
            inp = interp.get_input_details()[0]["index"]
            out = interp.get_output_details()[0]["index"]
            array = loaded.adapter.to_runtime(feed)[loaded.adapter.inputs[0].runtime_name]

            def bare(i: Any = interp, x: np.ndarray = array, ii: int = inp, oo: int = out) -> Any:
                i.set_tensor(ii, x)
                i.invoke()
                return i.get_tensor(oo)

            row = _compare([bare], lambda a=a, n=name, f=feed: a.predict(n, f), calls, rounds)
            # The agent takes the manifest's layout (NCHW) and the TFLite artifact wants NHWC:
            # that transpose is work a bare caller would do too, so it is shown on its own.
            adapter = loaded.adapter
            checked = adapter.check(feed)
            layout = min(_per_call_us(lambda c=checked, d=adapter: d.to_runtime(c), calls)
                         for _ in range(rounds))
            direct = min(_per_call_us(lambda c=checked: dict(c), calls) for _ in range(rounds))
            rows.append({"model": label, "runtime": "LiteRT",
                         "layout_us": max(0.0, layout - direct), **row})
    return rows


# -- (c) dynamic batching --------------------------------------------------------------------------

def _cnn_model(size: int, widths: tuple[int, ...], dense: int) -> Any:
    """An image CNN (3 x size x size -> 3x3 convolutions of ``widths`` channels, the first at
    stride 1, the others 2 -> 10 scores), dynamic batch. ``dense``: a VGG-style head (flatten ->
    ``dense`` units -> 10) instead of global average pooling."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits, nodes, channels, x = [], [], 3, "image"
    strides = (1, *[2] * (len(widths) - 1))
    for i, (width, stride) in enumerate(zip(widths, strides, strict=True)):
        w = (rng.normal(size=(width, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                   strides=[stride, stride]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        channels, x = width, f"r{i}"
    if dense:
        side = size // 2 ** (len(widths) - 1)
        features = channels * side * side
        inits += [numpy_helper.from_array((rng.normal(size=(dense, features)) /
                                           np.sqrt(features)).astype(np.float32), "wd"),
                  numpy_helper.from_array(np.zeros(dense, np.float32), "bd")]
        nodes += [helper.make_node("Flatten", [x], ["flat0"]),
                  helper.make_node("Gemm", ["flat0", "wd", "bd"], ["hidden"], transB=1),
                  helper.make_node("Relu", ["hidden"], ["flat"])]
        channels = dense
    else:
        nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["flat"])]
    inits += [numpy_helper.from_array(rng.normal(size=(10, channels)).astype(np.float32), "wf"),
              numpy_helper.from_array(np.zeros(10, np.float32), "bf")]
    nodes += [helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                     ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _cnn_package(out: Path, key: Any, size: int = 64, widths: tuple[int, ...] = (32, 64, 64),
                 dense: int = 0) -> Path:
    """:func:`_cnn_model` as a package with one ONNX artifact."""
    from edgeserve.package import PackageWriter
    from edgeserve.testing import make_manifest

    model = _cnn_model(size, widths, dense)
    manifest = make_manifest(
        "cnn", inputs=[{"name": "image", "dtype": "float32", "shape": ["batch", 3, size, size]}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
        labels=[str(i) for i in range(10)])
    writer = PackageWriter(manifest)
    writer.add_file("artifacts/model.onnx", model.SerializeToString())
    writer.write(out, key.private)
    return out


def _closed_loop(agent: Agent, model: str, clients: int, seconds: float,
                 size: int) -> dict[str, float]:
    """``clients`` threads calling ``predict`` back to back for ``seconds``."""
    import threading

    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds
    image = np.random.default_rng(1).normal(size=(1, 3, size, size)).astype(np.float32)

    def client(mine: list[float]) -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            agent.predict(model, {"image": image})
            mine.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client, args=(lat,)) for lat in latencies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = np.concatenate([np.asarray(lat) for lat in latencies])
    return {"rps": len(every) / seconds, "p50_ms": float(np.percentile(every, 50)),
            "p99_ms": float(np.percentile(every, 99))}


BATCH_MODELS = {
    # name: (input side, convolution widths, dense head units)
    "CNN 3x64x64, pooled head (compute-bound)": (64, (32, 64, 64), 0),
    "CNN 3x24x24, 1024-unit dense head (weight-bound)": (24, (16, 32), 1024),
}


def _tflite_batch_package(work: Path, key: Any, size: int, widths: tuple[int, ...],
                          dense: int, batch: int) -> tuple[Path, Path]:
    """:func:`_cnn_model` converted for a LiteRT profile that asks for a batch-``batch``
    variant (the converter's static route); (package, profile)."""
    import onnx

    from edgeserve.converters import convert

    source = work / f"cnn-{size}-{dense}.onnx"
    onnx.save(_cnn_model(size, widths, dense), str(source))
    profile = write_test_profile(
        work / "profiles", "bench-tflite-batch",
        f'[[artifacts]]\nformat = "tflite"\nprecision = "fp32"\n\n[batching]\nstatic_batch = {batch}\n',
        title=f"bench: LiteRT, fp32 TFLite with a batch-{batch} variant",
        # as many threads as generic-cpu gives ONNX Runtime (all cores); LiteRT's own default
        # is one, which leaves a batch-8 call on one core
        runtimes=f"[runtimes.litert]\nthreads = {os.cpu_count() or 1}\n")
    images = np.random.default_rng(3).normal(size=(32, 3, size, size)).astype(np.float32)
    result = convert(source, profiles=[str(profile)], name="cnn", version="1.0.0",
                     evaluation={"image": images}, out=work / "converted", sign_key=key.private,
                     show_progress=False)
    built = {a["id"]: a["validation"].get("status") for a in result.report["artifacts"]}
    if not result.ok or result.package is None or built.get(f"tflite-fp32-b{batch}") != "passed":
        raise SystemExit(f"the TFLite batch-{batch} conversion failed: {built}")
    return result.package, profile


def bench_batching(work: Path, key: Any, seconds: float, clients: int = 8,
                   max_batch: int = 8, delay_us: int = 2000,
                   tflite: bool = True) -> list[dict[str, Any]]:
    """Each CNN at concurrency ``clients``: unbatched, then batched (in-process predict), on
    ONNX Runtime (dynamic batch axis); with ``tflite``, the weight-bound CNN also on LiteRT
    through the converter's batch-``max_batch`` variant."""
    from edgeserve.device_agent.batching import BatchPolicy

    cases: list[tuple[str, Path, Any, int]] = []
    for model, (size, widths, dense) in BATCH_MODELS.items():
        package = _cnn_package(work / f"cnn-{len(cases)}.edgepkg", key, size, widths, dense)
        cases.append((f"{model}, ONNX Runtime", package, "generic-cpu", size))
    if tflite:
        name, (size, widths, dense) = list(BATCH_MODELS.items())[-1]
        package, profile = _tflite_batch_package(work, key, size, widths, dense, max_batch)
        cases.append((f"{name}, LiteRT (batch-{max_batch} variant)", package, profile, size))
    rows = []
    for model, package, profile, size in cases:
        for label, batching in (("unbatched", None),
                                (f"batched (max {max_batch}, {delay_us} µs)",
                                 {"cnn": BatchPolicy(max_batch, delay_us)})):
            with Agent(work / f"cache-cnn-{len(rows)}", profile, [key.public_path],
                       concurrency=clients, batching=batching) as agent:
                agent.install(package)
                one = np.zeros((1, 3, size, size), np.float32)
                single = min(_per_call_us(lambda a=agent, x=one: a.predict("cnn", {"image": x}),
                                          50) for _ in range(3)) / 1000
                row = {"model": model, "mode": label, "single_ms": single,
                       **_closed_loop(agent, "cnn", clients, seconds, size)}
                runtime = agent.model("cnn").runtime
                calls = getattr(runtime, "batches", 0)
                row["mean_batch"] = getattr(runtime, "samples", 0) / calls if calls else 1.0
                rows.append(row)
    return rows


# -- (d) footprint and start-up -------------------------------------------------------------------

_RSS_OF = """
import sys, time
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
print(rss())
for step in sys.argv[1:]:
    exec(step)
    print(rss())
"""

# The serving path's imports in the order ``agent serve`` meets them (each row: what it adds).
IMPORT_STEPS = [
    ("numpy", "import numpy"),
    ("onnxruntime", "import onnxruntime"),
    ("one ONNX session", "import onnxruntime as o; s = o.InferenceSession(sys.argv[0] "
                         "if False else MODEL, providers=['CPUExecutionProvider'])"),
    ("click", "import click"),
    ("msgspec (first struct class)", "import msgspec\nclass _M(msgspec.Struct):\n x: int"),
    ("edgeserve core (manifest, profiles, package)", "import edgeserve.package, edgeserve.profiles"),
    ("edgeserve.device_agent.agent", "import edgeserve.device_agent.agent"),
    ("edgeserve.device_agent.cli", "import edgeserve.device_agent.cli"),
    ("asyncio, http, email", "import asyncio, http.client, email.utils"),
    ("uvicorn, uvloop, httptools", "import uvicorn, uvloop, httptools"),
    ("edgeserve.device_agent.server", "import edgeserve.device_agent.server.runner"),
]


def import_breakdown(model: Path) -> list[dict[str, Any]]:
    """RSS after each import of the serving path, in one process (``-X importtime`` gives the
    time of each; RSS is what a device pays for it)."""
    steps = [code.replace("MODEL", repr(str(model))) for _, code in IMPORT_STEPS]
    out = subprocess.run([sys.executable, "-c", _RSS_OF, *steps], check=True,
                         capture_output=True, text=True, cwd=REPO).stdout.split()
    values = [float(v) for v in out]
    rows = [{"import": "python", "rss_mb": values[0], "adds_mb": values[0]}]
    for (label, _), before, after in zip(IMPORT_STEPS, values[:-1], values[1:], strict=True):
        rows.append({"import": label, "rss_mb": after, "adds_mb": after - before})
    return rows


def _floor(kind: str, model: Path) -> float:
    """RSS of Python + the runtime + one loaded model and one call: what no agent can beat."""
    if kind == "onnx":
        code = ("import numpy as np, onnxruntime as o; s = o.InferenceSession(MODEL, "
                "providers=['CPUExecutionProvider']); i = s.get_inputs()[0]; "
                "s.run(None, {i.name: np.zeros([1, 4], np.float32)})")
    else:
        code = ("import numpy as np; from ai_edge_litert.interpreter import Interpreter; "
                "it = Interpreter(model_path=MODEL); it.allocate_tensors(); "
                "d = it.get_input_details()[0]; it.set_tensor(d['index'], "
                "np.zeros(d['shape'], d['dtype'])); it.invoke()")
    out = subprocess.run([sys.executable, "-c", _RSS_OF, code.replace("MODEL", repr(str(model)))],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[-1])


def _rss_mb(pid: int) -> float:
    with Path(f"/proc/{pid}/status").open() as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _broker_up(host: str = "127.0.0.1", port: int = 1883) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ensure_device_venv() -> Path:
    """A venv with only what a device installs (``edgeserve[agent]``): the development venv
    also holds the converter's and the fleet's packages, some of which the serving path picks
    up when present (uvicorn imports watchfiles when it is installed). Returns its bin/."""
    python = DEVICE_VENV / "bin" / "python"
    if not (DEVICE_VENV / "bin" / "edgeserve").exists():
        console.print(f"creating {DEVICE_VENV} with edgeserve[agent] only")
        subprocess.run([sys.executable, "-m", "venv", str(DEVICE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{REPO}[agent]"],
                       check=True)
    return DEVICE_VENV / "bin"


def _serve_once(command: str, cache: Path, profile: Path, key: Path, work: Path,
                bin_dir: Path | None = None) -> tuple[float, float]:
    """(RSS in MB after 50 requests, seconds from spawn to the model's ready answer). ``agent
    run`` sends 1-second windows and is measured after its first ones went out (health read,
    outbox written, MQTT published): the figure of an agent that has been running."""
    import urllib.request

    port = _free_port()
    args = [str((bin_dir or Path(sys.executable).parent) / "edgeserve"), "agent", command,
            "--cache",
            str(cache), "--profile", str(profile), "--trusted-key", str(key), "--port", str(port)]
    if command == "run":
        args += ["--broker", "mqtt://127.0.0.1:1883", "--device-id", f"bench-{os.getpid()}",
                 "--fleet", f"bench-footprint-{os.getpid()}", "--window", "1"]
    log = work / f"footprint-{command}.log"
    start = time.perf_counter()
    with log.open("wb") as sink:
        process = popen(args, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v2/models/toy/ready"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent {command} did not get ready:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.005)
        ready = time.perf_counter() - start
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "data": [0.1, 0.2, 0.3, 0.4]}]}).encode()
        infer = f"http://127.0.0.1:{port}/v2/models/toy/infer"
        for _ in range(50):
            request = urllib.request.Request(infer, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        time.sleep(2.5 if command == "run" else 0.3)
        return _rss_mb(process.pid), ready
    finally:
        _stop(process)


def bench_footprint(work: Path, key: Any, runs: int = 3, device_venv: bool = True
                    ) -> dict[str, Any]:
    installs: list[tuple[str, Path | None]] = [("development", None)]
    if device_venv:
        installs.insert(0, ("edgeserve[agent]", ensure_device_venv()))
    pkg = work / "toy.edgepkg"
    if not pkg.exists():
        build_mlp_package(pkg, key)
    rows = []
    floors = {}
    for kind in ("onnx", "tflite"):
        profile = write_profile(work / "profiles", f"footprint-{kind}",
                                f'[[artifacts]]\nformat = "{kind}"\nprecision = "fp32"\n')
        cache = work / f"cache-footprint-{kind}"
        with Agent(cache, load_profile(profile), [key.public_path]) as agent:
            agent.install(pkg)
            loaded = agent.model("toy")
            model = work / f"footprint.{kind}"
            model.write_bytes(agent.cache.read_verified(
                loaded.record.files[loaded.artifact.path], "bench"))
        floors[kind] = _floor(kind, model)
        for command in ("serve", "run"):
            if command == "run" and not _broker_up():
                console.print("no MQTT broker on 127.0.0.1:1883: 'agent run' not measured")
                continue
            for install, bin_dir in installs:
                samples = [_serve_once(command, cache, profile, key.public_path, work, bin_dir)
                           for _ in range(runs)]
                rss = sorted(s[0] for s in samples)[len(samples) // 2]
                ready = sorted(s[1] for s in samples)[len(samples) // 2]
                rows.append({"command": f"agent {command}", "install": install,
                             "artifact": kind, "rss_mb": rss, "floor_mb": floors[kind],
                             "over_floor_mb": rss - floors[kind], "ready_s": ready})
    return {"serving": rows, "imports": import_breakdown(work / "footprint.onnx")}


# -- (b) HTTP throughput ---------------------------------------------------------------------------

def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    console.print("wrk not found; trying 'apt-get install -y wrk'")
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is needed for the HTTP benchmark: apt-get install wrk")
    return found


def ensure_mlserver() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if not mlserver.exists():
        console.print(f"creating {MLSERVER_VENV} with {' '.join(MLSERVER_PINS)}")
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MLSERVER_PINS], check=True)
    return mlserver


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_ready_or_stop(url: str, process: subprocess.Popen[bytes], log: Path,
                        timeout: float) -> None:
    """:func:`_wait_ready`; a server that never got ready is stopped, not left running."""
    try:
        _wait_ready(url, process, log, timeout)
    except BaseException:
        _stop(process)
        raise


Started = tuple[subprocess.Popen[bytes], str, str]
"""A server process, its HTTP infer URL and its gRPC address."""


def start_edgeserve(cache: Path, profile: Path, workers: int, work: Path) -> Started:
    port, grpc_port = _free_port(), _free_port()
    log = work / "edgeserve.log"
    with log.open("wb") as sink:
        process = popen(
            [str(Path(sys.executable).parent / "edgeserve"), "agent", "serve", "--cache",
             str(cache), "--profile", str(profile), "--port", str(port), "--grpc-port",
             str(grpc_port), "--workers", str(workers), "--threads", "1"],
            stdout=sink, stderr=subprocess.STDOUT)
    _wait_ready_or_stop(f"http://127.0.0.1:{port}/v2/health/ready", process, log, 60)
    return process, f"http://127.0.0.1:{port}/v2/models/toy/infer", f"127.0.0.1:{grpc_port}"


def start_mlserver(onnx_path: Path, workers: int, work: Path) -> Started:
    mlserver = ensure_mlserver()
    root = work / "mlserver"
    model_dir = root / "toy"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "runtime.py").write_text(RUNTIME_PY.format(threads=1))
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": "toy", "implementation": "runtime.OnnxRuntime",
        "parameters": {"uri": str(onnx_path)}}))
    port, grpc_port = _free_port(), _free_port()
    (root / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": grpc_port, "metrics_port": _free_port(),
        "parallel_workers": workers, "debug": False, "metrics_endpoint": None}))
    log = work / "mlserver.log"
    with log.open("wb") as sink:
        process = popen([str(mlserver), "start", str(root)], cwd=model_dir, stdout=sink,
                        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(model_dir)})
    _wait_ready_or_stop(f"http://127.0.0.1:{port}/v2/models/toy/ready", process, log, 120)
    return process, f"http://127.0.0.1:{port}/v2/models/toy/infer", f"127.0.0.1:{grpc_port}"


def start_bare(onnx_path: Path, work: Path) -> Started:
    """bench/bare_server.py: the least server for the same calls, the ceiling."""
    port, grpc_port = _free_port(), _free_port()
    log = work / "bare.log"
    with log.open("wb") as sink:
        process = popen([sys.executable, str(REPO / "bench" / "bare_server.py"), str(onnx_path),
                         str(port), str(grpc_port)], stdout=sink, stderr=subprocess.STDOUT)
    _wait_ready_or_stop(f"http://127.0.0.1:{port}/v2/health/ready", process, log, 60)
    return process, f"http://127.0.0.1:{port}/v2/models/toy/infer", f"127.0.0.1:{grpc_port}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(wrk: str, url: str, body: str, connections: int, duration: int,
            work: Path) -> dict[str, float]:
    script = work / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body)}\n")
    subprocess.run([wrk, "-t1", f"-c{connections}", "-d2s", "-s", str(script), url],
                   check=True, capture_output=True)
    result = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
                             "-s", str(script), url], check=True, capture_output=True, text=True)
    out = result.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, flags=re.M))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"]),
            "requests": int(total.group(1)) if total else 0,
            "non_2xx": int(errors.group(1)) if errors else 0}


GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
BARE = "bare Starlette / grpc.aio handler (ceiling)"


def ensure_h2load() -> str:
    found = shutil.which("h2load")
    if not found:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = shutil.which("h2load")
    if not found:
        raise SystemExit("h2load is needed for the gRPC benchmark: apt-get install nghttp2-client")
    return found


def grpc_body(x: np.ndarray, work: Path) -> Path:
    """One OIP ``ModelInferRequest`` in gRPC's length-prefixed framing, for h2load to POST."""
    from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2 as pb

    request = pb.ModelInferRequest(model_name="toy", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=list(x.shape),
        contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))])
    message = request.SerializeToString()
    path = work / "grpc-body.bin"
    path.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    return path


def check_grpc(target: str, x: np.ndarray) -> None:
    """One real gRPC call, so that h2load's 200s are answers and not gRPC errors."""
    import grpc

    from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2 as pb
    from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
            model_name="toy", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="FP32", shape=list(x.shape),
                contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))]), timeout=30)
    if not reply.outputs:
        raise SystemExit(f"gRPC server {target} answered without outputs: {reply}")


def run_h2load(h2load: str, target: str, body: Path, connections: int, duration: int,
               work: Path) -> dict[str, float]:
    """gRPC unary calls over ``connections`` HTTP/2 connections, one stream each (like wrk's
    connections); latency percentiles from h2load's per-request log."""
    url = f"http://{target}{GRPC_PATH}"
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    subprocess.run([h2load, "-c", str(connections), "-m", "1", "-D", "2", *headers, "-d",
                    str(body), url], check=True, capture_output=True)
    log = work / "h2load.log"
    out = subprocess.run([h2load, "-c", str(connections), "-m", "1", "-D", str(duration),
                          *headers, "-d", str(body), "--log-file", str(log), url], check=True,
                         capture_output=True, text=True).stdout
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    latencies = np.array([int(r[2]) for r in rows if r[1] == "200"], dtype=np.float64) / 1000
    failed = sum(1 for r in rows if r[1] != "200")
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    return {"rps": float(rps.group(1)) if rps else len(latencies) / duration,
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "requests": len(rows), "non_2xx": failed}


def bench_http(work: Path, key: Any, duration: int, workers: int,
               mlserver_workers: list[int], repeats: int) -> list[dict[str, Any]]:
    wrk = ensure_wrk()
    pkg = work / "toy.edgepkg"
    if not pkg.exists():
        build_mlp_package(pkg, key, tflite=False)
    profile = write_profile(work / "profiles", "bench-http", '[[artifacts]]\nformat = "onnx"\n'
                                                             'precision = "fp32"\n')
    cache = work / "cache-http"
    with Agent(cache, load_profile(profile), [key.public_path]) as agent:
        agent.install(pkg)
        onnx_path = work / "toy.onnx"
        record = agent.cache.record("toy", "1.0.0")
        onnx_path.write_bytes(agent.cache.read_verified(record.files["artifacts/toy.onnx"], "x"))
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    body_file = grpc_body(x, work)
    h2load = ensure_h2load()
    servers: list[tuple[str, Callable[[], Started]]] = [
        (f"edgeserve (workers={workers})", lambda: start_edgeserve(cache, profile, workers, work))]
    for n in mlserver_workers:
        servers.append((f"MLServer 1.7.1 (parallel_workers={n})",
                        lambda n=n: start_mlserver(onnx_path, n, work)))
    servers.append((BARE, lambda: start_bare(onnx_path, work)))
    # All servers run at once (idle ones cost nothing) and the runs alternate between them, so
    # a burst from another process on this shared machine hits every server alike; the
    # median of the repeats is reported.
    started: list[tuple[str, subprocess.Popen[bytes], str, str]] = []
    try:
        for label, start in servers:
            process, url, target = start()
            started.append((label, process, url, target))
            check_grpc(target, x)
        samples: dict[tuple[str, str, int], list[dict[str, float]]] = {}
        for _ in range(repeats):
            for protocol in ("http", "grpc"):
                for connections in (1, 8):
                    for label, _, url, target in started:
                        stats = (run_wrk(wrk, url, body, connections, duration, work)
                                 if protocol == "http" else
                                 run_h2load(h2load, target, body_file, connections, duration,
                                            work))
                        samples.setdefault((protocol, label, connections), []).append(stats)
                        console.print(f"  {protocol} {label} c={connections}: "
                                      f"{stats['rps']:.0f} req/s, p50 {stats['p50_ms']:.2f} ms, "
                                      f"p99 {stats['p99_ms']:.2f} ms")
    finally:
        for _, process, _, _ in started:
            _stop(process)
    rows = []
    for (protocol, label, connections), runs in samples.items():
        runs.sort(key=lambda r: r["rps"])
        median = runs[len(runs) // 2]
        rows.append({"protocol": protocol, "server": label, "concurrency": connections, **median,
                     "runs": [{k: r[k] for k in ("rps", "p50_ms", "p99_ms")} for r in runs]})
    rows.sort(key=lambda r: (r["protocol"] != "http", r["concurrency"],
                             [s[0] for s in servers].index(r["server"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per in-process round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--workers", type=int, default=2, help="inference workers, both servers")
    parser.add_argument("--repeats", type=int, default=3, help="wrk runs per server and load")
    parser.add_argument("--parts", default="abcd",
                        help="which parts to run, e.g. 'c' for dynamic batching alone")
    parser.add_argument("--no-tflite-batching", action="store_true",
                        help="(c): skip the LiteRT batch-N variant (it converts with onnx2tf)")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-footprint", action="store_true")
    parser.add_argument("--no-device-venv", action="store_true",
                        help="(d): measure only this venv, not also one with edgeserve[agent] "
                             "alone (made once in bench/.venv-agent)")
    parser.add_argument("--batch-seconds", type=float, default=8.0,
                        help="seconds per dynamic-batching run")
    parser.add_argument("--mlserver-inline", action="store_true",
                        help="also run MLServer with parallel_workers=0 (inference in its loop)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "agent.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"load_before": _load(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="edgeserve-bench-") as tmp:
        work = Path(tmp)
        key = make_keypair(work / "keys")
        if "a" in args.parts:
            console.rule("(a) in-process predict vs bare runtime")
            rows = bench_inprocess(work, key, args.calls, args.rounds)
            results["inprocess"] = rows
            table = Table("model", "runtime", "bare µs/call", "agent µs/call", "overhead µs",
                          "of which layout µs", "ratio")
            for r in rows:
                table.add_row(r["model"], r["runtime"], f"{r['bare_us']:.2f}",
                              f"{r['agent_us']:.2f}", f"{r['overhead_us']:.2f}",
                              f"{r['layout_us']:.2f}", f"{r['ratio']:.3f}")
            console.print(table)
        if "c" in args.parts:
            console.rule("(c) dynamic batching: 8 threads calling predict, ~1 ms CNNs")
            batching = bench_batching(work, key, args.batch_seconds,
                                      tflite=not args.no_tflite_batching)
            results["batching"] = batching
            table = Table("model", "mode", "one call ms", "req/s", "p50 ms", "p99 ms",
                          "mean batch")
            for r in batching:
                table.add_row(r["model"], r["mode"], f"{r['single_ms']:.2f}", f"{r['rps']:.0f}",
                              f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                              f"{r['mean_batch']:.1f}")
            console.print(table)
            for plain, stacked in zip(batching[::2], batching[1::2], strict=True):
                console.print(f"{plain['model']}: batched/unbatched throughput "
                              f"{stacked['rps'] / plain['rps']:.2f}x; batched p99 "
                              f"{stacked['p99_ms']:.2f} ms vs 2 x unbatched p50 + delay "
                              f"{2 * plain['p50_ms'] + 2.0:.2f} ms")
        if "d" in args.parts and not args.skip_footprint:
            console.rule("(d) footprint: RSS and start-up, one small model")
            footprint = bench_footprint(work, key, device_venv=not args.no_device_venv)
            results["footprint"] = footprint
            table = Table("command", "install", "artifact", "RSS MB", "runtime floor MB",
                          "over floor MB", "ready in s")
            for r in footprint["serving"]:
                table.add_row(r["command"], r["install"], r["artifact"], f"{r['rss_mb']:.1f}",
                              f"{r['floor_mb']:.1f}", f"{r['over_floor_mb']:.1f}",
                              f"{r['ready_s']:.2f}")
            console.print(table)
            table = Table("import (serving path order)", "RSS MB", "adds MB")
            for r in footprint["imports"]:
                table.add_row(r["import"], f"{r['rss_mb']:.1f}", f"{r['adds_mb']:.1f}")
            console.print(table)
        if "b" in args.parts and not args.skip_http:
            console.rule("(b) HTTP and gRPC: edgeserve vs MLServer (wrk and h2load, batch 1)")
            extra = [0] if args.mlserver_inline else []
            http = bench_http(work, key, args.duration, args.workers, [args.workers, *extra],
                              args.repeats)
            results["http"] = http
            table = Table("protocol", "server", "concurrency", "req/s (median run)", "p50 ms",
                          "p99 ms", "failed")
            for r in http:
                table.add_row(r["protocol"], r["server"], str(r["concurrency"]),
                              f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                              str(r["non_2xx"]))
            console.print(table)
            base = {(r["protocol"], r["concurrency"]): r for r in http
                    if r["server"].startswith("edgeserve")}
            for r in http:
                if not r["server"].startswith("edgeserve"):
                    mine = base[r["protocol"], r["concurrency"]]
                    console.print(f"{r['protocol']} c={r['concurrency']} vs {r['server']}: "
                                  f"{mine['rps'] / r['rps']:.2f}x throughput, p99 "
                                  f"{mine['p99_ms']:.2f} vs {r['p99_ms']:.2f} ms")
    results["load_after"] = _load()
    console.print(f"load average before {results['load_before']}, after {results['load_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
