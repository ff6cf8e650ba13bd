"""The fleet store's tables (SQLAlchemy Core), one :data:`metadata` for every fleet module.

The schema itself is owned by the Alembic migrations in ``fleet/migrations/versions``; these
definitions must describe the state after the newest migration (a test compares them). A module
that needs new tables (rollouts, desired state, ...) adds them to :data:`metadata` here and a new
migration revision beside the existing ones.

Timestamps are float seconds since the Unix epoch (UTC), the same numbers the MQTT contract
carries, so SQLite and PostgreSQL store and compare them alike.

``windows.data`` is the whole window as the device sent it (compact JSON text, schema
``edgeserve.contract.Window``); the scalar columns beside it are copies for cheap queries.
On PostgreSQL, ``data::jsonb`` reads it as JSON.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["devices", "fleet_meta", "metadata", "windows"]

metadata = sa.MetaData()

ID_LENGTH = 128
VERSION_LENGTH = 64

fleet_meta = sa.Table(
    "fleet_meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    comment="facts about this store, e.g. which fleet it belongs to",
)

devices = sa.Table(
    "devices", metadata,
    sa.Column("device_id", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False, server_default="unknown",
              comment="online | offline (from birth and Last Will) | unknown (telemetry only)"),
    sa.Column("first_seen", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=False,
              comment="last status or telemetry received from the device"),
    sa.Column("status_ts", sa.Double, nullable=True,
              comment="ts of the newest status applied (older retained ones are ignored)"),
    sa.Column("agent_version", sa.String(64), nullable=True),
    sa.Column("profile", sa.String(64), nullable=True),
    sa.Column("models", sa.Text, nullable=False, server_default="{}",
              comment="JSON: active version per model, from the birth message"),
    sa.Column("labels", sa.Text, nullable=False, server_default="{}", comment="JSON labels"),
    sa.Column("reason", sa.String(256), nullable=True, comment="why it went offline"),
    sa.Column("acked_seq", sa.BigInteger, nullable=False, server_default="0",
              comment="every window up to here is stored (or dropped by the device)"),
    sa.Column("windows_stored", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("dropped_total", sa.BigInteger, nullable=False, server_default="0",
              comment="windows the device's outbox dropped, as it reported them"),
)

windows = sa.Table(
    "windows", metadata,
    sa.Column("device_id", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("window_start", sa.Double, nullable=False),
    sa.Column("window_end", sa.Double, nullable=False),
    sa.Column("model", sa.String(ID_LENGTH), nullable=True,
              comment="NULL for a device-health window"),
    sa.Column("version", sa.String(VERSION_LENGTH), nullable=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("dropped", sa.BigInteger, nullable=False),
    sa.Column("latency_p50_ms", sa.Double, nullable=True),
    sa.Column("latency_p95_ms", sa.Double, nullable=True),
    sa.Column("drift_psi", sa.Double, nullable=True,
              comment="max of the input and output PSI of the window"),
    sa.Column("received", sa.Double, nullable=False),
    sa.Column("data", sa.Text, nullable=False, comment="the whole window, compact JSON"),
    sa.Index("ix_windows_model_version_start", "model", "version", "window_start"),
    sa.Index("ix_windows_start", "window_start"),
)
