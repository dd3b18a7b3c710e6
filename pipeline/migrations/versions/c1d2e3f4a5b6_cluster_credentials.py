"""cluster credentials: per-cluster TLS certificates and keys, sealed under the account's data key

Revision ID: c1d2e3f4a5b6
Revises: 5e1c0a7d2b94
Create Date: 2026-11-30 12:10:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.db

# revision identifiers, used by Alembic.
revision: str = "c1d2e3f4a5b6"
down_revision: str | Sequence[str] | None = "5e1c0a7d2b94"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "cluster_credentials",
        sa.Column("cluster_id", sa.String(length=128), nullable=False),
        sa.Column("subject_ref", sa.String(length=64), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("not_after", pipeline.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", pipeline.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("cluster_id"),
    )
    with op.batch_alter_table("cluster_credentials", schema=None) as batch_op:
        batch_op.create_index("ix_cluster_credentials_subject", ["subject_ref"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("cluster_credentials", schema=None) as batch_op:
        batch_op.drop_index("ix_cluster_credentials_subject")
    op.drop_table("cluster_credentials")
