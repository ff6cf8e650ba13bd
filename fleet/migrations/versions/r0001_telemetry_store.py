"""Telemetry store: fleet facts, device registry, telemetry windows.

Revision ID: 0001_telemetry
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001_telemetry"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "fleet_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        comment="facts about this store, e.g. which fleet it belongs to",
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(128), primary_key=True),
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
    op.create_table(
        "windows",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("window_start", sa.Double, nullable=False),
        sa.Column("window_end", sa.Double, nullable=False),
        sa.Column("model", sa.String(128), nullable=True,
                  comment="NULL for a device-health window"),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("dropped", sa.BigInteger, nullable=False),
        sa.Column("latency_p50_ms", sa.Double, nullable=True),
        sa.Column("latency_p95_ms", sa.Double, nullable=True),
        sa.Column("drift_psi", sa.Double, nullable=True,
                  comment="max of the input and output PSI of the window"),
        sa.Column("received", sa.Double, nullable=False),
        sa.Column("data", sa.Text, nullable=False, comment="the whole window, compact JSON"),
    )
    op.create_index("ix_windows_model_version_start", "windows",
                    ["model", "version", "window_start"])
    op.create_index("ix_windows_start", "windows", ["window_start"])


def downgrade() -> None:
    op.drop_index("ix_windows_start", table_name="windows")
    op.drop_index("ix_windows_model_version_start", table_name="windows")
    op.drop_table("windows")
    op.drop_table("devices")
    op.drop_table("fleet_meta")
