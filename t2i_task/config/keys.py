"""API keys and whose they are: each key names a caller (its owner's name and role).

Keys come from two places. `serving.api_keys` (T2I_API_KEYS) lists `name:key` pairs,
or bare keys whose owner is named by a short hash of the key; their callers are
users. For live operation, `serving.api_keys_file` (on Kubernetes a mounted Secret)
is YAML holding, for each key, a name, the SHA-256 of the key (never the key) and a
role, `user` or `admin`:

    keys:
      - {name: alice, sha256: 2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90, role: user}
      - {name: ops, sha256: ..., role: admin}

The file is read again when it changes (its modification time and size are looked at
on every key check, a few microseconds), so a key is added or revoked on every replica
without a restart, taking effect at its next call; a file that cannot be
read or parsed keeps the keys it last held, and the log says why. A key is matched
by comparing its SHA-256 with every known one in constant time; keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Role = Literal["user", "admin"]
log = logging.getLogger("t2i.keys")


@dataclass(frozen=True)
class Caller:
    """Who a request's key belongs to: everything it makes is theirs."""

    name: str
    role: Role = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bare_key_name(key: str) -> str:
    """The owner of a key given without a name: a short hash of it (not the key)."""
    return "key-" + key_hash(key)[:10]


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.@-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Role = "user"


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


def listed_keys(items: list[str]) -> list[KeyEntry]:
    """`serving.api_keys`: `name:key` pairs or bare keys, each a user."""
    entries = []
    for item in items:
        name, colon, key = item.partition(":")
        if not colon:
            name, key = bare_key_name(item), item
        entries.append(KeyEntry(name=name, sha256=key_hash(key)))
    return entries


class KeyRing:
    """The keys a server accepts, from its settings and its keys file (kept up to date)."""

    def __init__(self, listed: list[str], keys_file: Path | None = None) -> None:
        self.listed = listed_keys(listed)
        self.keys_file = keys_file
        self._from_file: list[KeyEntry] = []
        self._seen: tuple[int, int] | str | None = None  # the file's (mtime, size) when last read
        self._reload()

    @property
    def enabled(self) -> bool:
        """Whether keys are required: any key listed or a keys file configured (even if empty now)."""
        return bool(self.listed) or self.keys_file is not None

    def caller(self, presented: str) -> Caller | None:
        """The caller a presented key belongs to, or None. Every entry is compared, whatever matches first."""
        self._reload()
        digest = key_hash(presented).encode()
        found = None
        for entry in [*self.listed, *self._from_file]:
            if hmac.compare_digest(digest, entry.sha256.encode()) and found is None:
                found = Caller(entry.name, entry.role)
        return found

    def _reload(self) -> None:
        """Read the keys file again if it changed since it was last read."""
        if self.keys_file is None:
            return
        try:
            stat = os.stat(self.keys_file)
        except OSError as exc:
            if self._seen != "unreadable":  # said once, not at every call
                log.warning("keys file %s cannot be read (%s): keeping the keys it last held", self.keys_file,
                            type(exc).__name__)
                self._seen = "unreadable"
            return
        if (stat.st_mtime_ns, stat.st_size) == self._seen:
            return
        self._seen = (stat.st_mtime_ns, stat.st_size)  # a broken file is said once too
        try:
            parsed = KeysFile.model_validate(yaml.safe_load(Path(self.keys_file).read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            log.warning("keys file %s is not valid (%s): keeping the keys it last held", self.keys_file,
                        str(exc).splitlines()[0])
            return
        self._from_file = parsed.keys
        log.info("keys file %s read: %d key(s)", self.keys_file, len(self._from_file))
