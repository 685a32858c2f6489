"""Composition root: builds the services, wires the handlers, starts and stops in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

import anyio
import nats
from faststream.nats import NatsBroker
from faststream.nats.security import NatsCredentials, NatsNKey, NatsSecurity, NatsUserPassword
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError
from nats.js.manager import JetStreamManager
from prometheus_client import CollectorRegistry

import handlers
from schemas import Domain
from streams import (
    Applied,
    ConsumerLimits,
    Subjects,
    apply,
    check,
    consumer_config,
    evidence_bucket_config,
    stream_configs,
)

from . import tracing
from .detection.detector import DetectorConfig
from .detection.extra import require_for_frames
from .detection.frames import frame_intake
from .detection.pool import DetectorPool, PoolConfig
from .detection.raycluster import connect_ray
from .errors import ConfigError, StoreUnavailable
from .ingest import pull
from .ingest.deadletter import DeadLetters
from .ingest.dedup import CommittedIds, key_prefix
from .ingest.intake import Intake, IntakeServices
from .ingest.pause import Pauses
from .ingest.writer import GroupWriter
from .metrics import Metrics
from .settings import Settings
from .store.eventstore import EventStore

__all__ = [
    "HEADER_ROOM",
    "Worker",
    "apply_streams",
    "apply_streams_once",
    "check_streams",
    "connect_nats",
    "stream_definitions",
    "worker_broker",
]

log = logging.getLogger(__name__)

STREAM_CHECK_S = 60.0
"""How long a starting worker retries reading its streams when the reads time out."""


async def connect_nats(settings: Settings) -> Client:
    """Connect to NATS, or fail at once with an error naming the setting.

    Once connected, the client reconnects for ever; but a server that cannot be reached
    at startup is a configuration problem, so the first attempt does not retry.
    """

    async def quiet(exc: Exception) -> None:
        log.debug("NATS connect attempt failed: %r", exc)

    options = settings.nats_options()
    try:
        probe = await nats.connect(
            settings.nats_servers(),
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=quiet,
            **options,
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        hint = (
            " (check PIPELINE_NATS_USER/PASSWORD, _CREDS_FILE or _NKEY_SEED_FILE)"
            if "authorization" in str(exc).lower()
            else ""
        )
        raise ConfigError(
            "PIPELINE_NATS_URL", f"cannot connect to NATS at {settings.nats_url}: {exc!r}{hint}"
        ) from exc
    await probe.close()

    async def warn(exc: Exception) -> None:
        # One line, not nats-py's traceback for each server of a cluster that is down.
        log.warning("NATS: %r", exc)

    return await nats.connect(
        settings.nats_servers(),
        connect_timeout=5,
        max_reconnect_attempts=-1,
        error_cb=warn,
        **options,
    )


def broker_options(settings: Settings) -> dict[str, Any]:
    """The authentication and TLS of `Settings.nats_options`, as FastStream takes them."""
    tls = settings.nats_tls()
    inbox = {"inbox_prefix": settings.inbox_prefix()}
    security: NatsSecurity
    if settings.nats_creds_file:
        security = NatsCredentials.from_file(settings.nats_creds_file, ssl_context=tls)
    elif settings.nats_nkey_seed_file:
        security = NatsNKey.from_file(settings.nats_nkey_seed_file, ssl_context=tls)
    elif settings.nats_user:
        security = NatsUserPassword(settings.nats_user, settings.nats_password, ssl_context=tls)
    elif tls is not None:
        security = NatsSecurity(ssl_context=tls)
    else:
        return inbox
    return {"security": security, **inbox}


def worker_broker(settings: Settings) -> NatsBroker:
    """The worker's FastStream broker, before its subscribers are registered."""
    # FastStream logs each batch at INFO; only its warnings and errors are wanted.
    broker_log = logging.getLogger("pipeline.broker")
    broker_log.setLevel(logging.WARNING)
    return NatsBroker(
        settings.nats_servers(),
        logger=broker_log,
        graceful_timeout=30.0,
        max_reconnect_attempts=-1,
        # Handlers take the pulled batch from their decoder (`handlers.subscriber`):
        # no dependency injection around each call.
        apply_types=False,
        **broker_options(settings),
    )


