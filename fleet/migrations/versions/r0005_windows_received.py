"""An index on windows (model, received): the experiment controller reads, once a tick, the
windows of a model stored since its previous read.

Revision ID: 0005_windows_received
Revises: 0004_experiments
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision: str = "0005_windows_received"
down_revision: str | None = "0004_experiments"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_windows_model_received", "windows", ["model", "received"])


def downgrade() -> None:
    op.drop_index("ix_windows_model_received", table_name="windows")
