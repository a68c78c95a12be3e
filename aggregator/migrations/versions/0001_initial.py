"""The aggregator's first schema: chunks, rounds, events, models, releases.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chunks",
        sa.Column("chunk_id", sa.LargeBinary(32), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("round", sa.Integer, nullable=True),
        sa.Column("site", sa.Integer, nullable=False),
    )
    op.create_index("ix_chunks_round", "chunks", ["round"])
    op.create_table(
        "rounds",
        sa.Column("round", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("round_id", sa.String(200), nullable=False, unique=True),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model_digest", sa.LargeBinary(32), nullable=False),
        sa.Column("result_digest", sa.LargeBinary(32), nullable=True),
        sa.Column("abort_reason", sa.String(200), nullable=True),
        sa.Column("survivors", sa.Text, nullable=True),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("site", sa.Integer, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.UniqueConstraint("round", "kind", "stage", "site", name="one_event_per_site_stage"),
    )
    op.create_table(
        "models",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("blob", sa.Text, nullable=False),
    )
    op.create_table(
        "releases",
        sa.Column("round", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("average", sa.Text, nullable=False),
        sa.Column("weight_sum", sa.Float, nullable=False),
        sa.Column("sites", sa.Text, nullable=False),
        sa.Column("released_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("releases", "models", "events", "rounds", "chunks"):
        op.drop_table(table)