def stream_definitions(
    settings: Settings,
) -> tuple[list[StreamConfig], list[tuple[str, ConsumerConfig]]]:
    """Every stream, and the consumers of the enabled domains, as the settings make them."""
    subjects = Subjects(settings.namespace)
    limits = ConsumerLimits(
        ack_wait_s=settings.ack_wait_s, max_ack_pending=settings.max_ack_pending
    )
    frame_limits = ConsumerLimits(
        ack_wait_s=settings.ack_wait_s, max_ack_pending=settings.frames_max_ack_pending
    )
    consumers = [
        (
            subjects.stream(d),
            consumer_config(subjects, d, frame_limits if d is Domain.FRAMES else limits),
        )
        for d in settings.domains
    ]
    streams = stream_configs(
        subjects,
        replicas=settings.stream_replicas,
        frames_max_bytes=settings.frames_max_bytes,
        dead_letters_max_bytes=settings.dead_letters_max_bytes,
        dead_letter_max_body_bytes=settings.dead_letter_max_body_bytes,
    )
    return streams, consumers


async def apply_streams(nc: Client, settings: Settings) -> list[Applied]:
    """Create or update every stream, the evidence bucket and the consumers of the
    enabled domains.

    The operator's step (`pipeline streams apply`): it needs the rights to create and
    update streams, which a worker does not hold.
    """
    streams, consumers = stream_definitions(settings)
    # The incidents' evidence frames: a bucket the workers never touch (not checked by them).
    streams.append(
        evidence_bucket_config(
            Subjects(settings.namespace),
            replicas=settings.stream_replicas,
            max_bytes=settings.evidence_max_bytes,
            max_age_s=settings.evidence_max_age_s,
        )
    )
    await _adopt_legacy_dead_letters(nc, Subjects(settings.namespace))
    return await apply(nc.jsm(), streams, consumers)


async def apply_streams_once(settings: Settings) -> list[Applied]:
    """Connect as the configured NATS user, apply the streams (`apply_streams`), disconnect."""
    nc = await connect_nats(settings)
    try:
        return await apply_streams(nc, settings)
    finally:
        await nc.drain()


async def check_streams(nc: Client, settings: Settings) -> None:
    """Refuse to start unless every stream and consumer a worker needs is as it needs it.

    A worker does not apply streams (its NATS user may not): an operator does, with
    `pipeline streams apply`. Other drift (retention, limits) is logged, not refused.
    """
    streams, consumers = stream_definitions(settings)
    deadline = asyncio.get_running_loop().time() + STREAM_CHECK_S
    while True:
        try:
            found = await check(nc.jsm(), streams, consumers)
            break
        except TimeoutError as exc:
            # In a cluster, a stream whose leader was lost answers nothing until its
            # replicas elect another (seconds): wait for that rather than exit.
            if asyncio.get_running_loop().time() > deadline:
                raise ConfigError(
                    "PIPELINE_NATS_URL",
                    f"cannot read the streams at {settings.nats_url} within "
                    f"{STREAM_CHECK_S:.0f} s: {exc!r}",
                ) from exc
            log.warning("reading the streams timed out (a stream without a leader?); retrying")
        except nats.errors.Error as exc:
            raise ConfigError(
                "PIPELINE_NATS_URL", f"cannot read the streams at {settings.nats_url}: {exc!r}"
            ) from exc
    for change in found.drift:
        log.warning("%s (run `pipeline streams apply` to apply the configured value)", change)
    if found.problems:
        raise ConfigError(
            "streams",
            "; ".join(found.problems)
            + ": run `pipeline streams apply` as the NATS operator user, with the same "
            "PIPELINE_* stream and consumer settings as the workers",
        )


async def _adopt_legacy_dead_letters(nc: Client, subjects: Subjects) -> None:
    """Move an earlier release's dead letters to subjects of their own, before the DLQ
    stream starts keeping one message per subject (see `DeadLetters.adopt_legacy`)."""
    try:
        info = await nc.jsm().stream_info(subjects.dead_letter_stream())
    except NotFoundError:
        return
    if info.config.max_msgs_per_subject == 1:
        return
    moved = await DeadLetters(nc.jetstream(), subjects, max_payload=nc.max_payload).adopt_legacy()
    if moved:
        log.warning("moved %d dead letters of an earlier release to subjects of their own", moved)


