"""The agent's servers: Open Inference Protocol v2 over HTTP (JSON + binary tensors) and gRPC.

Both are thin adapters over :class:`~.dataplane.DataPlane` and the :class:`~..agent.Agent`.
Start them in-process with :func:`start_http_server` / :func:`start_grpc_server`; each returns a
handle with ``url``, ``port`` and ``stop()``.
"""

from __future__ import annotations

from edgeserve.auth import Authenticator, BasicAuth, BearerTokenAuth, JwtAuth, parse_auth_option

from .dataplane import DataPlane, LoadGate
from .limits import MemoryBudget, ServerLimits
from .metrics import MetricsRegistry
from .runner import (
    GrpcServerHandle,
    HttpServerHandle,
    TlsSettings,
    check_exposure,
    start_grpc_server,
    start_http_server,
)

__all__ = [
    "Authenticator",
    "BasicAuth",
    "BearerTokenAuth",
    "DataPlane",
    "GrpcServerHandle",
    "HttpServerHandle",
    "JwtAuth",
    "LoadGate",
    "MemoryBudget",
    "MetricsRegistry",
    "ServerLimits",
    "TlsSettings",
    "check_exposure",
    "parse_auth_option",
    "start_grpc_server",
    "start_http_server",
]
