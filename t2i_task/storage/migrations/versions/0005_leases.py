"""Leases: until when a process's owner holds it, and its priority.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generative_process") as batch_op:
        batch_op.add_column(sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("priority", sa.SmallInteger(), nullable=True))
        batch_op.create_index("ix_generative_process_lease_expires", ["lease_expires"])


def downgrade() -> None:
    with op.batch_alter_table("generative_process") as batch_op:
        batch_op.drop_index("ix_generative_process_lease_expires")
        batch_op.drop_column("priority")
        batch_op.drop_column("lease_expires")