class Worker:
    """A pipeline worker: consumes every enabled domain until stopped.

    Use as `async with Worker(settings) as worker: ...`; leaving the block finishes the
    batches in hand, drains NATS and closes the stores, in reverse order of start. With
    `consume=False` it builds the same intakes (`worker.intakes`) without subscribing
    them, for a caller that feeds them itself (`pipeline replay`).
    """

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        consume: bool = True,
    ) -> None:
        self.settings = settings
        self.consume = consume
        self.subjects = Subjects(settings.namespace)
        self.metrics = Metrics(registry)
        self.store: EventStore | None = None
        self._cache: CommittedIds | None = None
        self._admin: Client | None = None
        self._broker: NatsBroker | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_stop = asyncio.Event()
        self._store_problem = ""
        self.intakes: dict[Domain, Intake] = {}
        self.pauses = Pauses(self.metrics, max_s=settings.pause_probe_max_s)
        self._writer: GroupWriter | None = None
        self.pool: DetectorPool | None = None
        self._ray_started = False

    async def __aenter__(self) -> Worker:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, check the streams, open the event store, start consuming."""
        s = self.settings
        s.refuse_unsafe(nats=True)
        if Domain.FRAMES in s.domains:
            require_for_frames(s)
        tracing.configure_tracing(s.otel_exporter_otlp_endpoint, s.otel_service_name)
        self._admin = await connect_nats(s)
        _check_max_payload(self._admin.max_payload, s)
        if self.consume:  # a replay reads through consumers of its own
            await check_streams(self._admin, s)
        try:
            self.store = await anyio.to_thread.run_sync(EventStore, s.eventsourcing_env())
        except StoreUnavailable as exc:
            raise ConfigError(
                "PIPELINE_POSTGRES_HOST",
                f"cannot open the event store at {s.postgres_address()}/{s.postgres_dbname}: {exc}",
            ) from exc
        if s.redis_url:
            self._cache = CommittedIds(
                s.redis_url,
                ttl_s=s.dedup_ttl_s,
                prefix=key_prefix(s.namespace),
                metrics=self.metrics,
                tls_ca_file=s.redis_tls_ca_file,
            )
        dead_letters = DeadLetters(
            self._admin.jetstream(),
            self.subjects,
            max_payload=self._admin.max_payload,
            max_body_bytes=s.dead_letter_max_body_bytes,
        )
        self._writer = GroupWriter(self.store)
        self._writer.start()
        pull.install()
        if Domain.FRAMES in s.domains:
            await self._start_pool()
        services: IntakeServices = {
            "subjects": self.subjects,
            "writer": self._writer,
            "dead_letters": dead_letters,
            "metrics": self.metrics,
            "pauses": self.pauses,
            "max_deliver": s.max_deliver,
            "ack_wait_s": s.ack_wait_s,
            "retry_delay": s.retry_delay,
            "cache": self._cache,
        }
        for domain in s.domains:
            intake: Intake
            if domain is Domain.FRAMES:
                assert self.pool is not None
                intake = frame_intake(
                    pool=self.pool,
                    max_age_s=s.frames_max_age_s,
                    max_pixels=s.frames_max_pixels,
                    stored=self._stored_ids,
                    look_up_all=not self.consume,  # a replay: most frames are stored already
                    max_message_bytes=s.max_frame_bytes,
                    **services,
                )
            else:
                intake = Intake(domain, max_message_bytes=s.max_message_bytes, **services)
            self.intakes[domain] = intake
        if not self.consume:
            return
        self._broker = broker = worker_broker(s)
        for intake in self.intakes.values():
            handlers.register(broker, intake, s, self.subjects)
        await broker.start()
        self._watch_task = asyncio.create_task(self._watch())
        log.info("worker consuming %s from %s", [d.value for d in s.domains], s.nats_url)

    async def stop(self) -> None:
        """Finish the batches in hand, drain NATS, close the stores."""
        if self._watch_task is not None:
            self._watch_stop.set()
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        # Batches waiting for a server that is down give their messages back.
        self.pauses.stop()
        if self._broker is not None:
            # Stop pulling (the batch in hand finishes), let the last commits ack,
            # then drain the connection.
            for subscriber in self._broker.subscribers:
                await self._bounded(subscriber.stop(), "stopping a subscriber", 35.0)
        if self.pool is not None and self.intakes:
            # Frames in the pool get a batch's time to be analysed and stored; then
            # the pool stops and those still waiting for an actor are given back.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(i.flush() for i in self.intakes.values())),
                    self.settings.detector_batch_timeout_s,
                )
            await self.pool.stop()
        for intake in self.intakes.values():
            await self._bounded(
                intake.stop(),
                f"finishing the {intake.domain.value} batches in hand",
                self.settings.detector_batch_timeout_s + self.settings.ack_wait_s,
            )
        self.intakes.clear()
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None
        if self.pool is not None:
            await self.pool.stop()
            self.pool = None
        if self._ray_started:
            import ray

            await anyio.to_thread.run_sync(ray.shutdown)
            self._ray_started = False
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        if self._cache is not None:
            await self._cache.close()
            self._cache = None
        if self._admin is not None:
            await self._admin.drain()
            self._admin = None
        if self.store is not None:
            await anyio.to_thread.run_sync(self.store.close)
            self.store = None

    @staticmethod
    async def _bounded(step: Awaitable[None], what: str, timeout_s: float) -> None:
        """A shutdown step that may not hang the shutdown: what it held is redelivered."""
        try:
            await asyncio.wait_for(step, timeout_s)
        except TimeoutError:
            log.error(
                "%s did not finish within %.0f s; going on (messages not acked are redelivered)",
                what,
                timeout_s,
            )

    async def _stored_ids(self, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        assert self.store is not None
        return await anyio.to_thread.run_sync(self.store.stored, ids)

    async def _start_pool(self) -> None:
        """Connect to Ray (or start it locally) and load the model in every actor."""
        s = self.settings
        try:
            self._ray_started = connect_ray(
                s.ray_address,
                num_cpus=s.ray_num_cpus,
                auth_token=s.ray_auth_token,
                require_auth=s.env == "production",
            )
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                "PIPELINE_RAY_ADDRESS", f"cannot connect to Ray ({s.ray_address!r}): {exc}"
            ) from exc
        self.pool = DetectorPool(
            DetectorConfig.from_settings(s),
            PoolConfig.from_settings(s),
            self.metrics,
            pauses=self.pauses,
        )
        await self.pool.start()

    async def _watch_dead_letters(self, jsm: JetStreamManager) -> None:
        """The DLQ stream's bytes, cap and letters to the metrics (alerts fire before it
        is full: full, it refuses letters and the domains that have one to write pause)."""
        name = self.subjects.dead_letter_stream()
        try:
            info = await jsm.stream_info(name)
        except (NotFoundError, nats.errors.Error, TimeoutError):
            return
        self.metrics.dead_letter_bytes.labels(name).set(info.state.bytes or 0)
        self.metrics.dead_letter_limit_bytes.labels(name).set(info.config.max_bytes or -1)
        self.metrics.dead_letter_messages.labels(name).set(info.state.messages or 0)

    def ready(self) -> list[str]:
        """What keeps the worker from being ready: empty when it consumes normally.

        Called from the metrics server's thread: it only reads state.
        """
        problems = []
        if self._broker is None or self._admin is None:
            problems.append("not started")
        elif not self._admin.is_connected:
            problems.append(f"not connected to NATS at {self.settings.nats_url}")
        if self._store_problem:
            problems.append(f"event store unreachable: {self._store_problem}")
        return problems + self.pauses.active()

    async def _watch(self) -> None:
        """Every `consumer_lag_interval_s`: consumer lag and the DLQ's fill to the metrics,
        the store's health."""
        assert self._admin is not None and self.store is not None
        jsm = self._admin.jsm()
        # Ends on `_watch_stop`, not only on cancellation: Python 3.11's `wait_for` (in
        # nats-py's requests) can swallow a cancellation that meets a reply, and the loop
        # would go on for ever under a stopping worker.
        while not self._watch_stop.is_set():
            for domain in self.settings.domains:
                try:
                    info = await jsm.consumer_info(
                        self.subjects.stream(domain), self.subjects.durable(domain)
                    )
                except (NotFoundError, nats.errors.Error, TimeoutError):
                    continue
                self.metrics.consumer_pending.labels(domain.value).set(info.num_pending or 0)
                self.metrics.consumer_ack_pending.labels(domain.value).set(
                    info.num_ack_pending or 0
                )
            await self._watch_dead_letters(jsm)
            try:
                await anyio.to_thread.run_sync(self.store.ping)
                self._store_problem = ""
            except StoreUnavailable as exc:
                self._store_problem = str(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._watch_stop.wait(), self.settings.consumer_lag_interval_s
                )


HEADER_ROOM = 16 * 1024
"""Bytes of headers a frame or message may carry besides its body."""


def _check_max_payload(max_payload: int, settings: Settings) -> None:
    """Refuse to start when the NATS server cannot carry the largest accepted message."""
    limits = [("PIPELINE_MAX_MESSAGE_BYTES", settings.max_message_bytes)]
    if Domain.FRAMES in settings.domains:
        limits.append(("PIPELINE_MAX_FRAME_BYTES", settings.max_frame_bytes))
    for name, limit in limits:
        if max_payload < limit + HEADER_ROOM:
            raise ConfigError(
                name,
                f"the NATS server at {settings.nats_url} takes messages of at most "
                f"{max_payload} bytes (its max_payload), less than {name} ({limit}) plus "
                f"{HEADER_ROOM} bytes of headers: raise max_payload in the server's "
                f"configuration (deploy/nats/nats.conf sets 9MB) or lower {name}",
            )
