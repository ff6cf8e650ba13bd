"""Prometheus ``/metrics`` for the fleet (text exposition format 0.0.4, no extra dependency).

Gauges from the store (devices by state, rollouts by phase) and counters from the running
ingestion (messages, windows stored, duplicates, dropped payloads by reason) when the service
passes its stats in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from ..registry import list_devices
from ..store import Store
from ..tables import rollouts

__all__ = ["StatsProvider", "render_metrics"]

StatsProvider = Callable[[], dict[str, Any]]


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(store: Store, stats: StatsProvider | None = None) -> str:
    devices = list_devices(store)
    by_state = Counter(d.state for d in devices)
    with store.read() as conn:
        phases: dict[str, int] = dict(conn.execute(sa.select(rollouts.c.phase, sa.func.count())
                                   .group_by(rollouts.c.phase)).all())
    out = [
        "# HELP edgeserve_fleet_devices Devices in the registry by state.",
        "# TYPE edgeserve_fleet_devices gauge",
        *(_line("edgeserve_fleet_devices", by_state.get(s, 0), {"state": s})
          for s in ("online", "offline", "unknown")),
        "# HELP edgeserve_fleet_rollouts Rollouts by phase.",
        "# TYPE edgeserve_fleet_rollouts gauge",
        *(_line("edgeserve_fleet_rollouts", phases.get(p, 0), {"phase": p})
          for p in ("running", "paused", "awaiting-promotion", "rolling-back", "rolled-back",
                    "completed")),
        "# HELP edgeserve_fleet_device_windows_dropped_total Windows device outboxes dropped.",
        "# TYPE edgeserve_fleet_device_windows_dropped_total counter",
        _line("edgeserve_fleet_device_windows_dropped_total",
              sum(d.dropped_total for d in devices)),
    ]
    snapshot = stats() if stats is not None else None
    if snapshot:
        counters = {"messages": "MQTT messages received", "windows_received": "windows received",
                    "windows_stored": "windows stored (new)", "duplicates":
                    "windows received again and ignored", "acks": "acks published"}
        for key, help_text in counters.items():
            name = f"edgeserve_fleet_ingest_{key}_total"
            out += [f"# HELP {name} {help_text}.", f"# TYPE {name} counter",
                    _line(name, float(snapshot.get(key, 0)))]
        out += ["# HELP edgeserve_fleet_ingest_rejected_total Payloads dropped, by reason.",
                "# TYPE edgeserve_fleet_ingest_rejected_total counter"]
        for reason, count in sorted(snapshot.get("rejected", {}).items()):
            out.append(_line("edgeserve_fleet_ingest_rejected_total", float(count),
                             {"reason": reason}))
    return "\n".join(out) + "\n"
