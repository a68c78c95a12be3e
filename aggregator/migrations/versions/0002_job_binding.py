"""The job a store belongs to: the federation's trust root and the job's round-id prefix.

A store of another federation whose job started from the same model under the default name
and job id ("trial"/"job") was taken as this job's: its rounds and results were served to
this federation's sites. A store migrated from 0001 holds no binding yet; the first
aggregator to run on it writes its own (after the checks 0001 stores had).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("trust_root", sa.LargeBinary(32), nullable=False),
        sa.Column("job", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job")
