"""The blocklist of accounts, devices and IPs, kept in Redis beside their velocity keys.

Each entry is a key under the entity's own hash tag, so the velocity script of a Check sees it
in the same round trip (no extra lookup). An index set lists entries for operators; like every
key, it holds only hashed ids. Managed off the hot path with redis-py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import cast

import redis

from gate.settings import Settings
from gate.velocity import IdHasher, Keys, normalize_ip

KINDS = {"account": "a", "device": "d", "ip": "i"}


@dataclass(frozen=True, slots=True)
class Entry:
    """One blocklist entry as operators see it (the id only as its hash)."""

    kind: str
    id_hash: str
    added_at: float
    note: str
    expires_at: float | None


class Blocklist:
    """Add, remove and read blocklist entries."""

    def __init__(self, client: redis.Redis, keys: Keys, hasher: IdHasher) -> None:
        self.client = client
        self.keys = keys
        self.hash = hasher

    @classmethod
    def from_settings(cls, settings: Settings) -> Blocklist:
        """A blocklist on the settings' Redis, key prefix and id hash key."""
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, Keys(settings.key_prefix), IdHasher(settings.id_hash_key))

    def _locate(self, kind: str, value: str) -> tuple[str, str, str]:
        code = KINDS[kind]
        h = self.hash(code, normalize_ip(value) if kind == "ip" else value)
        return code, h, self.keys.blocklist(code, h)

    def add(self, kind: str, value: str, *, note: str = "", ttl_s: float | None = None) -> Entry:
        """Block an id (optionally for ``ttl_s`` seconds); replaces an existing entry."""
        code, h, key = self._locate(kind, value)
        now = time.time()
        expires = now + ttl_s if ttl_s else None
        entry = Entry(kind, h, now, note, expires)
        pipe = self.client.pipeline(transaction=False)
        if ttl_s:
            pipe.set(key, json.dumps(asdict(entry)), px=int(ttl_s * 1000))
        else:
            pipe.set(key, json.dumps(asdict(entry)))
        pipe.zadd(self.keys.blocklist_index, {f"{code}:{h}": now})
        pipe.execute()
        return entry

    def remove(self, kind: str, value: str) -> bool:
        """Unblock an id; True if it was blocked."""
        code, h, key = self._locate(kind, value)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(key)
        pipe.zrem(self.keys.blocklist_index, f"{code}:{h}")
        removed, _ = pipe.execute()
        return bool(removed)

    def show(self, kind: str, value: str) -> Entry | None:
        """The entry of an id, or None."""
        _, _, key = self._locate(kind, value)
        raw = self.client.get(key)
        return Entry(**json.loads(raw)) if raw else None

    def list(self) -> list[Entry]:
        """Every live entry; index members whose entry expired are dropped on the way."""
        out: list[Entry] = []
        members = cast(list[bytes], self.client.zrange(self.keys.blocklist_index, 0, -1))
        for member in members:
            code, _, h = member.decode().partition(":")
            raw = self.client.get(self.keys.blocklist(code, h))
            if raw is None:
                self.client.zrem(self.keys.blocklist_index, member)
            else:
                out.append(Entry(**json.loads(raw)))
        return out
