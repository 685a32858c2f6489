"""The `pipeline` command: run a worker, the demo, the simulator; streams, DLQ, models."""

from __future__ import annotations

# Only what every command needs is imported here: each command imports its own modules,
# so that `pipeline --help` and the quick commands start at once (bench/startup.py).
import argparse
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import Domain

from ..errors import ConfigError, PipelineError
from .demoenv import DEMO_DIR, chosen_env_file

if TYPE_CHECKING:
    import asyncio

    from ..ingest.deadletter import DeadLetter
    from ..settings import Settings

__all__ = ["main"]

log = logging.getLogger("pipeline")


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, from the environment and the settings file the command was given
    (`--demo`, `PIPELINE_ENV_FILE`; `./.env` by default)."""
    from pydantic import ValidationError

    from ..settings import Settings

    env_file = getattr(args, "env_file", None)
    try:
        return Settings(_env_file=env_file) if env_file else Settings()
    except ValidationError as exc:
        raise ConfigError("settings", "; ".join(map(_problem, exc.errors()))) from None


def _problem(error: Any) -> str:
    """One setting's problem, named once: `PIPELINE_X: what is wrong` (pydantic's
    "Value error, " left out; a message of ours names its setting itself)."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith("PIPELINE_") or not error["loc"]:
        return message
    return f"PIPELINE_{'_'.join(str(p) for p in error['loc']).upper()}: {message}"


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_worker(args: argparse.Namespace) -> None:
    from ..app import Worker
    from ..metrics import serve_metrics
    from .supervisor import supervise

    settings = _settings(args)
    if settings.processes > 1:
        await supervise(settings, _stop_event(), getattr(args, "env_file", None))
        return
    async with Worker(settings) as worker:
        # What start-up made lives as long as the process: kept out of the collector's
        # full passes, which otherwise walk it every few seconds and stall every batch in
        # hand (0.2-0.4 s measured on a busy host; under 1 ms with it frozen).
        gc.freeze()
        server = None
        if settings.metrics_port:
            server = serve_metrics(
                worker.metrics, settings.metrics_host, settings.metrics_port, ready=worker.ready
            )
            log.info(
                "metrics on http://%s:%d/metrics, health on /healthz and /readyz",
                settings.metrics_host,
                settings.metrics_port,
            )
        await _stop_event().wait()
        log.info("stopping: finishing the batches in hand")
        if server is not None:
            server.shutdown()


async def _run(args: argparse.Namespace) -> None:
    if args.process == "worker":
        await _run_worker(args)
        return
    run: Callable[[Settings, asyncio.Event], Awaitable[None]]
    if args.process == "projections":
        from .readside import run_projections as run
    elif args.process == "audit":
        from .auditor import run_audit as run
    elif args.process == "incidents":
        from .incidents import run_incidents as run
    else:
        from ..api.server import run_api as run
    gc.freeze()  # the modules imported live as long as the process (see `_run_worker`)
    await run(_settings(args), _stop_event())


async def _audit(args: argparse.Namespace) -> None:
    from . import audit

    settings = _settings(args)
    if args.action == "keygen":
        audit.keygen(settings)
    elif args.action == "status":
        audit.status(settings, as_json=args.json)
    elif args.action == "prove":
        audit.prove(settings, args.event)
    elif args.action == "consistency":
        audit.consistency(settings, args.old_size, args.new_size)
    elif args.action == "export":
        audit.export(settings, args.directory)
    elif args.action == "witness-keygen":
        audit.witness_keygen(args.file, args.name)
    elif args.action == "witness":
        await audit.witness(
            url=args.url,
            key=args.key,
            log_keys=args.log_keys,
            state=args.state,
            interval_s=args.interval,
            once=args.once,
            stop=_stop_event(),
        )
    else:
        audit.verify(
            settings,
            source=args.source,
            url=args.url,
            state=args.state,
            keys_file=args.keys,
            trusted=args.checkpoint,
            as_json=args.json,
        )


async def _projections(args: argparse.Namespace) -> None:
    from projections.positions import SkipRefused

    from . import readside

    settings = _settings(args)
    try:
        if args.action == "status":
            readside.projections_status(settings, as_json=args.json)
        elif args.action == "rebuild":
            if bool(args.names) == args.all:
                raise PipelineError("name the views to rebuild, or give --all")
            readside.projections_rebuild(
                settings, args.names, after=args.from_position, jobs=args.jobs, as_json=args.json
            )
        else:
            readside.projections_skip(
                settings, args.name, args.position, note=args.note, as_json=args.json
            )
    except (KeyError, SkipRefused, readside.RebuildError) as exc:
        raise PipelineError(str(exc).strip("'\"")) from None


