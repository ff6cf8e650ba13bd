"""Experiments (A/B tests and bandits): spec, controller state and queued stop requests.

Revision ID: 0004_experiments
Revises: 0003_active_since
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004_experiments"
down_revision: str | None = "0003_active_since"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, comment="ab | bandit"),
        sa.Column("phase", sa.String(16), nullable=False,
                  comment="running | decided | stopped"),
        sa.Column("spec", sa.Text, nullable=False, comment="ExperimentSpec (JSON)"),
        sa.Column("state", sa.Text, nullable=False, comment="ExperimentState (JSON)"),
        sa.Column("stop_request", sa.Text, nullable=True,
                  comment="JSON {promote, reason, ts} queued by the CLI/API for the controller"),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
    )
    op.create_index("ix_experiments_model_phase", "experiments", ["model", "phase"])


def downgrade() -> None:
    op.drop_index("ix_experiments_model_phase", table_name="experiments")
    op.drop_table("experiments")
