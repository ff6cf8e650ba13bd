"""Per-arm evidence from the stored telemetry windows: feedback sums and merged latency.

An arm is a version: every window of the experiment's model and one of its versions, from a
device in scope, starting after that device reported the experiment's split applied, adds its
request count, its ``feedback`` sums and (for ``p95_ms``) its latency histogram to that
version's :class:`ArmData` in the device's group. Histograms merge exactly, so an arm's p95 is
the p95 of all its requests. (Counting a device only once it routes by the split keeps the
control arm free of the traffic it served alone before the experiment, and every arm measured
over the same span.)

Windows are validated against the contract when they arrive; here feedback is also checked for
consistency with the experiment (labels within feedback counts, rewards of a binary experiment
within [0, 1]): a window that fails is left out of the arm and counted in ``rejected`` with the
first reason, so one misbehaving device cannot skew a result unnoticed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from edgeserve.telemetry import LatencyHistogram

from ..store import Store
from ..tables import windows
from .spec import ExperimentSpec
from .stats import ArmStats

__all__ = ["ArmData", "Collected", "Evidence", "check_feedback", "collect"]


@dataclass
class ArmData:
    """Everything one arm (version) has collected, in one group or pooled."""

    requests: int = 0
    errors: int = 0
    feedback: int = 0
    rewarded: int = 0
    reward_sum: float = 0.0
    reward_sumsq: float = 0.0
    correct: int = 0
    labeled: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def merge(self, other: ArmData) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.feedback += other.feedback
        self.rewarded += other.rewarded
        self.reward_sum += other.reward_sum
        self.reward_sumsq += other.reward_sumsq
        self.correct += other.correct
        self.labeled += other.labeled
        self.latency.merge(other.latency)

    def stats(self, metric: str) -> ArmStats:
        """Sufficient statistics of the metric (``p95_ms``: the request count only)."""
        if metric == "accuracy":
            return ArmStats(n=self.labeled, total=float(self.correct), total_sq=float(self.correct))
        if metric == "reward":
            return ArmStats(n=self.rewarded, total=self.reward_sum, total_sq=self.reward_sumsq)
        return ArmStats(n=self.latency.count, total=0.0, total_sq=0.0)

    def samples(self, metric: str) -> int:
        return self.stats(metric).n


@dataclass
class Collected:
    """Arms per group (``"*"`` when the experiment is not per group), and what was left out."""

    groups: dict[str, dict[str, ArmData]]
    rejected: int = 0
    rejected_reason: str | None = None

    def pooled(self) -> dict[str, ArmData]:
        arms: dict[str, ArmData] = {}
        for group in self.groups.values():
            for version, data in group.items():
                arms.setdefault(version, ArmData()).merge(data)
        return arms


def check_feedback(feedback: Mapping[str, Any], binary: bool) -> str | None:
    """Why a window's feedback sums cannot be right (None when they are consistent)."""
    count = int(feedback.get("count", 0))
    rewarded = feedback.get("rewarded")
    n_reward = count if rewarded is None else int(rewarded)
    labeled, correct = int(feedback.get("labeled", 0)), int(feedback.get("correct", 0))
    reward_sum = float(feedback.get("reward_sum", 0.0))
    reward_sumsq = float(feedback.get("reward_sumsq", 0.0))
    if not (math.isfinite(reward_sum) and math.isfinite(reward_sumsq)):
        return "reward sums are not finite"
    if labeled > count or correct > labeled or n_reward > count:
        return (f"inconsistent counts (count {count}, rewarded {n_reward}, labeled {labeled}, "
                f"correct {correct})")
    if binary and not (-1e-9 <= reward_sum <= n_reward + 1e-9
                       and abs(reward_sumsq - reward_sum) <= 1e-6 * max(1.0, n_reward)):
        return (f"rewards are not 0/1 (sum {reward_sum:g}, sum of squares {reward_sumsq:g} over "
                f"{n_reward}); use a continuous experiment for other rewards")
    return None


def _add(data: ArmData, window: Mapping[str, Any], spec: ExperimentSpec) -> str | None:
    feedback = window.get("feedback")
    if isinstance(feedback, dict):
        reason = check_feedback(feedback, spec.binary)
        if reason is not None:
            return reason
        count = int(feedback.get("count", 0))
        rewarded = feedback.get("rewarded")
        data.feedback += count
        data.rewarded += count if rewarded is None else int(rewarded)
        data.reward_sum += float(feedback.get("reward_sum", 0.0))
        data.reward_sumsq += float(feedback.get("reward_sumsq", 0.0))
        data.correct += int(feedback.get("correct", 0))
        data.labeled += int(feedback.get("labeled", 0))
    data.requests += int(window.get("requests", 0) or 0)
    data.errors += int(window.get("errors", 0) or 0)
    latency = window.get("latency")
    if spec.metric == "p95_ms" and isinstance(latency, dict):
        data.latency.merge(LatencyHistogram.from_data(latency))
    return None


