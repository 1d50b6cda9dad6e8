"""The database schema moves only by Alembic migrations (t2i_task/storage/migrations/), run at start.

`upgrade(engine)` brings any database this project ever made to the schema of
this release, in place: a new one is built by the migrations, one made by
release 0.1.0 (before Alembic, by `create_all`) is stamped with the baseline
revision, which is that release's schema, then upgraded like any other. On
PostgreSQL an advisory lock makes replicas that start together migrate one at
a time; the others find the work done.

A schema change is a new file in t2i_task/storage/migrations/versions/ (`make migration
MESSAGE="..."` writes one from the models); tests/test_schema.py checks that
the migrations build exactly the models' schema and that a 0.1.0 database
upgrades with its data intact.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

MIGRATIONS = Path(__file__).with_name("migrations")
# Alembic's commands work through a module-level context: one at a time in a process
# (tests open several stores from threads at once).
_alembic_commands = threading.Lock()
BASELINE = "0001"  # release 0.1.0's schema
# Not Alembic's default name: DashAI keeps its own migrations in `alembic_version`, and
# this server's tables follow DashAI's, so the two must never read each other's revision.
VERSION_TABLE = "t2i_alembic_version"
# Any fixed 64-bit number: the advisory lock replicas take while they migrate.
MIGRATION_LOCK = 0x7432_6944_6261_7365


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migration_context(connection: Connection) -> MigrationContext:
    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})


def current_revision(connection: Connection) -> str | None:
    return migration_context(connection).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(engine: Engine) -> None:
    """Bring the database to this release's schema (see the module docstring)."""
    with _alembic_commands, engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A migration that changes a constraint rebuilds the table on SQLite (a copy, then DROP
            # TABLE of the old one), and with foreign keys on that DROP would delete every row that
            # references it (ON DELETE CASCADE). The pragma only takes effect outside a transaction.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                _upgrade(connection)
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    revision = current_revision(connection)
    if revision == head_revision():
        return
    config = alembic_config(connection)
    if revision is None and inspect(connection).has_table("generative_session"):
        command.stamp(config, BASELINE)  # made by release 0.1.0, before Alembic
    command.upgrade(config, "head")
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"the migration left rows whose parent is gone: {broken[:5]}")


def new_revision(message: str) -> None:
    """Write a migration from the difference between the models and the migrations' schema
    (`make migration MESSAGE=...`), worked out on a scratch SQLite database."""
    import tempfile

    from sqlalchemy import create_engine

    if not message:
        raise SystemExit('usage: make migration MESSAGE="what changes"')
    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(f"sqlite:///{folder}/scratch.db")
        upgrade(engine)
        number = len(list((MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))) + 1
        with engine.begin() as connection:
            command.revision(alembic_config(connection), message=message, autogenerate=True,
                             rev_id=f"{number:04d}")
        engine.dispose()


if __name__ == "__main__":
    import sys

    new_revision(" ".join(sys.argv[1:]))
