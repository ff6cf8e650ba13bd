"""device_models.active_since: judge a new version only on traffic after it started answering.

Revision ID: 0003_active_since
Revises: 0002_rollouts
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003_active_since"
down_revision: str | None = "0002_rollouts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("device_models", sa.Column(
        "active_since", sa.Double, nullable=True,
        comment="when the active version started answering on the device"))


def downgrade() -> None:
    op.drop_column("device_models", "active_since")
