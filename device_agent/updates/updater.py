"""Apply desired state on the device: fetch, verify, stage, activate, health-check, commit or roll back.

The MQTT link hands every ``Desired`` message to :meth:`Updater.submit`; a worker thread applies
only the newest revision (older or equal revisions are ignored, so a retained message replayed on
reconnect changes nothing) and reports progress and outcome through the ``report`` callback,
which the link publishes (retained) on ``devices/{id}/reported``.

Per model, in order:

1. every version the model needs (active, traffic arms, shadow) that is not installed is fetched
   and staged (see :mod:`.fetch`) — a failure leaves the running version serving and is reported;
2. if the active version changes: activate (atomic), run the package's sample check, then watch the
   first ``min_inferences`` live requests (:mod:`.health`); healthy → *committed*, otherwise the
   previous version is re-activated by itself and the reason reported (*rolled-back*). A first
   version has nothing to return to: it keeps serving and is reported *unhealthy* (the fleet's
   rollout then decides, e.g. removes it);
3. traffic weights and the shadow version are applied through the router / shadow runner when the
   agent provides them.

A new version of a model whose earlier version is in the cache is fetched as deltas where the
fleet offers them (:mod:`.delta`); each report's ``delivery`` says how many bytes crossed the
network against the full size, and how many deltas were refused and fetched in full.

Delivery on a flaky link is normal, not a failure: a download that is cut, times out or meets a
busy server is retried within the same revision with jittered exponential back-off, each attempt
resuming where the last stopped (HTTP Range, or the next chunk), and reported as *retrying* with
the reason. The revision counts as applied only once every model is delivered — or a version
failed verification, could never be served (e.g. HTTP 404), or kept failing past
``delivery_deadline_s``, which is reported as *failed*. A newer revision replaces a pending retry.

State (revision applied, per-model reports, watches in progress) is persisted, so a reboot neither
repeats nor loses an update; a retry in progress resumes from the retained desired state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from edgeserve.contract import (
    Delivery,
    Desired,
    DesiredModel,
    ErrorInfo,
    HealthPolicy,
    ModelReport,
    Reported,
)
from edgeserve.errors import EdgeserveError, ModelNotFoundError, TransferError
from edgeserve.package import atomic_write

from ..agent import Agent
from .delta import DeltaStats
from .fetch import MqttTransport, fetch_version
from .health import HealthWatch

__all__ = ["RetryPolicy", "Updater"]

log = logging.getLogger(__name__)
_PROGRESS_EVERY_S = 1.0
_LOCAL_CHECK_S = 2.0
"""How often the worker looks for versions activated outside it (see report_local_changes)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a device keeps trying to obtain a version named by desired state."""

    min_s: float = 1.0
    """first wait after a cut download; doubles per attempt (full jitter)"""
    max_s: float = 300.0
    """longest wait between two attempts"""
    deadline_s: float = 24 * 3600.0
    """give up (report *failed*) when a version could not be delivered for this long"""

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.max_s, self.min_s * 2.0 ** min(attempt - 1, 30))
        return float(rng.uniform(0.5, 1.0) * cap)


@dataclass
class _Delivery:
    """Attempts at one (model, version) that have not succeeded yet."""

    attempts: int = 0
    since: float = field(default_factory=time.monotonic)
    stats: DeltaStats = field(default_factory=DeltaStats)
    """bytes received, deltas and fallbacks over every attempt"""


class _DeliveryPending(Exception):
    """A version could not be obtained this time; the same revision is tried again later."""

    def __init__(self, error: TransferError, attempts: int, wait_s: float) -> None:
        super().__init__(str(error))
        self.error, self.attempts, self.wait_s = error, attempts, wait_s


class Updater:
    def __init__(self, agent: Agent, device_id: str, state_dir: Path,
                 report: Callable[[Reported], None] | None = None,
                 mqtt: MqttTransport | None = None,
                 retry: RetryPolicy | None = None,
                 artifact_origins: Sequence[str] = ()) -> None:
        self.agent = agent
        self.artifact_origins = tuple(artifact_origins)
        """where HTTP downloads may come from (``scheme://host[:port]``); empty: anywhere the
        fleet's signed desired state names"""
        self.device_id = device_id
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.mqtt = mqtt
        self.retry = retry or RetryPolicy()
        self._report_cb = report
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: Desired | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._watches: dict[str, tuple[HealthWatch, str | None]] = {}
        self._deliveries: dict[tuple[str, str], _Delivery] = {}
        self._retry_at: tuple[float, Desired] | None = None
        self._rng = random.Random()
        self._last_progress = 0.0
        self.bytes_downloaded = 0
        self.delivery_retries = 0
        self.revision, self.models = self._load()
        self.delta_fallbacks = max((r.delivery.fallbacks_total for r in self.models.values()
                                    if r.delivery is not None), default=0)
        """deltas refused on this device (fetched in full instead), reported with each delivery"""
        self._published_active: dict[str, str] | None = None
        self._local_checked = 0.0
        self._resume_watches()

    # -- persistence ------------------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "updater.json"

    def _load(self) -> tuple[int, dict[str, ModelReport]]:
        try:
            data = json.loads(self._state_file.read_text())
            models = {k: ModelReport.model_validate(v) for k, v in data.get("models", {}).items()}
            return int(data.get("revision", 0)), models
        except FileNotFoundError:
            return 0, {}
        except (ValueError, TypeError, EdgeserveError) as exc:
            log.warning("updater state unreadable (%s); starting from revision 0", exc)
            return 0, {}

    def _save(self) -> None:
        data: dict[str, Any] = {
            "revision": self.revision,
            "models": {k: v.model_dump(mode="json") for k, v in self.models.items()},
        }
        atomic_write(self._state_file, json.dumps(data).encode())

    def _resume_watches(self) -> None:
        """A reboot during a health check restarts the watch on the version that was active."""
        for name, report in self.models.items():
            if report.state == "health-check" and report.target:
                self._start_watch(name, report.target, report.previous, None)

    # -- reporting --------------------------------------------------------------------------------

    def current_report(self) -> Reported:
        with self._lock:
            models = {}
            for name, report in self.models.items():
                try:
                    installed = sorted(v.version for v in self.agent.list_models()
                                       if v.name == name)
                    active = self.agent.active_version(name)
                except EdgeserveError:
                    installed, active = [], None
                models[name] = report.model_copy(update={"installed": installed,
                                                         "active": active})
            return Reported(device_id=self.device_id, revision=self.revision, models=models)

    def _publish(self) -> None:
        if self._report_cb is not None:
            try:
                report = self.current_report()
                self._report_cb(report)
                self._published_active = self._active_versions()
            except Exception:  # the link may be down; the retained report is re-sent on connect
                log.exception("publishing the update report failed")

    def _active_versions(self) -> dict[str, str]:
        return {v.name: v.version for v in self.agent.list_models() if v.active}

    def report_local_changes(self) -> bool:
        """Publish again when the active versions changed outside the updater (``agent install``
        or ``activate`` by hand, from another process): the fleet must know what runs, e.g. so
        that a rollback returns the device to it. True when it published."""
        if self._report_cb is None or self._active_versions() == self._published_active:
            return False
        self._publish()
        return True

    def _set(self, name: str, **changes: Any) -> None:
        with self._lock:
            current = self.models.get(name, ModelReport())
            self.models[name] = current.model_copy(update=changes)
            self._save()
        self._publish()

    # -- worker ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgeserve-updater",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for watch, _ in list(self._watches.values()):
            self.agent.remove_observer(watch)

    def submit(self, desired: Desired) -> None:
        """Queue a desired state (only the newest revision is kept)."""
        with self._wake:
            if desired.revision <= self.revision:
                log.info("ignoring stale desired revision %d (applied %d)", desired.revision,
                         self.revision)
                self._wake.notify_all()
                return
            if self._pending is None or desired.revision > self._pending.revision:
                self._pending = desired
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    return
                desired, self._pending = self._pending, None
                if desired is None and self._retry_at is not None \
                        and time.monotonic() >= self._retry_at[0]:
                    desired = self._retry_at[1]
            if desired is not None:
                self.apply(desired)
            self.check_watches()
            if time.monotonic() - self._local_checked >= _LOCAL_CHECK_S:
                self._local_checked = time.monotonic()
                self.report_local_changes()
            if desired is None:
                with self._wake:
                    if self._pending is None and not self._stop:
                        self._wake.wait(0.2 if self._watches else self._idle_wait())

    def _idle_wait(self) -> float:
        if self._retry_at is None:
            return 1.0
        return max(0.01, min(1.0, self._retry_at[0] - time.monotonic()))

    # -- applying ---------------------------------------------------------------------------------

    def apply(self, desired: Desired) -> Reported:
        """Apply one desired state synchronously (the worker calls this; so can tests).

        The revision counts as applied unless a version is still being delivered; then the same
        desired state is tried again after the back-off (``pending_retry_s`` says when)."""
        if desired.revision <= self.revision:
            return self.current_report()
        self._retry_at = None
        for name in sorted(set(self.models) - set(desired.models)):
            self._retire(name)
        wait: float | None = None
        for name, model in desired.models.items():
            try:
                self._apply_model(name, model)
            except _DeliveryPending as pending:
                wait = pending.wait_s if wait is None else min(wait, pending.wait_s)
            except EdgeserveError as exc:
                self._set(name, state="failed", last_error=_error(exc, model.active))
            except Exception as exc:  # never let one model's bug stop the agent
                log.exception("applying desired state for %s failed", name)
                self._set(name, state="failed", last_error=_error(exc, model.active))
        with self._lock:
            if wait is None:
                self.revision = desired.revision
                self._save()
            else:
                self._retry_at = (time.monotonic() + wait, desired)
        self._publish()
        return self.current_report()

    @property
    def pending_retry_s(self) -> float | None:
        """Seconds until the pending desired state is tried again (None: nothing pending)."""
        retry = self._retry_at
        return None if retry is None else max(0.0, retry[0] - time.monotonic())

    def _retire(self, name: str) -> None:
        """A model the fleet managed is gone from desired state: remove it from the device."""
        watch = self._watches.pop(name, None)
        if watch is not None:
            self.agent.remove_observer(watch[0])
        self.agent.set_traffic(name, {})
        self.agent.set_shadow(name, None)
        with contextlib.suppress(ModelNotFoundError):
            self.agent.remove(name, force=True)
        with self._lock:
            self.models.pop(name, None)
            self._save()
        log.info("%s removed: no longer in desired state", name)

    def _active(self, name: str) -> str | None:
        try:
            return self.agent.active_version(name)
        except ModelNotFoundError:
            return None

    def _installed(self, name: str) -> set[str]:
        return {v.version for v in self.agent.list_models() if v.name == name}

    def _apply_model(self, name: str, desired: DesiredModel) -> None:
        needed = [desired.active, *desired.traffic, *([desired.shadow.version]
                                                      if desired.shadow else [])]
        for version in dict.fromkeys(needed):
            if version not in self._installed(name):
                self._fetch(name, version, desired)
        self._configure_routing(name, desired)
        current = self._active(name)
        if desired.active == current:
            report = self.models.get(name)
            # nothing to activate: what runs is what the fleet wants (a version still under
            # watch, or that failed its check with nothing to return to, keeps that state)
            if report is None or report.state not in ("health-check", "committed", "unhealthy"):
                self._set(name, state="committed", target=current, progress=1.0)
            return
        watch = self._watches.pop(name, None)
        if watch is not None:
            self.agent.remove_observer(watch[0])
        self._activate(name, desired, current)

    def _fetch(self, name: str, version: str, desired: DesiredModel) -> None:
        self._set(name, state="downloading", target=version, progress=0.0, last_error=None)

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - self._last_progress >= _PROGRESS_EVERY_S or done >= total:
                self._last_progress = now
                self._set(name, progress=round(done / total, 3) if total else 1.0)

        delivery = self._deliveries.setdefault((name, version), _Delivery())
        delivery.attempts += 1
        stats, fallbacks = delivery.stats, delivery.stats.fallbacks
        try:
            _, moved = fetch_version(self.agent, name, version, desired.versions[version],
                                     self.state_dir / "downloads", progress, self.mqtt,
                                     self.device_id, self.artifact_origins, stats)
        except TransferError as exc:
            self.delta_fallbacks += stats.fallbacks - fallbacks
            self._delivery_failed(name, version, delivery, exc)
        except EdgeserveError as exc:
            self.delta_fallbacks += stats.fallbacks - fallbacks
            self._deliveries.pop((name, version), None)
            self._set(name, state="failed", last_error=_error(exc, version))
            raise
        self._deliveries.pop((name, version), None)
        self.bytes_downloaded += moved
        self.delta_fallbacks += stats.fallbacks - fallbacks
        self._set(name, state="staged", progress=1.0, delivery=Delivery(
            version=version, received=stats.received, full_bytes=stats.full_bytes,
            delta_files=stats.delta_files, reused_files=stats.reused_files,
            fallbacks=stats.fallbacks, fallbacks_total=self.delta_fallbacks))

    def _delivery_failed(self, name: str, version: str, delivery: _Delivery,
                         exc: TransferError) -> NoReturn:
        """Schedule another attempt (raises _DeliveryPending), or give up (raises a final
        TransferError, which the caller reports as *failed*)."""
        waited = time.monotonic() - delivery.since
        if not exc.retryable or waited >= self.retry.deadline_s:
            self._deliveries.pop((name, version), None)
            if not exc.retryable:
                raise exc
            log.warning("%s %s: giving up after %d delivery attempts over %.0f s: %s", name,
                        version, delivery.attempts, waited, exc)
            raise TransferError(f"gave up after {delivery.attempts} attempts over {waited:.0f} s "
                                f"(deadline {self.retry.deadline_s:g} s); last: {exc.message}",
                                retryable=False) from None
        wait = self.retry.delay(delivery.attempts, self._rng)
        self.delivery_retries += 1
        log.info("%s %s: delivery attempt %d failed (%s); retrying in %.1f s", name, version,
                 delivery.attempts, exc, wait)
        self._set(name, state="retrying", last_error=_error(TransferError(
            f"attempt {delivery.attempts} failed, next in {wait:.0f} s: {exc.message}"), version))
        raise _DeliveryPending(exc, delivery.attempts, wait)

    def _activate(self, name: str, desired: DesiredModel, previous: str | None) -> None:
        version = desired.active
        self.agent.activate(name, version)
        self._set(name, state="health-check", target=version, previous=previous,
                  active_since=time.time())
        try:
            check = self.agent.check_samples(name, version)
            ok = check.ok
            why = check.message or (f"sample outputs differ by {check.max_abs_error:g} "
                                    f"(tolerance {check.tolerance:g})")
        except EdgeserveError as exc:
            ok, why = False, f"sample check could not run: {exc}"
        if not ok:
            self._revert(name, version, previous, f"health check failed: {why}")
            return
        if desired.health.min_inferences == 0:
            self._set(name, state="committed")
            return
        self._start_watch(name, version, previous, desired)

    def _start_watch(self, name: str, version: str, previous: str | None,
                     desired: DesiredModel | None) -> None:
        policy = desired.health if desired is not None else HealthPolicy()
        watch = HealthWatch(name, version, policy)
        self._watches[name] = (watch, previous)
        self.agent.add_observer(watch)

    def check_watches(self) -> None:
        """Commit or roll back versions whose health watch has enough inferences."""
        for name, (watch, previous) in list(self._watches.items()):
            verdict = watch.verdict()
            if verdict is None:
                continue
            self.agent.remove_observer(watch)
            self._watches.pop(name, None)
            if verdict.healthy:
                self._set(name, state="committed", last_error=None)
            else:
                self._revert(name, watch.version, previous, f"health check failed: "
                                                            f"{verdict.reason}")

    def _revert(self, name: str, version: str, previous: str | None, reason: str) -> None:
        error = ErrorInfo(code="HealthCheckFailed", message=reason[:2000], version=version)
        if previous is None:
            # nothing earlier to return to: serving this version beats serving nothing, and
            # the report says it is unhealthy so the fleet (or an operator) can act
            log.warning("%s %s %s; no earlier version to return to: it keeps serving and is "
                        "reported unhealthy", name, version, reason)
            self._set(name, state="unhealthy", target=version, last_error=error)
            return
        self.agent.activate(name, previous)
        log.warning("%s %s %s; rolled back to %s", name, version, reason, previous)
        self._set(name, state="rolled-back", target=version, active_since=time.time(),
                  last_error=error)

    def _configure_routing(self, name: str, desired: DesiredModel) -> None:
        """Traffic split (A/B arms, bandit weights) and shadow version, as desired."""
        self.agent.set_traffic(name, dict(desired.traffic))
        self.agent.set_shadow(name, desired.shadow.version if desired.shadow else None,
                              desired.shadow.sample_rate if desired.shadow else 0.0)
        with self._lock:
            report = self.models.get(name, ModelReport())
            self.models[name] = report.model_copy(update={
                "traffic": dict(desired.traffic),
                "shadow": desired.shadow.version if desired.shadow else None})


def _error(exc: BaseException, version: str | None) -> ErrorInfo:
    return ErrorInfo(code=type(exc).__name__, message=str(exc)[:2000], version=version)
