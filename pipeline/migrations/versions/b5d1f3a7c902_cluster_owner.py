"""clusters.user_ref: a cluster's running jobs are sealed under its owner's key, shredded by her erasure

Revision ID: b5d1f3a7c902
Revises: a8c4e2f6b371
Create Date: 2026-12-06 22:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b5d1f3a7c902"
down_revision: str | Sequence[str] | None = "a8c4e2f6b371"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema. A database migrated by release 71832a6 has the column already: its a8c4e2f6b371
    added it (moved here later), so it is added only where it is missing."""
    if "user_ref" in {column["name"] for column in sa.inspect(op.get_bind()).get_columns("clusters")}:
        return
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("user_ref", sa.String(64), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("user_ref")
