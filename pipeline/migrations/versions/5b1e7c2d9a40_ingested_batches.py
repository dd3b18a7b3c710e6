"""ingested batches: idempotency of Pipeline.ingest by batch id

Revision ID: 5b1e7c2d9a40
Revises: 73cfada6ab33
Create Date: 2026-11-30 12:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.db

# revision identifiers, used by Alembic.
revision: str = "5b1e7c2d9a40"
down_revision: str | Sequence[str] | None = "73cfada6ab33"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "ingested_batches",
        sa.Column("subject_ref", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=128), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("received_at", pipeline.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("subject_ref", "batch_id"),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("ingested_batches")
