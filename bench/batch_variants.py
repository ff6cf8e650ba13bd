"""Batch-N variants on real models: which ones get one, and does batching through it answer
every request as the unbatched agent does?

    .venv/bin/python bench/batch_variants.py                   # every model of bench/real_models.py
    .venv/bin/python bench/batch_variants.py magika nudenet    # some
    .venv/bin/python bench/batch_variants.py --batch 8

Each model is converted (``edgeserve.converters.convert``) for a LiteRT profile asking for
``tflite fp32`` with ``[batching] static_batch = N``. Where the variant passed, two agents
install the package — one batching (``BatchPolicy(8, 5000)``, so it loads the variant), one
plain — and up to 48 evaluation samples are sent one per request from 8 threads to the first;
each answer is compared with the plain agent's for the same sample. Results are printed and
written to ``bench/out/batch_variants.json`` (docs/benchmarks.md, part (c)).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.real_models import MODELS, load  # noqa: E402
from edgeserve.converters import convert  # noqa: E402
from edgeserve.device_agent import Agent  # noqa: E402
from edgeserve.device_agent.batching import BatchingRuntime, BatchPolicy, PaddedRuntime  # noqa: E402
from edgeserve.profiles import load_profile  # noqa: E402
from edgeserve.testing import KeyPair, make_keypair, write_test_profile  # noqa: E402

console = Console()
THREADS = 8
REQUESTS = 48


def _through_the_agent(work: Path, name: str, package: Path, profile: Path, key: KeyPair,
                       samples: dict[str, np.ndarray]) -> dict[str, Any]:
    """Concurrent one-sample requests to a batching agent against a plain one."""
    device = load_profile(profile)
    count = min(REQUESTS, len(next(iter(samples.values()))))
    answers: dict[int, dict[str, np.ndarray]] = {}
    errors: list[str] = []
    with Agent(work / f"{name}-batched", device, [key.public_path], concurrency=THREADS,
               batching={name: BatchPolicy(8, 5000)}) as batched, \
            Agent(work / f"{name}-plain", device, [key.public_path]) as plain:
        batched.install(package)
        plain.install(package)
        loaded = batched.model(name)
        runtime = loaded.runtime

        def client(first: int) -> None:
            try:
                for i in range(first, count, THREADS):
                    answers[i] = batched.predict(name, {k: v[i:i + 1] for k, v in
                                                        samples.items()}).outputs
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        worst = 0.0
        for i, outputs in answers.items():
            alone = plain.predict(name, {k: v[i:i + 1] for k, v in samples.items()}).outputs
            for tensor, value in outputs.items():
                a, b = np.asarray(value), np.asarray(alone[tensor])
                worst = max(worst, float(np.abs(a.astype(np.float64) - b).max())
                            if a.dtype.kind in "fiu" else float(not np.array_equal(a, b)))
        return {"variant_loaded": isinstance(runtime, BatchingRuntime)
                and isinstance(runtime.runtime, PaddedRuntime),
                "requests": len(answers), "errors": errors[:3],
                "calls": getattr(runtime, "batches", None),
                "largest_difference": worst}


def run_model(name: str, work: Path, key: KeyPair, profile: Path, batch: int) -> dict[str, Any]:
    model = load(name)
    options = {k: v for k, v in model.options.items() if v is not None}
    started = time.monotonic()
    result = convert(model.source, profiles=[str(profile)], name=name, version="1.0.0",
                     calibration=model.calibration, evaluation=model.evaluation,
                     out=work / name, sign_key=key.private, show_progress=False,
                     keep_going=True, **options)
    artifacts = {a["id"]: {"status": a["validation"].get("status"), "error": a["error"]}
                 for a in result.report["artifacts"]}
    row: dict[str, Any] = {"model": name, "convert_s": round(time.monotonic() - started, 1),
                           "artifacts": artifacts}
    variant = artifacts.get(f"tflite-fp32-b{batch}", {})
    if result.package is not None and variant.get("status") in ("passed", "warned"):
        samples = {k: v for k, v in model.evaluation.items() if k != "labels"}
        row["agent"] = _through_the_agent(work, name, result.package, profile, key, samples)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=4, help="the variant's batch (N)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "batch_variants.json")
    args = parser.parse_args()
    names = args.models or list(MODELS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeserve-variants-") as tmp, Progress() as bar:
        work = Path(tmp)
        key = make_keypair(work / "keys", "bench")
        profile = write_test_profile(
            work / "profiles", "bench-variants",
            f'[[artifacts]]\nformat = "tflite"\nprecision = "fp32"\n\n[batching]\n'
            f"static_batch = {args.batch}\n", runtimes="[runtimes.litert]\n")
        task = bar.add_task("converting and serving", total=len(names))
        for name in names:
            bar.update(task, description=name)
            try:
                rows.append(run_model(name, work, key, profile, args.batch))
            except Exception as exc:  # one model's failure is a result, not the end of the run
                rows.append({"model": name, "failed": f"{type(exc).__name__}: {exc}"[:500]})
            bar.advance(task)
    table = Table("model", f"batch-{args.batch} variant", "agent calls / requests",
                  "largest difference from unbatched")
    for row in rows:
        variant = row.get("artifacts", {}).get(f"tflite-fp32-b{args.batch}", {})
        agent = row.get("agent")
        table.add_row(row["model"], row.get("failed") or f"{variant.get('status')}"
                      + (f": {variant['error'][:90]}" if variant.get("error") else ""),
                      f"{agent['calls']} / {agent['requests']}" if agent else "–",
                      f"{agent['largest_difference']:.3g}" if agent else "–")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    console.print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
