"""Desired state, device model reports, rollouts, their events and operator actions.

Revision ID: 0002_rollouts
Revises: 0001_telemetry
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002_rollouts"
down_revision: str | None = "0001_telemetry"
branch_labels: str | None = None
depends_on: str | None = None

_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "desired_state",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("doc", sa.Text, nullable=False, comment="the Desired message (JSON)"),
        sa.Column("updated", sa.Double, nullable=False),
        sa.Column("published", sa.Double, nullable=True,
                  comment="when this revision was published (retained); NULL = not yet"),
    )
    op.create_table(
        "device_models",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("active", sa.String(64), nullable=True),
        sa.Column("previous", sa.String(64), nullable=True),
        sa.Column("shadow", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="idle"),
        sa.Column("target", sa.String(64), nullable=True),
        sa.Column("progress", sa.Double, nullable=False, server_default="0"),
        sa.Column("traffic", sa.Text, nullable=False, server_default="{}",
                  comment="JSON: version -> weight, as the device applied it"),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("error_version", sa.String(64), nullable=True),
        sa.Column("revision", sa.BigInteger, nullable=False, server_default="0",
                  comment="desired revision the device reports as applied"),
        sa.Column("updated", sa.Double, nullable=False),
        comment="what each device reports per model (from devices/{id}/reported)",
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(24), nullable=False),
        sa.Column("spec", sa.Text, nullable=False, comment="RolloutSpec (JSON)"),
        sa.Column("state", sa.Text, nullable=False, comment="RolloutState (JSON)"),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
    )
    op.create_index("ix_rollouts_model_phase", "rollouts", ["model", "phase"])
    op.create_table(
        "rollout_events",
        sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.String(64), nullable=False),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("data", sa.Text, nullable=False, server_default="{}",
                  comment="JSON: gate results, canary and control metrics, device counts"),
    )
    op.create_index("ix_rollout_events_rollout_ts", "rollout_events", ["rollout_id", "ts"])
    op.create_table(
        "rollout_actions",
        sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False,
                  comment="promote|pause|resume|rollback"),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("done", sa.Double, nullable=True),
        comment="operator actions queued by the CLI/API, carried out by the rollout controller",
    )


def downgrade() -> None:
    for table in ("rollout_actions", "rollout_events", "rollouts", "device_models",
                  "desired_state"):
        op.drop_table(table)