async def _incidents(args: argparse.Namespace) -> None:
    import anyio

    from .incidents import incidents_rebuild

    settings = _settings(args)
    await anyio.to_thread.run_sync(lambda: incidents_rebuild(settings, as_json=args.json))


async def _events(args: argparse.Namespace) -> None:
    import anyio

    from . import readside

    settings = _settings(args)
    if args.action == "get":
        if not readside.events_get(settings, args.id):
            raise PipelineError(f"no stored event with event id or message id {args.id!r}")
        return
    stop = _stop_event()
    await anyio.to_thread.run_sync(
        lambda: readside.events_tail(
            settings,
            domain=Domain(args.domain) if args.domain else None,
            limit=args.limit,
            follow=args.follow,
            as_json=args.json,
            stop=stop.is_set,
        )
    )


async def _licences(args: argparse.Namespace) -> None:
    import json

    from .licences import ALLOWED, dependency_licences

    found = dependency_licences()
    if args.json:
        print(json.dumps([entry.as_json() for entry in found], indent=2))
        return
    for entry in found:
        mark = "" if entry.identifiers() <= ALLOWED else "   <- not on the project's list"
        print(f"{entry.name:<32} {entry.version:<14} {entry.licence}{mark}")


async def _healthcheck(args: argparse.Namespace) -> None:
    """Exit 0 if a process of this host answers `/healthz` (the container's HEALTHCHECK);
    with `PIPELINE_PROCESSES=N`, only if each of the N worker processes does."""
    import anyio

    from .supervisor import metrics_ports

    settings = _settings(args)
    roles = [
        metrics_ports(settings),
        [settings.projections_metrics_port],
        [settings.api_port],
        [settings.audit_metrics_port],
        [settings.incidents_metrics_port],
    ]
    for ports in (r for r in roles if r and all(r)):
        urls = [f"http://127.0.0.1:{port}/healthz" for port in ports]
        alive = [await anyio.to_thread.run_sync(_alive, url) for url in urls]
        if all(alive):
            print(f"{', '.join(urls)}: alive")
            return
        if any(alive):
            silent = ", ".join(url for url, ok in zip(urls, alive, strict=True) if not ok)
            raise PipelineError(f"{silent}: no answer (the other worker processes answer)")
    raise PipelineError(f"no /healthz answered on 127.0.0.1 ports {[p for r in roles for p in r]}")


