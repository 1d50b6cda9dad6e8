"""Bulk jobs: OpenAI's files and batches, and the batch line each process may be.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_file",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_stored_file_created", "stored_file", ["created"])
    op.create_table(
        "batch",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(255), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("in_progress_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finalizing_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelling_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_batch_status", "batch", ["status"])
    op.create_index("ix_batch_created", "batch", ["created"])
    # Columns and indexes only: a foreign key or a constraint would rebuild the table on SQLite, and
    # dropping the old one would cascade to its process_data rows.
    with op.batch_alter_table("generative_process") as batch_op:
        batch_op.add_column(sa.Column("batch_id", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("custom_id", sa.String(512), nullable=True))
    op.create_index("ix_generative_process_batch_id", "generative_process", ["batch_id"])
    op.create_index("uq_generative_process_batch_line", "generative_process", ["batch_id", "custom_id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_generative_process_batch_line", "generative_process")
    op.drop_index("ix_generative_process_batch_id", "generative_process")
    with op.batch_alter_table("generative_process") as batch_op:
        batch_op.drop_column("custom_id")
        batch_op.drop_column("batch_id")
    op.drop_table("batch")
    op.drop_table("stored_file")
