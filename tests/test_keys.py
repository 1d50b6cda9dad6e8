"""API keys with identities (t2i_task/config/keys.py): named pairs, bare keys, and a keys file that a
running server reads again when it changes."""

from __future__ import annotations

import logging

import httpx
import pytest
import yaml

from t2i_task.config.keys import Caller, KeyRing, bare_key_name, key_hash
from t2i_task.local_server import start_server, write_config


def write_keys(path, *entries: tuple[str, str, str]) -> None:
    """(name, key, role) entries, stored as the file holds them: the key's SHA-256, never the key."""
    path.write_text(yaml.safe_dump({"keys": [{"name": name, "sha256": key_hash(key), "role": role}
                                             for name, key, role in entries]}))


def test_listed_keys_name_their_owner_and_bare_keys_are_named_by_a_hash():
    ring = KeyRing(["alice:a-secret-1", "a-bare-secret"])
    assert ring.caller("a-secret-1") == Caller("alice", "user")
    bare = ring.caller("a-bare-secret")
    assert bare == Caller(bare_key_name("a-bare-secret")) and "a-bare-secret" not in bare.name
    assert ring.caller("alice") is None and ring.caller("") is None and ring.caller("a-secret-2") is None
    assert not KeyRing([]).enabled and ring.enabled


def test_the_keys_file_is_read_again_when_it_changes_and_a_broken_one_keeps_the_last_keys(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    write_keys(path, ("alice", "alice-key", "user"), ("ops", "ops-key", "admin"))
    ring = KeyRing([], path)
    assert ring.caller("alice-key") == Caller("alice", "user")
    assert ring.caller("ops-key").is_admin

    write_keys(path, ("ops", "ops-key", "admin"), ("bob", "bob-key", "user"))  # alice revoked, bob added
    assert ring.caller("alice-key") is None
    assert ring.caller("bob-key") == Caller("bob", "user")

    with caplog.at_level(logging.WARNING, logger="t2i.keys"):
        path.write_text("keys: [{name: eve, sha256: not-a-hash}]")
        assert ring.caller("bob-key") == Caller("bob", "user"), "a broken file keeps the keys it last held"
    assert "not valid" in caplog.text and "bob-key" not in caplog.text


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    keys_file = folder / "keys.yaml"
    write_keys(keys_file, ("ops", "ops-key", "admin"))
    server = start_server(write_config(folder, serving={"api_keys_file": str(keys_file)}),
                          env={"T2I_API_KEYS": "alice:alice-key"})
    yield server, keys_file
    server.stop()


def status(server, key: str) -> int:
    return httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def test_a_key_added_to_the_file_is_accepted_and_a_revoked_one_refused_at_their_next_call(keyed_server):
    server, keys_file = keyed_server
    assert status(server, "alice-key") == 200 and status(server, "ops-key") == 200
    assert status(server, "bob-key") == 401

    write_keys(keys_file, ("ops", "ops-key", "admin"), ("bob", "bob-key", "user"))
    assert status(server, "bob-key") == 200

    write_keys(keys_file, ("bob", "bob-key", "user"))  # ops revoked: refused at its next call
    assert status(server, "ops-key") == 401
    assert status(server, "alice-key") == 200, "keys from T2I_API_KEYS stay"
    log = server.log.read_text()
    assert "bob-key" not in log and "ops-key" not in log and "alice-key" not in log


def test_rows_from_before_keys_had_names_belong_to_the_configured_owner_or_to_admins(tmp_path):
    """owner_of: with no keys everything is the one user's; a user sees their own rows, and the unnamed ones
    ("" owner) only if serving.unnamed_rows_owner names them; an admin sees all; a keyless request on a
    server that needs keys (a page, a signed link) sees nothing."""
    import asyncio
    from types import SimpleNamespace

    from t2i_task.api.backend import owner_of
    from t2i_task.storage.store import Store

    def owner(caller, keys_required=True, unnamed=None):
        request = SimpleNamespace(state=SimpleNamespace(caller=caller, keys_required=keys_required))
        backend = SimpleNamespace(settings=SimpleNamespace(serving=SimpleNamespace(unnamed_rows_owner=unnamed)))
        return asyncio.run(owner_of(request, backend))

    store = Store(f"sqlite:///{tmp_path / 't2i.db'}", tmp_path / "images")
    try:
        old = store.create_session(task_name="TextToImageGenerationTask", name="before keys", parameters={})
        alices = store.create_session(task_name="TextToImageGenerationTask", name="alice's", parameters={},
                                      account="alice")

        def seen(who) -> set[int]:
            return {session.id for session in store.list_sessions(scope=who.scope)}

        assert seen(owner(None, keys_required=False)) == {old.id, alices.id}
        assert seen(owner(Caller("alice"))) == {alices.id}
        assert seen(owner(Caller("alice"), unnamed="alice")) == {old.id, alices.id}
        assert seen(owner(Caller("bob"), unnamed="alice")) == set()
        assert seen(owner(Caller("ops", "admin"))) == {old.id, alices.id}
        assert seen(owner(None)) == set()
        assert owner(Caller("alice")).account == "alice"
    finally:
        store.close()
