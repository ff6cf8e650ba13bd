"""The experiment controller's evidence per tick: a full read of every window against the
incremental :class:`~edgeserve.fleet.experiments.collect.Evidence`, on the same store in one run.

A store holds ``N`` windows of a running A/B test (200 devices, two arms, feedback and a latency
histogram in each, written by the ingestion's own ``store_windows``). Then, ten times: one tick's
worth of new windows arrives (one per device) and the evidence is brought up to date - by
``collect`` (what every tick cost before) and by ``Evidence.update`` - and both results are
checked to be equal. SQLite, and PostgreSQL when it is reachable.

    .venv/bin/python bench/evidence.py [--windows 10000 100000] [--record]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edgeserve.contract import Window
from edgeserve.fleet.experiments import ExperimentSpec
from edgeserve.fleet.experiments.collect import Collected, Evidence, collect
from edgeserve.fleet.registry import ensure_devices
from edgeserve.fleet.store import Store
from edgeserve.fleet.telemetry import store_windows, window_row
from edgeserve.telemetry import LatencyHistogram
from edgeserve.testing import postgres_schema

console = Console()
DEVICES = 200
TICKS = 10
SPEC = ExperimentSpec.model_validate({"id": "bench", "model": "m", "kind": "ab",
                                      "arms": {"a": 50, "b": 50}, "min_samples": 10 ** 9})


def _window(device: int, seq: int, start: float, latency: Any) -> Window:
    wins = (device * 7 + seq) % 11
    return Window(seq=seq, start=start, end=start + 60, model="m",
                  version="a" if (device + seq) % 2 else "b", requests=20,
                  feedback={"count": 10, "rewarded": 10, "reward_sum": float(wins % 10),
                            "reward_sumsq": float(wins % 10)},  # type: ignore[arg-type]
                  latency=latency)


def _fill(store: Store, count: int, progress: Progress) -> tuple[int, float]:
    hist = LatencyHistogram()
    for k in range(40):
        hist.add(2.0 + k / 8)
    latency = hist.to_data()
    devices = [f"d{i:03d}" for i in range(DEVICES)]
    with store.write() as conn:
        ensure_devices(store, conn, devices, 0.0)
    per_device = count // DEVICES
    task = progress.add_task(f"{count:,} windows", total=per_device)
    for seq in range(1, per_device + 1):
        start = 1_000_000.0 + 60 * seq
        rows = [window_row(devices[d], _window(d, seq, start, latency), start + 60)
                for d in range(DEVICES)]
        with store.write() as conn:
            store_windows(store, conn, rows, start + 60)
        progress.advance(task)
    if store.dialect == "postgresql":
        # what autovacuum does to a table that grew: without statistics the planner reads
        # the whole (model, version, window_start) index instead of the received one
        with store.write() as conn:
            conn.execute(sa.text("ANALYZE windows"))
    return per_device, 1_000_000.0


def _same(a: Collected, b: Collected) -> bool:
    def key(c: Collected) -> Any:
        return sorted((g, v, d.requests, d.rewarded, round(d.reward_sum, 6))
                      for g, arms in c.groups.items() for v, d in arms.items())
    return key(a) == key(b) and a.rejected == b.rejected


def measure(store: Store, count: int, progress: Progress) -> dict[str, Any]:
    last_seq, origin = _fill(store, count, progress)
    starts = {f"d{i:03d}": origin for i in range(DEVICES)}
    groups = dict.fromkeys(starts, "*")
    evidence = Evidence(SPEC)
    evidence.update(store, starts, groups)  # the first tick reads everything, as collect does
    hist = LatencyHistogram()
    hist.add(3.0)
    full, incremental = [], []
    task = progress.add_task(f"ticks over {count:,}", total=TICKS)
    for tick in range(TICKS):
        seq = last_seq + 1 + tick
        start = origin + 60 * seq
        rows = [window_row(f"d{d:03d}", _window(d, seq, start, hist.to_data()), start + 60)
                for d in range(DEVICES)]
        with store.write() as conn:
            store_windows(store, conn, rows, start + 60)
        began = time.perf_counter()
        expected = collect(store, SPEC, starts, groups)
        full.append(time.perf_counter() - began)
        began = time.perf_counter()
        got = evidence.update(store, starts, groups)
        incremental.append(time.perf_counter() - began)
        if not _same(expected, got):
            raise SystemExit(f"incremental evidence differs from a full read at tick {tick}")
        progress.advance(task)
    full_ms = statistics.median(full) * 1000
    inc_ms = statistics.median(incremental) * 1000
    return {"windows": count + TICKS * DEVICES, "full_ms": full_ms, "incremental_ms": inc_ms,
            "ratio": full_ms / inc_ms}


@contextmanager
def _postgres(url: str) -> Iterator[str | None]:
    host = re.search(r"@([^:/]+)(?::(\d+))?", url)
    address = (host.group(1), int(host.group(2) or 5432)) if host else ("127.0.0.1", 5432)
    try:
        socket.create_connection(address, timeout=1).close()
        import psycopg
    except (OSError, ImportError):
        yield None
        return
    try:
        with psycopg.connect(url, autocommit=True):
            pass
    except psycopg.OperationalError:
        yield None
        return
    with postgres_schema(url, "bench") as scoped:
        yield scoped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--pg", default=os.environ.get(
        "EDGESERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--record", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    results = []
    with Progress(console=console) as progress:
        for count in args.windows:
            with tempfile.TemporaryDirectory() as work:
                store = Store.open(f"sqlite:///{Path(work) / 'fleet.db'}")
                try:
                    results.append(("SQLite", measure(store, count, progress)))
                finally:
                    store.close()
            with _postgres(args.pg) as url:
                if url is None:
                    console.print(f"PostgreSQL not reachable at {args.pg}: skipped")
                    continue
                store = Store.open(url)
                try:
                    results.append(("PostgreSQL", measure(store, count, progress)))
                finally:
                    store.close()
    table = Table(title=f"evidence per tick ({DEVICES} devices, {DEVICES} new windows a tick)")
    for column in ("store", "windows", "full read ms", "incremental ms", "ratio"):
        table.add_column(column)
    for name, r in results:
        table.add_row(name, f"{r['windows']:,}", f"{r['full_ms']:.0f}",
                      f"{r['incremental_ms']:.1f}", f"{r['ratio']:.0f}x")
    console.print(table)
    if args.record:
        _record(results)


def _record(results: list[tuple[str, dict[str, Any]]]) -> None:
    path = Path(__file__).parents[1] / "docs" / "benchmarks.md"
    text = path.read_text()
    rows = "".join(f"| {name} | {r['windows']:,} | {r['full_ms']:.0f} | "
                   f"{r['incremental_ms']:.1f} | {r['ratio']:.0f}× |\n" for name, r in results)
    section = (
        "## Experiment evidence per tick\n\n"
        "`.venv/bin/python bench/evidence.py --record` - the experiment controller brings each "
        "running experiment's evidence up to date once a tick (1 s). A store holds an A/B "
        f"test's windows from {DEVICES} devices (feedback and a latency histogram in each); "
        f"each tick {DEVICES} new windows arrive. *Full read* is `collect` (every window of the "
        "experiment, what every tick cost before); *incremental* is `Evidence.update` (the "
        "windows received since the previous tick, plus a full recompute every 15 minutes). "
        f"Medians of {TICKS} ticks; both results are checked equal at every tick. Load average "
        f"{os.getloadavg()[0]:.1f}.\n\n"
        "| store | windows | full read ms | incremental ms | ratio |\n|---|---|---|---|---|\n"
        f"{rows}\n"
        "The full read grows with the experiment's age (about 8 hours of 60 s windows from 200 "
        "devices is 100,000 windows); the incremental update with the traffic of one tick "
        "(plus two minutes of windows re-read to catch late commits, skipped by seq). It reads "
        "through the `(model, received)` index of migration 0005; on PostgreSQL the bench runs "
        "`ANALYZE` after the bulk fill, as autovacuum would - without table statistics the "
        "planner scanned the other index and an update took ~28 ms at 100,000 windows.\n")
    pattern = re.compile(r"## Experiment evidence per tick\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _m: section.rstrip("\n"), text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


if __name__ == "__main__":
    main()
