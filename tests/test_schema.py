"""The schema moves by Alembic migrations, and a database made by release 0.1.0 upgrades in place."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from sqlalchemy import create_engine, inspect

from t2i_task.storage.schema import VERSION_TABLE, current_revision, head_revision, migration_context
from t2i_task.storage.store import Store
from t2i_task.storage.tables import Base, RunStatus

FIXTURES = Path(__file__).with_name("fixtures")


def make_release_0_1_0_database(url: str) -> None:
    """The tables and rows exactly as release 0.1.0 left them (its own DDL, no alembic_version)."""
    dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
    lines = (FIXTURES / f"release-0.1.0-{dialect}.sql").read_text().splitlines()
    script = "\n".join(line for line in lines if not line.startswith("--"))
    engine = create_engine(url)
    with engine.begin() as connection:
        for statement in filter(None, (part.strip() for part in script.split(";\n"))):
            connection.exec_driver_sql(statement.removesuffix(";"))
    engine.dispose()


def test_a_release_0_1_0_database_upgrades_in_place_with_its_data(database_url, tmp_path):
    make_release_0_1_0_database(database_url)
    images = tmp_path / "images"
    images.mkdir()
    (images / "made-by-0.1.0.png").write_bytes(b"\x89PNG old picture")

    store = Store(database_url, images)
    try:
        with store.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
        session = store.get_session(1)
        assert session.name == "before the upgrade" and session.parameters["seed"] == 42
        finished, failed = store.get_process(1), store.get_process(2)
        assert finished.status is RunStatus.FINISHED and failed.status is RunStatus.ERROR
        assert [row.data for row in finished.output] == ["made-by-0.1.0.png"]
        assert [row.data for row in failed.output] == ["Error details: out of memory"]
        assert (images / "made-by-0.1.0.png").read_bytes() == b"\x89PNG old picture"
        # New rows go after the old ones (the sequences were carried over).
        new = store.create_session(task_name="TextToImageGenerationTask", name="after the upgrade", parameters={})
        assert new.id == 2
    finally:
        store.close()


def test_the_migrations_build_exactly_the_models_schema(database_url, tmp_path):
    store = Store(database_url, tmp_path / "images")
    try:
        with store.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
            differences = compare_metadata(migration_context(connection), Base.metadata)
        assert differences == [], "a model changed without a migration: make migration MESSAGE=..."
    finally:
        store.close()


def test_opening_an_up_to_date_database_changes_nothing(database_url, tmp_path):
    Store(database_url, tmp_path / "images").close()
    store = Store(database_url, tmp_path / "images")
    try:
        with store.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
            assert set(inspect(connection).get_table_names()) == {
                VERSION_TABLE, "generative_session", "parameter_history", "generative_process", "process_data",
                "stored_file", "batch", "key_usage", "server_secret"}
    finally:
        store.close()


def test_a_database_shared_with_dashais_own_migrations_keeps_them_apart(database_url, tmp_path):
    """DashAI records its Alembic revision in `alembic_version`; this server's is its own table."""
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.exec_driver_sql("INSERT INTO alembic_version VALUES ('dashai_rev_42')")
    engine.dispose()
    store = Store(database_url, tmp_path / "images")
    try:
        with store.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "dashai_rev_42"
    finally:
        store.close()


def test_an_empty_negative_prompt_stored_before_0003_becomes_null(database_url, tmp_path):
    """DashAI's parameter panel shows a stored "" in red: sessions and their history saved as "" read null
    after the upgrade, and their other values are untouched."""
    from alembic import command

    from t2i_task.storage.schema import alembic_config

    engine = create_engine(database_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0002")
        connection.exec_driver_sql(
            "INSERT INTO generative_session (id, created, last_modified, task_name, model_name, parameters, name) "
            "VALUES (1, '2026-12-01 10:00:00', '2026-12-01 10:00:00', 'TextToImageGenerationTask', 'shapes-32', "
            """'{"negative_prompt": "", "seed": 7, "name": ""}', 'empty'), """
            "(2, '2026-12-01 10:00:00', '2026-12-01 10:00:00', 'TextToImageGenerationTask', 'shapes-32', "
            """'{"negative_prompt": "blurry", "seed": 8}', 'set')""")
        connection.exec_driver_sql(
            "INSERT INTO parameter_history (id, session_id, parameters, modified_at) VALUES "
            """(1, 1, '{"negative_prompt": "", "seed": 7}', '2026-12-01 10:00:00')""")
    engine.dispose()

    store = Store(database_url, tmp_path / "images")
    try:
        assert store.get_session(1).parameters == {"negative_prompt": None, "seed": 7, "name": ""}
        assert store.get_session(2).parameters == {"negative_prompt": "blurry", "seed": 8}
        assert [entry.parameters for entry in store.get_parameter_history(1)] == [{"negative_prompt": None, "seed": 7}]
    finally:
        store.close()
