"""A session's empty (or blank) negative prompt is stored as null, as the server now stores it.

DashAI's parameter panel shows a stored "" as a required field left empty (in
red) and null as an empty box; the server now keeps an empty or blank optional
text as null. Sessions and their parameter history saved before keep "" until this
revision turns it into null in both, so that a panel shows them clean and the
history shows no change from "" to null after the next update.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("generative_session", "parameter_history")
EMPTY_TEXTS = ("negative_prompt",)


def upgrade() -> None:
    connection = op.get_bind()
    for name in TABLES:
        table = sa.table(name, sa.column("id", sa.Integer), sa.column("parameters", sa.JSON))
        for row_id, parameters in connection.execute(sa.select(table.c.id, table.c.parameters)).all():
            if not isinstance(parameters, dict):
                continue
            changed = {key: None for key in EMPTY_TEXTS
                       if isinstance(parameters.get(key), str) and not parameters[key].strip()}
            if changed:
                connection.execute(table.update().where(table.c.id == row_id).values(parameters=parameters | changed))


def downgrade() -> None:
    pass  # null was always a valid stored value: nothing to undo