def _alive(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _time(value: str) -> datetime:
    """ISO 8601 with its offset (as the API takes it), or a duration ago: 90s, 15m, 2h, 1d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither an ISO 8601 time nor a duration such as 15m or 2h"
        ) from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} has no UTC offset: add one (Z, +01:00), as in {value}Z"
        )
    return parsed


async def _replay(args: argparse.Namespace) -> None:
    import json

    from .replay import replay

    settings = _settings(args)
    # A line per message only when asked: a replay goes over thousands (a bar shows them).
    quiet = None if getattr(args, "verbose", False) else logging.getLogger("pipeline")
    level = quiet.level if quiet else logging.NOTSET
    if quiet:
        quiet.setLevel(logging.WARNING)
    try:
        done = await replay(settings, Domain(args.domain), args.since, args.until)
    finally:
        if quiet:
            quiet.setLevel(level)
    if args.json:
        print(json.dumps(done.__dict__))
    else:
        print(
            f"replayed {done.messages:,} {done.domain} messages: {done.stored:,} stored, "
            f"{done.duplicates:,} stored already, {done.dead_lettered:,} dead-lettered, "
            f"{done.already_dead_lettered:,} invalid, already in the DLQ"
        )


async def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    await run_demo(
        Path(args.data_dir).resolve(),
        rate=args.rate,
        duration_s=args.duration,
        stop=_stop_event(),
        cameras=args.cameras,
        fps=args.fps,
        model=args.model,
        max_disk_bytes=int(args.max_disk_mb * 1000**2),
    )


async def _simulate(args: argparse.Namespace) -> None:
    import asyncio
    import json
    from collections import Counter

    from streams import Subjects

    from ..app import connect_nats
    from .simulate import Cameras, Traffic, publish

    settings = _settings(args)
    subjects = Subjects(settings.namespace)
    nc = await connect_nats(settings)
    try:
        producers = []
        if not args.frames_only:
            traffic = Traffic(
                subjects,
                bad_ratio=args.bad_ratio,
                duplicate_ratio=args.duplicate_ratio,
                seed=args.seed,
            )
            producers.append(
                publish(
                    nc.jetstream(),
                    iter(traffic),
                    rate=args.rate,
                    count=args.count,
                    duration_s=args.duration,
                )
            )
        if args.cameras:
            cameras = Cameras(
                subjects, cameras=args.cameras, width=args.width, height=args.height, seed=args.seed
            )
            producers.append(
                publish(
                    nc.jetstream(),
                    iter(cameras),
                    rate=args.fps * args.cameras,
                    count=args.count,
                    duration_s=args.duration,
                )
            )
        counts: Counter[str] = Counter()
        for result in await asyncio.gather(*producers):
            counts.update(result)
        print(json.dumps(dict(counts)))
    finally:
        await nc.drain()


async def _model(args: argparse.Namespace) -> None:
    import anyio

    from ..detection.detector import export_model

    out = await anyio.to_thread.run_sync(
        lambda: export_model(
            args.model,
            args.format,
            imgsz=args.imgsz,
            half=args.half,
            device=args.device,
            out_dir=Path(args.out_dir) if args.out_dir else None,
        )
    )
    print(f"exported {out}; use it with PIPELINE_DETECTOR_MODEL={out}")


async def _streams(args: argparse.Namespace) -> None:
    from streams import Subjects, status

    from ..app import apply_streams, connect_nats

    settings = _settings(args)
    nc = await connect_nats(settings)
    try:
        if args.action == "apply":
            results = await apply_streams(nc, settings)
            for result in results:
                print(result)
            if any(r.action == "failed" for r in results):
                raise PipelineError("some streams or consumers could not be updated (see above)")
        else:
            subjects = Subjects(settings.namespace)
            names = [subjects.stream(d) for d in Domain] + [subjects.dead_letter_stream()]
            for info in await status(nc.jsm(), names):
                print(info)
    finally:
        await nc.drain()


async def _db(args: argparse.Namespace) -> None:
    import anyio
    import psycopg

    from .migrate import migrate

    settings = _settings(args)
    try:
        print(await anyio.to_thread.run_sync(migrate, settings))
    except psycopg.Error as exc:
        raise PipelineError(
            f"cannot migrate schema {settings.postgres_schema} as {settings.postgres_user} "
            f"at {settings.postgres_address()}: {exc} (run it as the "
            "database owner: PIPELINE_POSTGRES_USER, PIPELINE_POSTGRES_PASSWORD(_FILE))"
        ) from exc


def _listed(shown: int, total: int, domain: Domain | None) -> str:
    """The last line of `dlq list`: how many letters there are and how many it showed."""
    of = f" {domain.value}" if domain else ""
    if shown >= total:
        return f"{total:,}{of} dead letter(s)"
    return f"showing {shown:,} of {total:,}{of} dead letter(s); --limit N or --all for more"


def _describe(letter: DeadLetter, *, full: bool) -> str:
    head = (
        f"#{letter.dlq_seq} {letter.dead_lettered_at:%Y-%m-%d %H:%M:%S} {letter.reason.value:<20} "
        f"{letter.subject} (stream {letter.stream} seq {letter.stream_seq}, "
        f"delivered {letter.delivered})"
    )
    if not full:
        return f"{head}\n    {letter.detail[:160]}"
    body = letter.body.decode("utf-8", errors="replace")
    headers = "\n".join(f"  {k}: {v}" for k, v in letter.headers.items())
    if letter.headers_dropped:
        headers = "  (left out: they did not fit the server's max_payload)"
    size = f"{len(letter.body)} bytes"
    if letter.body_bytes is not None:
        size = (
            f"the first {len(letter.body)} of {letter.body_bytes} bytes, "
            f"sha256 {letter.body_sha256}"
        )
    return f"{head}\ndetail: {letter.detail}\nheaders:\n{headers}\nbody ({size}):\n{body[:4000]}"


async def _dlq(args: argparse.Namespace) -> None:
    from nats.js.errors import NotFoundError

    from streams import Subjects

    from ..app import connect_nats
    from ..ingest.deadletter import DeadLetters
    from .failures import no_stream

    settings = _settings(args)
    nc = await connect_nats(settings)
    subjects = Subjects(settings.namespace)
    letters = DeadLetters(nc.jetstream(), subjects, max_payload=nc.max_payload)
    domain = Domain(args.domain) if getattr(args, "domain", None) else None
    try:
        if args.action == "list":
            try:
                total = await letters.count(domain)
            except NotFoundError:
                raise no_stream(settings, subjects.dead_letter_stream()) from None
            found = await letters.list(domain, limit=None if args.all else args.limit)
            for letter in found:
                print(_describe(letter, full=False))
            print(_listed(len(found), max(total, len(found)), domain))
        elif args.action == "show":
            print(_describe(await letters.get(args.seq), full=True))
        elif args.action == "requeue":
            for seq in args.seq:
                print(f"#{seq} requeued to {await letters.requeue(seq)}")
        elif args.action == "purge":
            if not args.yes:
                raise ConfigError("--yes", "purge deletes dead letters for good; add --yes")
            await letters.purge(domain)
            print("purged")
    except NotFoundError:
        raise PipelineError("no such dead letter (see `pipeline dlq list`)") from None
    finally:
        await nc.drain()


async def _schemas(args: argparse.Namespace) -> None:
    from ..settings import Settings
    from .export import export_schemas

    for path in export_schemas(Path(args.directory), Settings(_env_file=None)):
        print(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="use the settings of the `pipeline demo` running from this folder "
        "(.pipeline-demo/demo.env; elsewhere: PIPELINE_ENV_FILE=<its data dir>/demo.env)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a process")
    run.add_argument("process", choices=["worker", "projections", "api", "audit", "incidents"])
    run.set_defaults(func=_run)

    proj = sub.add_parser("projections", help="status, rebuild or skip of the views")
    proj_sub = proj.add_subparsers(dest="action", required=True)
    proj_status = proj_sub.add_parser("status", help="position, lag and state of each view")
    proj_status.add_argument("--json", action="store_true")
    proj_rebuild = proj_sub.add_parser(
        "rebuild", help="rebuild views beside the live ones, then swap them in"
    )
    proj_rebuild.add_argument("names", nargs="*", metavar="NAME", help="the views to rebuild")
    proj_rebuild.add_argument("--all", action="store_true", help="rebuild every view")
    proj_rebuild.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="views rebuilt at once, each in a process (default: one per core)",
    )
    proj_rebuild.add_argument(
        "--from",
        dest="from_position",
        type=int,
        default=0,
        help="apply only the events after this position (default: all)",
    )
    proj_rebuild.add_argument("--json", action="store_true")
    proj_skip = proj_sub.add_parser("skip", help="move a stalled view past the event at POS")
    proj_skip.add_argument("name")
    proj_skip.add_argument("position", type=int)
    proj_skip.add_argument("--note", default="", help="why (kept with the skip)")
    proj_skip.add_argument("--json", action="store_true")
    proj.set_defaults(func=_projections)

    incidents = sub.add_parser("incidents", help="rebuild the incidents")
    incidents_sub = incidents.add_subparsers(dest="action", required=True)
    incidents_rebuild = incidents_sub.add_parser(
        "rebuild",
        help="replay every incident from position 0 (recording nothing already recorded) "
        "and refold the incidents read model; with `pipeline run incidents` stopped",
    )
    incidents_rebuild.add_argument("--json", action="store_true")
    incidents.set_defaults(func=_incidents)

    events = sub.add_parser("events", help="show stored events")
    events_sub = events.add_subparsers(dest="action", required=True)
    events_tail = events_sub.add_parser("tail", help="the last events; --follow for new ones")
    events_tail.add_argument("--domain", choices=[d.value for d in Domain])
    events_tail.add_argument("--limit", type=int, default=20)
    events_tail.add_argument("--follow", action="store_true")
    events_tail.add_argument("--json", action="store_true", help="one JSON object per line")
    events_get = events_sub.add_parser("get", help="one event by event id or message id")
    events_get.add_argument("id")
    events.set_defaults(func=_events)

    replay = sub.add_parser(
        "replay", help="re-drive messages a stream still holds through the pipeline"
    )
    replay.add_argument("domain", choices=[d.value for d in Domain])
    replay.add_argument("--since", type=_time, required=True, help="ISO 8601, or 15m, 2h...")
    replay.add_argument("--until", type=_time, default=None, help="ISO 8601, or 15m, 2h...")
    replay.add_argument("--json", action="store_true")
    replay.add_argument(
        "--verbose", action="store_true", help="a line for each message dead-lettered"
    )
    replay.set_defaults(func=_replay)

    licences = sub.add_parser("licences", help="the licence of every package installed for it")
    licences.add_argument("--json", action="store_true")
    licences.set_defaults(func=_licences)

    health = sub.add_parser("healthcheck", help="exit 0 if a local process answers /healthz")
    health.set_defaults(func=_healthcheck)

    demo = sub.add_parser("demo", help="embedded servers + worker + simulator, no setup")
    demo.add_argument(
        "--data-dir",
        default=str(DEMO_DIR),
        help="where the servers keep data, and demo.env the settings for `pipeline --demo`",
    )
    demo.add_argument("--rate", type=float, default=500.0, help="messages per second")
    demo.add_argument(
        "--duration", type=float, default=None, help="seconds (default: until Ctrl-C)"
    )
    demo.add_argument("--cameras", type=int, default=2, help="simulated cameras (0: none)")
    demo.add_argument("--fps", type=float, default=1.0, help="frames per second per camera")
    demo.add_argument(
        "--model", default=None, help="detection model (default: PIPELINE_DETECTOR_MODEL)"
    )
    demo.add_argument(
        "--max-disk-mb",
        type=float,
        default=1000.0,
        help="stop the producers once the data dir holds this many MB (default 1000)",
    )
    demo.set_defaults(func=_demo)

    sim = sub.add_parser("simulate", help="publish realistic traffic to PIPELINE_NATS_URL")
    sim.add_argument(
        "--rate", type=float, default=200.0, help="messages per second (0: as fast as possible)"
    )
    sim.add_argument("--count", type=int, default=None)
    sim.add_argument("--duration", type=float, default=None, help="seconds")
    sim.add_argument("--bad-ratio", type=float, default=0.01)
    sim.add_argument("--duplicate-ratio", type=float, default=0.02)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--cameras", type=int, default=0, help="simulated cameras publishing frames")
    sim.add_argument("--fps", type=float, default=2.0, help="frames per second per camera")
    sim.add_argument("--width", type=int, default=640)
    sim.add_argument("--height", type=int, default=480)
    sim.add_argument("--frames-only", action="store_true", help="cameras only, no other traffic")
    sim.set_defaults(func=_simulate)

    model = sub.add_parser("model", help="export a detection model")
    model_sub = model.add_subparsers(dest="action", required=True)
    export = model_sub.add_parser("export", help="export a .pt (or model YAML) to ONNX or TensorRT")
    export.add_argument("model", nargs="?", default="yolov8n.yaml")
    export.add_argument("--format", choices=["onnx", "engine"], default="onnx")
    export.add_argument("--imgsz", type=int, default=640)
    export.add_argument("--half", action="store_true", help="FP16 (GPU only)")
    export.add_argument("--device", default="cpu", help="cpu, or 0 for the first GPU (TensorRT)")
    export.add_argument("--out-dir", default=None, help="where a YAML model's .pt is saved first")
    model.set_defaults(func=_model)

    streams = sub.add_parser("streams", help="apply or show the JetStream streams")
    streams.add_argument("action", choices=["apply", "status"])
    streams.set_defaults(func=_streams)

    db = sub.add_parser("db", help="the event store's tables, functions and roles")
    db.add_argument(
        "action", choices=["migrate"], help="make or update them (as the database owner)"
    )
    db.set_defaults(func=_db)

    audit = sub.add_parser(
        "audit", help="the audit trail: keys, status, proofs, export, verify, witness"
    )
    audit_sub = audit.add_subparsers(dest="action", required=True)
    audit_sub.add_parser("keygen", help="make the HSM's Ed25519 key and the ML-DSA-65 key file")
    audit_status = audit_sub.add_parser("status", help="the log's size and latest checkpoint")
    audit_status.add_argument("--json", action="store_true")
    audit_prove = audit_sub.add_parser(
        "prove", help="an event's inclusion proof against the latest checkpoint (JSON)"
    )
    audit_prove.add_argument("event", help="event id or message id")
    audit_cons = audit_sub.add_parser(
        "consistency", help="the consistency proof between two tree sizes (JSON)"
    )
    audit_cons.add_argument("old_size", type=int)
    audit_cons.add_argument("new_size", type=int)
    audit_export = audit_sub.add_parser("export", help="events, log and checkpoints to a folder")
    audit_export.add_argument("directory", type=Path)
    audit_verify = audit_sub.add_parser(
        "verify", help="recompute the log from the events and check every signed checkpoint"
    )
    audit_verify.add_argument("--from", dest="source", type=Path, help="an export, offline")
    audit_verify.add_argument(
        "--url",
        default="",
        help="a remote log's tlog-tiles prefix (the API's URL + /audit): verify it from its "
        "checkpoint and tiles alone",
    )
    audit_verify.add_argument(
        "--state",
        type=Path,
        default=None,
        help="with --url: the last checkpoint verified, kept in this file; the new one must "
        "extend it",
    )
    audit_verify.add_argument(
        "--keys", default="", help="the log's public keys (default PIPELINE_AUDIT_KEYS_FILE)"
    )
    audit_verify.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        help="a checkpoint kept elsewhere (a witness's, the stream's); repeatable",
    )
    audit_verify.add_argument("--json", action="store_true")
    audit_wkeygen = audit_sub.add_parser(
        "witness-keygen", help="make a witness's Ed25519 key file (mode 0600); print its vkey"
    )
    audit_wkeygen.add_argument("file", type=Path, help="where to write the key (a new file)")
    audit_wkeygen.add_argument(
        "--name", required=True, help="the witness's name in notes, e.g. witness.example.com/w1"
    )
    audit_witness = audit_sub.add_parser(
        "witness", help="cosign the log's checkpoints that extend the last one cosigned"
    )
    audit_witness.add_argument(
        "--url", required=True, help="the log's tlog-tiles prefix (the API's URL + /audit)"
    )
    audit_witness.add_argument(
        "--key", type=Path, required=True, help="the witness's key file (witness-keygen)"
    )
    audit_witness.add_argument(
        "--log-keys", required=True, help="the log's public keys (the lines keygen printed)"
    )
    audit_witness.add_argument(
        "--state", type=Path, default=None, help="the last checkpoint cosigned (default KEY.state)"
    )
    audit_witness.add_argument(
        "--interval", type=float, default=60.0, help="seconds between rounds (default 60)"
    )
    audit_witness.add_argument(
        "--once",
        action="store_true",
        help="one round; exit non-zero if the checkpoint is refused or cannot be checked",
    )
    audit.set_defaults(func=_audit)

    dlq = sub.add_parser("dlq", help="list, show, requeue or purge dead letters")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_sub.add_parser("list", help="the first dead letters and how many there are")
    dlq_list.add_argument("--domain", choices=[d.value for d in Domain])
    dlq_shown = dlq_list.add_mutually_exclusive_group()
    dlq_shown.add_argument("--limit", type=int, default=100, help="show the first N (100)")
    dlq_shown.add_argument("--all", action="store_true", help="show every one")
    dlq_show = dlq_sub.add_parser("show")
    dlq_show.add_argument("seq", type=int)
    dlq_requeue = dlq_sub.add_parser("requeue", help="publish back to the original subject")
    dlq_requeue.add_argument("seq", type=int, nargs="+")
    dlq_purge = dlq_sub.add_parser("purge")
    dlq_purge.add_argument("--domain", choices=[d.value for d in Domain])
    dlq_purge.add_argument("--yes", action="store_true")
    dlq.set_defaults(func=_dlq)

    schemas = sub.add_parser("schemas", help="export JSON Schema and AsyncAPI documents")
    schemas.add_argument("action", choices=["export"])
    schemas.add_argument("directory")
    schemas.set_defaults(func=_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pipeline` console script."""
    import asyncio

    from ..logs import configure_logging

    args = _parser().parse_args(argv)
    try:
        # The demo makes its own settings: a stale file of an earlier one must not stop it.
        args.env_file = None if args.command == "demo" else chosen_env_file(args.demo, os.environ)
        try:
            log_format = _settings(args).log_format
        except ConfigError:  # the command that needs them says what is wrong
            log_format = "text"
        configure_logging(args.log_level, log_format)
        func: Callable[[argparse.Namespace], Coroutine[Any, Any, None]] = args.func
        asyncio.run(func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from .failures import explain

        failure = explain(exc, _settings_or_none(args))
        if failure is None:
            raise
        print(failure.message, file=sys.stderr)
        return failure.exit_code
    return 0


def _settings_or_none(args: argparse.Namespace) -> Settings | None:
    try:
        return _settings(args)
    except ConfigError:
        return None
