"""Owners: each session, process, file and batch records whose it is (the name of the API key that made it;
"" for rows made before), a session's name is unique among its owner's sessions only, an image's
row is found by its file name (whose the image is), each owner's usage is counted, and the replicas
keep shared secrets (the key that signs image links).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# SQLite's unique constraint on generative_session.name has no name: batch mode names it with this
# convention when it reflects the table (PostgreSQL named it generative_session_name_key itself).
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
TABLES = ("generative_process", "stored_file", "batch")


def _old_name_constraint() -> str:
    return "generative_session_name_key" if op.get_bind().dialect.name == "postgresql" else "uq_generative_session_name"


def _account() -> sa.Column:
    return sa.Column("account", sa.String(255), nullable=False, server_default="")


def upgrade() -> None:
    with op.batch_alter_table("generative_session", naming_convention=NAMING) as batch_op:
        batch_op.add_column(_account())
        batch_op.drop_constraint(_old_name_constraint(), type_="unique")
        batch_op.create_unique_constraint("uq_generative_session_account_name", ["account", "name"])
        batch_op.create_index("ix_generative_session_account", ["account"])
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(_account())
            batch_op.create_index(f"ix_{table}_account", ["account"])
    op.create_index("ix_process_data_data", "process_data", ["data"], postgresql_using="hash")
    op.create_table(
        "key_usage",
        sa.Column("account", sa.String(255), primary_key=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("model_seconds", sa.Float(), nullable=False),
    )
    op.create_table(
        "server_secret",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("server_secret")
    op.drop_table("key_usage")
    op.drop_index("ix_process_data_data", "process_data")
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_index(f"ix_{table}_account")
            batch_op.drop_column("account")
    with op.batch_alter_table("generative_session", naming_convention=NAMING) as batch_op:
        batch_op.drop_index("ix_generative_session_account")
        batch_op.drop_constraint("uq_generative_session_account_name", type_="unique")
        batch_op.create_unique_constraint(_old_name_constraint(), ["name"])
        batch_op.drop_column("account")
