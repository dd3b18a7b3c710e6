"""erasure_receipts: a requester follows their erasure with a receipt token after their API token ends

Revision ID: f7b3d1e5a920
Revises: e4a7c9b2d813
Create Date: 2026-12-06 05:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.db

revision: str = "f7b3d1e5a920"
down_revision: str | Sequence[str] | None = "e4a7c9b2d813"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "erasure_receipts",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("created_at", pipeline.db.UTCDateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("erasure_receipts")
