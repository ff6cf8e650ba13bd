"""The fleet's JSON API (read side for the dashboard and tools; rollout actions).

``GET  /api/v1/overview``                          devices by state and profile, active versions
``GET  /api/v1/devices``                           the registry
``GET  /api/v1/rollouts``                          rollouts (``?all=1`` includes finished ones)
``GET  /api/v1/rollouts/{id}``                     one rollout with its event history (both carry
                                                   ``transfer``: bytes sent in full and as
                                                   deltas since it began, and bytes saved)
``POST /api/v1/rollouts``                          create (JSON body: a rollout spec)
``POST /api/v1/rollouts/{id}/{action}``            promote | pause | resume | rollback
``GET  /api/v1/models``                            models with telemetry, and their versions
``GET  /api/v1/models/{model}/series``             per-version time series (``?since=&bucket=``)
``GET  /api/v1/experiments``                       experiments and their arms (when any)

Errors are ``{"error": message}`` with the status of the :class:`EdgeserveError` raised.
Packages, unpublishing, device removal and the event log are in :mod:`.admin`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeserve.errors import ConfigError, EdgeserveError

from ..artifacts import ArtifactStore
from ..events import rollout_history
from ..registry import list_devices
from ..rollouts.admission import create_rollout as admit_and_create
from ..rollouts.metrics import Accumulator, References
from ..rollouts.repo import RolloutRecord, Rollouts
from ..store import Store
from ..tables import device_models, windows
from ..transfers import TransferLog

__all__ = ["api_routes", "model_series", "overview"]

_MAX_BUCKETS = 240
ExperimentsProvider = Callable[[], list[dict[str, Any]]]


def overview(store: Store) -> dict[str, Any]:
    devices = list_devices(store)
    with store.read() as conn:
        reports = conn.execute(sa.select(device_models.c.device_id, device_models.c.model,
                                         device_models.c.active, device_models.c.state)).all()
    active: dict[str, Counter[str]] = defaultdict(Counter)
    reported = {(r.device_id, r.model) for r in reports}
    for r in reports:
        if r.active:
            active[r.model][r.active] += 1
    for d in devices:  # devices that only sent a birth message
        for model, version in d.models.items():
            if (d.device_id, model) not in reported:
                active[model][version] += 1
    return {
        "devices": len(devices),
        "by_state": dict(Counter(d.state for d in devices)),
        "by_profile": dict(Counter(d.profile or "unknown" for d in devices)),
        "online_by_profile": dict(Counter(d.profile or "unknown" for d in devices
                                          if d.state == "online")),
        "active_versions": {m: dict(c) for m, c in sorted(active.items())},
        "windows_stored": sum(d.windows_stored for d in devices),
        "dropped_total": sum(d.dropped_total for d in devices),
        "ts": time.time(),
    }


def model_series(store: Store, model: str, since: float, bucket_s: float,
                 references: References | None = None) -> dict[str, Any]:
    """Per version, per time bucket: requests, errors, throughput and merged latency percentiles."""
    query = (sa.select(windows.c.version, windows.c.window_end, windows.c.data)
             .where(windows.c.model == model, windows.c.window_end >= since)
             .order_by(windows.c.window_end))
    buckets: dict[str, dict[int, Accumulator]] = defaultdict(dict)
    with store.read() as conn:
        for row in conn.execute(query):
            key = math.floor(row.window_end / bucket_s)
            acc = buckets[row.version].setdefault(key, Accumulator(references=references))
            acc.add_window(json.loads(row.data), shadow_mode=False)
    series: dict[str, list[dict[str, Any]]] = {}
    for version, by_key in sorted(buckets.items()):
        points = []
        for key in sorted(by_key)[-_MAX_BUCKETS:]:
            m = by_key[key].metrics()
            points.append({
                "t": (key + 1) * bucket_s, "requests": m.requests, "errors": m.errors,
                "error_rate": m.errors / m.requests if m.requests else None,
                "throughput": m.requests / bucket_s,
                "p50_ms": m.p50_ms, "p95_ms": m.p95_ms, "p99_ms": m.p99_ms,
                "drift_psi": m.drift_psi, "disagreement": (
                    m.shadow_disagreements / m.shadow_compared if m.shadow_compared else None),
                "reward": m.reward})
        series[version] = points
    return {"model": model, "since": since, "bucket_s": bucket_s, "versions": series}


def _models(store: Store, since: float) -> list[dict[str, Any]]:
    query = (sa.select(windows.c.model, windows.c.version, sa.func.sum(windows.c.requests),
                       sa.func.sum(windows.c.errors))
             .where(windows.c.model.is_not(None), windows.c.window_end >= since)
             .group_by(windows.c.model, windows.c.version))
    out: dict[str, dict[str, Any]] = {}
    with store.read() as conn:
        for model, version, requests, errors in conn.execute(query):
            entry = out.setdefault(model, {"model": model, "versions": {}})
            entry["versions"][version] = {"requests": int(requests or 0),
                                          "errors": int(errors or 0)}
    return list(out.values())


def _float(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"query parameter {name}={raw!r} is not a number") from None


Handler = Callable[[Request], Awaitable[Response]]


def _json(fn: Callable[..., Any]) -> Handler:
    """Run a blocking handler in the thread pool; map EdgeserveError to ``{"error": …}``."""
    async def endpoint(request: Request) -> Response:
        try:
            body = None
            if request.method == "POST":
                raw = await request.body()
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    raise ConfigError("request body is not valid JSON") from None
            data = await run_in_threadpool(fn, request, body) if request.method == "POST" \
                else await run_in_threadpool(fn, request)
        except EdgeserveError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status)
        return JSONResponse(data)

    return endpoint


def api_routes(store: Store, experiments: ExperimentsProvider | None = None,
               references: References | None = None,
               artifacts: ArtifactStore | None = None) -> list[Route]:
    rollouts = Rollouts(store)

    def get_overview(request: Request) -> Any:
        return overview(store)

    def get_devices(request: Request) -> Any:
        return [d.to_dict() for d in list_devices(store)]

    transfers = TransferLog(artifacts.root) if artifacts is not None else None

    def _with_transfer(record: RolloutRecord) -> dict[str, Any]:
        """A rollout, with the bytes its version's files cost (full and as deltas) since it
        began, when this API serves the artifact store."""
        data = record.to_dict()
        if transfers is not None:
            data["transfer"] = transfers.summary(record.spec.model, record.spec.version,
                                                 since=record.created).to_dict()
        return data

    def get_rollouts(request: Request) -> Any:
        show_all = request.query_params.get("all") in ("1", "true", "yes")
        return [_with_transfer(r) for r in rollouts.find(active_only=not show_all)]

    def get_rollout(request: Request) -> Any:
        record = rollouts.get(request.path_params["rid"])
        # every milestone, however long the rollout ran, plus the gate values the charts plot
        return {**_with_transfer(record), "events": rollout_history(store, record.id, 500)}

    def create_rollout(request: Request, body: Any) -> Any:
        if not isinstance(body, dict):
            raise ConfigError("expected a JSON object with the rollout spec")
        if artifacts is None:
            raise ConfigError("this API serves no artifact store: create rollouts with "
                              "'edgeserve fleet rollout create'")
        only_fitting = request.query_params.get("only_fitting") in ("1", "true", "yes")
        record, admission = admit_and_create(store, artifacts, body, only_fitting=only_fitting)
        return {**record.to_dict(), "admission": admission.to_dict()}

    def act(request: Request, body: Any) -> Any:
        action = request.path_params["action"]
        if action not in ("promote", "pause", "resume", "rollback"):
            raise ConfigError(f"unknown action {action!r}; expected promote, pause, resume or "
                              "rollback")
        reason = str((body or {}).get("reason", "")) if isinstance(body, dict) else ""
        record = rollouts.queue_action(request.path_params["rid"], action, reason)
        return {"id": record.id, "action": action, "queued": True}

    def get_models(request: Request) -> Any:
        return _models(store, _float(request, "since", time.time() - 3600))

    def get_series(request: Request) -> Any:
        bucket = max(1.0, _float(request, "bucket", 10.0))
        since = _float(request, "since", time.time() - _MAX_BUCKETS * bucket)
        return model_series(store, request.path_params["model"], since, bucket, references)

    def get_experiments(request: Request) -> Any:
        return experiments() if experiments is not None else []

    return [
        Route("/api/v1/overview", _json(get_overview)),
        Route("/api/v1/devices", _json(get_devices)),
        Route("/api/v1/rollouts", _json(get_rollouts), methods=["GET"]),
        Route("/api/v1/rollouts", _json(create_rollout), methods=["POST"]),
        Route("/api/v1/rollouts/{rid}", _json(get_rollout)),
        Route("/api/v1/rollouts/{rid}/{action}", _json(act), methods=["POST"]),
        Route("/api/v1/models", _json(get_models)),
        Route("/api/v1/models/{model}/series", _json(get_series)),
        Route("/api/v1/experiments", _json(get_experiments)),
    ]
