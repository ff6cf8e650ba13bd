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

__all__ = [
    "desired_state",
    "device_models",
    "devices",
    "experiments",
    "fleet_meta",
    "metadata",
    "rollout_actions",
    "rollout_events",
    "rollouts",
    "windows",
]

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
    sa.Index("ix_windows_model_received", "model", "received"),
)

# -- desired state and rollouts (fleet/desired.py, fleet/rollouts/) --------------------------------

# SQLite autoincrements only INTEGER PRIMARY KEY columns
_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

desired_state = sa.Table(
    "desired_state", metadata,
    sa.Column("device_id", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("doc", sa.Text, nullable=False, comment="the Desired message (JSON)"),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Column("published", sa.Double, nullable=True,
              comment="when this revision was published (retained); NULL = not yet"),
)

device_models = sa.Table(
    "device_models", metadata,
    sa.Column("device_id", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("model", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("active", sa.String(VERSION_LENGTH), nullable=True),
    sa.Column("previous", sa.String(VERSION_LENGTH), nullable=True),
    sa.Column("shadow", sa.String(VERSION_LENGTH), nullable=True),
    sa.Column("state", sa.String(16), nullable=False, server_default="idle"),
    sa.Column("target", sa.String(VERSION_LENGTH), nullable=True),
    sa.Column("progress", sa.Double, nullable=False, server_default="0"),
    sa.Column("traffic", sa.Text, nullable=False, server_default="{}",
              comment="JSON: version -> weight, as the device applied it"),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("error_version", sa.String(VERSION_LENGTH), nullable=True),
    sa.Column("revision", sa.BigInteger, nullable=False, server_default="0",
              comment="desired revision the device reports as applied"),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Column("active_since", sa.Double, nullable=True,
              comment="when the active version started answering on the device"),
    comment="what each device reports per model (from devices/{id}/reported)",
)

rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(ID_LENGTH), nullable=False),
    sa.Column("version", sa.String(VERSION_LENGTH), nullable=False),
    sa.Column("strategy", sa.String(16), nullable=False),
    sa.Column("phase", sa.String(24), nullable=False),
    sa.Column("spec", sa.Text, nullable=False, comment="RolloutSpec (JSON)"),
    sa.Column("state", sa.Text, nullable=False, comment="RolloutState (JSON)"),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Index("ix_rollouts_model_phase", "model", "phase"),
)

rollout_events = sa.Table(
    "rollout_events", metadata,
    sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.String(64), nullable=False),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
    sa.Column("data", sa.Text, nullable=False, server_default="{}",
              comment="JSON: gate results, canary and control metrics, device counts"),
    sa.Index("ix_rollout_events_rollout_ts", "rollout_id", "ts"),
)

rollout_actions = sa.Table(
    "rollout_actions", metadata,
    sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.String(64), nullable=False),
    sa.Column("action", sa.String(16), nullable=False, comment="promote|pause|resume|rollback"),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("done", sa.Double, nullable=True),
    comment="operator actions queued by the CLI/API, carried out by the rollout controller",
)

# -- experiments (fleet/experiments/) --------------------------------------------------------------

experiments = sa.Table(
    "experiments", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(ID_LENGTH), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, comment="ab | bandit"),
    sa.Column("phase", sa.String(16), nullable=False, comment="running | decided | stopped"),
    sa.Column("spec", sa.Text, nullable=False, comment="ExperimentSpec (JSON)"),
    sa.Column("state", sa.Text, nullable=False, comment="ExperimentState (JSON)"),
    sa.Column("stop_request", sa.Text, nullable=True,
              comment="JSON {promote, reason, ts} queued by the CLI/API for the controller"),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Index("ix_experiments_model_phase", "model", "phase"),
)
