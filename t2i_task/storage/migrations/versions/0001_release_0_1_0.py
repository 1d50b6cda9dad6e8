"""The schema of release 0.1.0, the last made without Alembic (Base.metadata.create_all).

A database made by that release has these tables and no alembic_version: it is
stamped with this revision, not re-created (t2i_task/storage/schema.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "generative_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_modified", sa.DateTime(timezone=True), nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("model_name", sa.String(255), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "generative_process",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_modified", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivery_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["generative_session.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_generative_process_owner", "generative_process", ["owner"])
    op.create_index("ix_generative_process_session_id", "generative_process", ["session_id"])
    op.create_index("ix_generative_process_status", "generative_process", ["status"])
    op.create_table(
        "parameter_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["generative_session.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_parameter_history_session_id", "parameter_history", ["session_id"])
    op.create_table(
        "process_data",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("data_type", sa.String(32), nullable=False),
        sa.Column("process_id", sa.Integer(), nullable=True),
        sa.Column("is_input", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["process_id"], ["generative_process.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_process_data_process_id", "process_data", ["process_id"])


def downgrade() -> None:
    for table in ("process_data", "parameter_history", "generative_process", "generative_session"):
        op.drop_table(table)
