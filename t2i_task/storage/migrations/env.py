"""Alembic's entry point: run by t2i_task/storage/schema.py on the connection it is given (no alembic.ini)."""

from alembic import context

from t2i_task.storage.schema import VERSION_TABLE
from t2i_task.storage.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
