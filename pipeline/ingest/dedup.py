"""Optional Redis cache of ids the event store has committed.

It only ever learns an id after the commit, so it can never make the pipeline skip a
message that is not stored. When Redis is slow or down the pipeline goes on without
it (the event store's own check is authoritative) and tries Redis again a little later.

It needs two commands, MGET and SET, on the keys under its prefix: `acl_rules` gives the
Redis ACL rules of a user limited to exactly that (deploy/docker-compose.yml and the
README's Redis paragraph use them), and the URL names that user.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..metrics import Metrics

__all__ = ["COMMANDS", "CommittedIds", "acl_rules", "key_prefix"]

log = logging.getLogger(__name__)

_PAUSE_AFTER_ERROR_S = 5.0

COMMANDS = ("mget", "set")
"""Every command the cache sends (besides the connection's own HELLO and AUTH)."""


def key_prefix(namespace: str) -> str:
    """The prefix of the cache's keys for a pipeline namespace (`PIPELINE_NAMESPACE`)."""
    return f"pipeline:{namespace or 'default'}:committed"


def acl_rules(prefix: str) -> str:
    """Redis ACL rules for the cache's user: its keys and commands, no channels.

    `ACL SETUSER <user> on ><password> <rules>`, or a `user` line of an ACL file.
    """
    return " ".join(
        ["resetchannels", "resetkeys", f"~{prefix}:*", "-@all", *(f"+{c}" for c in COMMANDS)]
    )


class CommittedIds:
    """Cache of committed event ids, keyed `<prefix>:<uuid>` with a TTL."""

    def __init__(
        self, url: str, *, ttl_s: int, prefix: str, metrics: Metrics, tls_ca_file: str = ""
    ) -> None:
        # rediss:// is TLS, checked against the system's CAs or `tls_ca_file`.
        tls: dict[str, Any] = (
            {"ssl_ca_certs": tls_ca_file} if tls_ca_file and url.startswith("rediss:") else {}
        )
        self._redis = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, **tls)
        self._ttl_s = ttl_s
        self._prefix = prefix
        self._metrics = metrics
        self._paused_until = 0.0

    def _key(self, event_id: uuid.UUID) -> str:
        return f"{self._prefix}:{event_id}"

    def _available(self) -> bool:
        return time.monotonic() >= self._paused_until

    def _failed(self, exc: RedisError) -> None:
        self._metrics.cache_errors.inc()
        self._paused_until = time.monotonic() + _PAUSE_AFTER_ERROR_S
        log.warning("Redis id cache unavailable, using the event store alone: %s", exc)

    async def known(self, ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """The ids the cache knows to be committed; empty when Redis is unavailable."""
        if not ids or not self._available():
            return set()
        ordered = list(ids)
        try:
            values = await self._redis.mget([self._key(i) for i in ordered])
        except RedisError as exc:
            self._failed(exc)
            return set()
        return {i for i, v in zip(ordered, values, strict=True) if v is not None}

    async def remember(self, ids: Collection[uuid.UUID]) -> None:
        """Record ids that are committed; call only after the commit."""
        if not ids or not self._available():
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.set(self._key(i), b"1", ex=self._ttl_s)
                await pipe.execute()
        except RedisError as exc:
            self._failed(exc)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