def collect(store: Store, spec: ExperimentSpec, starts: Mapping[str, float],
            device_groups: Mapping[str, str]) -> Collected:
    """Evidence per group and arm from the windows of devices in ``device_groups`` (device id →
    group) that start at or after the device's time in ``starts`` (devices without one have
    not joined yet). Reads every window of the experiment; :class:`Evidence` is the same,
    kept up to date tick by tick."""
    joined = {d: t for d, t in starts.items() if d in device_groups}
    per_device = {d: _DeviceEvidence(t) for d, t in joined.items()}
    if joined:
        with store.read() as conn:
            for row in conn.execute(_rows(spec, min(joined.values()))):
                evidence = per_device.get(row.device_id)
                if evidence is not None:
                    evidence.add(row, spec)
    return _combine(spec, per_device, device_groups)


# Windows are re-read from this long before the newest ``received`` stamp read so far: a row
# stamped earlier but committed later (a slow ingest transaction, another fleet process) is
# still found. Rows already counted are recognised by their seq.
_RECEIVED_SLACK_S = 120.0
# Everything is recomputed from the store this often, whatever happened in between (a
# clock step on the fleet host, a row deleted by retention).
_FULL_EVERY_S = 900.0


class _DeviceEvidence:
    """One device's windows counted so far, per arm, from its join time on."""

    __slots__ = ("arms", "rejected", "rejected_reason", "seen", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.arms: dict[str, ArmData] = {}
        self.seen: set[int] = set()
        self.rejected = 0
        self.rejected_reason: str | None = None

    def add(self, row: Any, spec: ExperimentSpec) -> None:
        if row.window_start < self.start or row.seq in self.seen:
            return
        self.seen.add(row.seq)
        data = self.arms.setdefault(row.version, ArmData())
        reason = _add(data, json.loads(row.data), spec)
        if reason is not None:
            self.rejected += 1
            self.rejected_reason = self.rejected_reason or \
                f"{row.device_id} {row.version}: {reason}"


def _rows(spec: ExperimentSpec, since: float) -> sa.Select[Any]:
    return sa.select(windows.c.device_id, windows.c.seq, windows.c.version,
                     windows.c.window_start, windows.c.received, windows.c.data).where(
        windows.c.model == spec.model, windows.c.version.in_(list(spec.arms)),
        windows.c.window_start >= since)


def _combine(spec: ExperimentSpec, per_device: Mapping[str, _DeviceEvidence],
             device_groups: Mapping[str, str]) -> Collected:
    result = Collected(groups={group: {v: ArmData() for v in spec.arms}
                               for group in sorted(set(device_groups.values()))})
    for device_id in sorted(per_device):
        evidence = per_device[device_id]
        group = result.groups[device_groups[device_id]]
        for version, data in evidence.arms.items():
            group[version].merge(data)
        result.rejected += evidence.rejected
        result.rejected_reason = result.rejected_reason or evidence.rejected_reason
    return result


class Evidence:
    """:func:`collect` for one experiment, kept up to date from the windows that arrived since
    the previous call instead of re-reading all of them on every tick (an experiment running
    for days over hundreds of devices has hundreds of thousands of windows).

    Per device it keeps its arms' sums, the seqs it counted and the join time they were
    counted from. A device that joins (or rejoins at another time) is recomputed from its own
    windows, so windows stored before the controller saw it join are not lost; other windows
    are read by their ``received`` stamp (the fleet's clock when it stored them) from a little
    before the newest one read so far, and recognised by seq when read twice. Every
    ``_FULL_EVERY_S`` (by ``clock``) everything is recomputed.
    """

    def __init__(self, spec: ExperimentSpec, clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.clock = clock
        self._devices: dict[str, _DeviceEvidence] = {}
        self._newest: float | None = None  # the newest ``received`` read
        self._full_at: float | None = None

    def update(self, store: Store, starts: Mapping[str, float],
               device_groups: Mapping[str, str]) -> Collected:
        now = self.clock()
        if self._full_at is None or now - self._full_at >= _FULL_EVERY_S:
            self._devices, self._newest, self._full_at = {}, None, now
        joined = {d: t for d, t in starts.items() if d in device_groups}
        for device_id in [d for d in self._devices if d not in joined]:
            del self._devices[device_id]  # left the scope: its evidence no longer counts
        fresh = {d: _DeviceEvidence(t) for d, t in joined.items()
                 if d not in self._devices or self._devices[d].start != t}
        spec = self.spec
        with store.read() as conn:
            if fresh:
                since = min(e.start for e in fresh.values())
                ids = sorted(fresh)
                for chunk in range(0, len(ids), 500):
                    query = _rows(spec, since).where(
                        windows.c.device_id.in_(ids[chunk:chunk + 500]))
                    for row in conn.execute(query):
                        fresh[row.device_id].add(row, spec)
                        self._saw(row.received)
            if self._devices.keys() - fresh.keys():  # devices to bring up to date
                query = _rows(spec, min(joined.values()))
                if self._newest is not None:
                    query = query.where(windows.c.received >= self._newest - _RECEIVED_SLACK_S)
                for row in conn.execute(query):
                    evidence = self._devices.get(row.device_id)
                    if evidence is not None and row.device_id not in fresh:
                        evidence.add(row, spec)
                    self._saw(row.received)
        self._devices.update(fresh)
        return _combine(spec, self._devices, device_groups)

    def _saw(self, received: float) -> None:
        if self._newest is None or received > self._newest:
            self._newest = received
