"""Helpers for the fleet's tests and benchmarks (not used by the service itself): they need
psutil, which the ``fleet`` extra does not install."""

from __future__ import annotations

from .leader import leader_client_port
from .store import Store

__all__ = ["leader_process"]


def leader_process(store_url: str, job: str, fleet: str, pids: list[int | None]) -> int | None:
    """Which of these processes (by index; None for one not running) leads ``job`` of
    ``fleet`` on PostgreSQL: the backend holding the job's advisory lock is found in
    ``pg_locks``, and its client port is a local port of the leader's process. None when no
    process leads yet."""
    import psutil

    with Store(store_url) as store:
        port = leader_client_port(store, job, fleet)
    if port is None:
        return None
    for index, pid in enumerate(pids):
        if pid is None:
            continue
        try:
            connections = psutil.Process(pid).net_connections("tcp")
        except psutil.Error:
            continue
        if any(c.laddr and c.laddr.port == port for c in connections):
            return index
    return None
