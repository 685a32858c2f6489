"""The one settings object, read from `PIPELINE_*` environment variables or a `.env` file."""

from __future__ import annotations

import json
import math
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from schemas import Domain

from .errors import ConfigError

__all__ = [
    "ALL_DOMAINS",
    "EVENT_DOMAINS",
    "JWT_ALGORITHMS",
    "ApiToken",
    "Scope",
    "Settings",
    "nats_server_urls",
]

_SECRETS = (
    "nats_password",
    "postgres_password",
    "postgres_writer_password",
    "postgres_projector_password",
    "postgres_api_password",
    "postgres_auditor_password",
    "redis_url",
    "ray_auth_token",
    "api_tokens",
    "api_session_key",
    "audit_hsm_pin",
)
"""Settings that may come from a file named by `PIPELINE_<NAME>_FILE`."""

EVENT_DOMAINS = (Domain.SECURITY, Domain.MONITORING, Domain.METRICS)
"""The domains of JSON messages; frames are the fourth."""
ALL_DOMAINS = (Domain.FRAMES, *EVENT_DOMAINS)

Scope = Literal["read", "operate"]
"""What an API caller may do: `read` queries, `operate` also changes what the pipeline does."""

JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Signature algorithms an access token may be allowed: public-key ones only (never
`none`, never HMAC, whose secret a JWKS of public keys would hand out)."""


_SCOPE_MAP: dict[str, tuple[Scope, ...]] = {
    "pipeline:read": ("read",),
    "pipeline:operate": ("read", "operate"),
}


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def nats_server_urls(value: str) -> list[str]:
    """The server URLs of a `PIPELINE_NATS_URL`: one URL, or a comma-separated list of a
    cluster's (`nats://a:4222,nats://b:4222`); `ValueError` naming a malformed entry.

    A list is all `tls://` or none (one TLS context serves every server) and does not mix
    websocket and plain URLs (the NATS client refuses to).
    """
    urls = [entry.strip() for entry in value.split(",")]
    for position, url in enumerate(urls, 1):
        problem = _nats_url_problem(url)
        if problem:
            raise ValueError(
                f"PIPELINE_NATS_URL: entry {position} ({url!r}) {problem}; expected "
                "scheme://host[:port] or a comma-separated list of them, such as "
                "nats://nats-1:4222,nats://nats-2:4222"
            )
    schemes = {urlsplit(url).scheme for url in urls}
    if schemes & {"ws", "wss"} and not schemes <= {"ws", "wss"}:
        raise ValueError(
            "PIPELINE_NATS_URL: websocket (ws://, wss://) and plain (nats://, tls://) "
            "servers in one list; use one kind"
        )
    if "tls" in schemes and schemes != {"tls"}:
        raise ValueError(
            "PIPELINE_NATS_URL: some servers are tls:// and some are not; "
            "use tls:// for all of them or for none"
        )
    return urls


def _nats_url_problem(url: str) -> str:
    """What is wrong with one NATS server URL; empty when nothing is."""
    if not url:
        return "is empty"
    parts = urlsplit(url)
    if parts.scheme not in _NATS_SCHEMES:
        return "does not start with nats://, tls://, ws:// or wss://"
    try:
        port = parts.port
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    if not parts.hostname:
        return "names no host"
    if port == 0:
        return "has port 0"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "has a path, query or fragment"
    return ""


class ApiToken(BaseModel):
    """A static API token with a name: who acknowledges an incident with it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    scopes: tuple[Scope, ...]


class Settings(BaseSettings):
    """Everything a worker, the CLI or the demo needs; built once at the entrypoint."""

    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_", env_file=".env", extra="forbid", frozen=True
    )

    # Where this runs: `production` refuses to start without authentication and passwords
    env: Literal["development", "production"] = "development"

    # NATS JetStream: one server's URL, or a cluster's as a comma-separated list
    nats_url: str = "nats://127.0.0.1:4222"
    # Authentication: user and password, a credentials (.creds) file, or an NKey seed file
    nats_user: str = ""
    nats_password: str = ""
    nats_creds_file: str = ""
    nats_nkey_seed_file: str = ""
    # TLS: the CA that signed the server's certificate; a client certificate if required
    nats_tls_ca_file: str = ""
    nats_tls_cert_file: str = ""
    nats_tls_key_file: str = ""
    # Replies to this client's requests (JetStream API calls, publish acks, pulled batches)
    # arrive under this prefix; the server lets each user read only its own
    nats_inbox_prefix: Annotated[str, Field(pattern=r"^([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)?$")] = (
        Field("", description="empty: _INBOX_<PIPELINE_NATS_USER>, or _INBOX without a user")
    )
    namespace: str = Field("", description="prefix of every subject and stream; empty for none")
    stream_replicas: Annotated[int, Field(ge=1, le=5)] = 1
    frames_max_bytes: Annotated[int, Field(ge=1024**2)] = 2 * 1024**3
    dead_letters_max_bytes: Annotated[int, Field(ge=1024**2)] = 1024**3
    dead_letter_max_body_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    domains: tuple[Domain, ...] = ALL_DOMAINS

    # Consuming
    processes: Annotated[int, Field(ge=1, le=64)] = 1
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 256
    batch_timeout_s: Annotated[float, Field(ge=0.002, le=30)] = 0.01
    """How long a pulled batch gathers. At least 2 ms: FastStream fetches with what is left
    of it, and a fetch under 1 ms asks the server for nothing (`pull.fetch`)."""
    ack_wait_s: Annotated[float, Field(gt=0)] = 30.0
    max_ack_pending: Annotated[int, Field(ge=1)] = 4096
    max_deliver: Annotated[int, Field(ge=1)] = 5
    retry_backoff_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0)
    max_message_bytes: Annotated[int, Field(ge=256)] = 256 * 1024
    pause_probe_max_s: Annotated[float, Field(gt=0)] = 10.0

    # Camera frames
    frames_batch_size: Annotated[int, Field(ge=1, le=1000)] = 16
    frames_max_ack_pending: Annotated[int, Field(ge=1)] = 256
    frames_max_age_s: Annotated[float, Field(ge=0)] = 0.0
    max_frame_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024**2
    frames_max_pixels: Annotated[int, Field(ge=1)] = 7680 * 4320

    # Detector (Ultralytics YOLO) and its Ray actor pool
    detector_model: str = "yolov8n.yaml"
    detector_model_sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = Field(
        "", description="SHA-256 of the model file (hex), checked before the file is loaded"
    )
    detector_device: str = ""
    detector_imgsz: Annotated[int, Field(ge=32, le=4096)] = 640
    detector_conf: Annotated[float, Field(ge=0, le=1)] = 0.25
    detector_iou: Annotated[float, Field(gt=0, le=1)] = 0.45
    detector_classes: tuple[int, ...] | None = None
    detector_half: bool = False
    detector_threads: Annotated[int, Field(ge=0)] = 0
    detector_actors: Annotated[int, Field(ge=1, le=1024)] = 1
    detector_num_cpus: Annotated[float, Field(ge=0)] = 1.0
    detector_num_gpus: Annotated[float, Field(ge=0)] = 0.0
    detector_max_batch: Annotated[int, Field(ge=1, le=1024)] = 8
    detector_max_wait_ms: Annotated[float, Field(ge=0)] = 50.0
    detector_max_inflight: Annotated[int, Field(ge=1, le=64)] = 1
    detector_max_restarts: Annotated[int, Field(ge=-1)] = 3
    detector_scheduling: Literal["SPREAD", "DEFAULT"] = Field(
        "SPREAD", description="Ray's placement of the actors: over the nodes, or packed"
    )
    detector_batch_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    ray_address: str = Field(
        "", description="ray://host:10001 or host:6379; empty: RAY_ADDRESS or a local Ray"
    )
    ray_num_cpus: Annotated[int, Field(ge=1)] | None = None
    # Ray's token authentication: the cluster's token (a Kubernetes/compose secret); a
    # local Ray without one gets a random token of its own
    ray_auth_token: str = ""

    # PostgreSQL event store: one server, or a primary and its standbys (hosts separated
    # by commas, with one port for all or one per host). libpq tries them in turn and keeps
    # the first whose session is what `postgres_target_session_attrs` asks for: with
    # read-write, the primary, wherever a fail-over has put it.
    postgres_host: str = Field(
        "127.0.0.1", description="a host or socket folder, or several separated by commas"
    )
    postgres_port: str = Field(
        "5432", description="one port for every host, or one per host separated by commas"
    )
    postgres_target_session_attrs: Literal[
        "read-write", "primary", "any", "read-only", "standby", "prefer-standby"
    ] = "read-write"
    postgres_dbname: str = "postgres"
    postgres_user: str = "postgres"
    postgres_password: str = ""
    postgres_schema: str = "public"
    postgres_pool_size: Annotated[int, Field(ge=1)] = 4
    postgres_connect_timeout_s: float = Field(
        5.0,
        gt=0,
        description="seconds to connect; libpq counts whole seconds, at least 2, so a "
        "fraction is rounded up (0.5 connects within 2 s, never without a limit)",
    )
    postgres_lock_timeout_s: Annotated[int, Field(ge=1)] = 5
    # The store's roles (`pipeline db migrate` makes them): <prefix>_writer (workers),
    # <prefix>_projector (projections), <prefix>_api (the query API), <prefix>_auditor.
    # Their passwords are read by `pipeline db migrate` only; each process connects with
    # its own PIPELINE_POSTGRES_USER and PIPELINE_POSTGRES_PASSWORD(_FILE).
    postgres_roles_prefix: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,40}$")] = "pipeline"
    postgres_writer_password: str = ""
    postgres_projector_password: str = ""
    postgres_api_password: str = ""
    postgres_auditor_password: str = ""

    # Projections (read models) and the query API
    projections_batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5000
    projections_poll_s: Annotated[float, Field(gt=0)] = 1.0
    projections_standby_s: Annotated[float, Field(gt=0)] = 5.0
    projections_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9200
    # Sites, zones and correlation rules of the incidents (YAML); empty: no incidents
    sites_file: str = ""
    # `pipeline run incidents`: its /metrics, /healthz and /readyz (0: none)
    incidents_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9400
    # Frames that are evidence of an incident, copied out of the FRAMES stream into the
    # EVIDENCE object store bucket by the incident process and served by the API
    evidence_frames: bool = True
    evidence_max_bytes: Annotated[int, Field(ge=1024**2)] = 10 * 1024**3
    evidence_max_age_s: float = Field(
        0.0, ge=0, description="how long the bucket keeps a frame; 0: as long as incidents"
    )
    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    api_tokens: dict[str, tuple[Scope, ...] | ApiToken] = Field(
        default_factory=dict,
        description='bearer token -> scopes, as JSON: {"<token>": ["read", "operate"]}, or '
        'with a name: {"<token>": {"name": "ops-bot", "scopes": ["read"]}}',
    )
    # OAuth 2 / OpenID Connect access tokens (JWTs) from an identity provider; an empty
    # issuer turns them off. The JWKS comes from a URL (cached) or a file.
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_jwks_url: str = ""
    oidc_jwks_file: str = ""
    oidc_algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    # The claim scopes come from (a dotted path: realm_access.roles), a space-separated
    # string or a list, and what each value grants
    oidc_scopes_claim: Annotated[str, Field(min_length=1)] = "scope"
    oidc_scope_map: dict[str, tuple[Scope, ...]] = Field(
        default_factory=lambda: dict(_SCOPE_MAP),
        description='claim value -> scopes, as JSON: {"pipeline:read": ["read"]}',
    )
    # The claim naming the operator (recorded with an acknowledgement)
    oidc_subject_claim: Annotated[str, Field(min_length=1)] = "sub"
    oidc_leeway_s: Annotated[float, Field(ge=0, le=300)] = 30.0
    oidc_jwks_timeout_s: Annotated[float, Field(gt=0, le=30)] = 3.0
    oidc_jwks_cache_s: Annotated[float, Field(gt=0)] = 300.0
    oidc_jwks_min_refresh_s: Annotated[float, Field(ge=0)] = 10.0
    # The dashboard's browser sessions (POST /v1/session): the key their cookies are
    # signed with (empty: a random key per process, so sessions end when the API restarts;
    # several replicas must share one), how long one lasts at most (an access token's
    # session ends with the token), and origins besides the API's own that the page may
    # be served from as the browser sees it (behind a proxy that rewrites the Host)
    api_session_key: str = ""
    api_session_max_age_s: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = 8 * 3600
    api_session_origins: tuple[str, ...] = ()

    # The audit trail (`pipeline run audit`): a Merkle log over every stored event and
    # checkpoints signed by an Ed25519 key in an HSM (PKCS#11) and an ML-DSA-65 key file
    audit_origin: Annotated[str, Field(pattern=r"^([^\s+]{1,200})?$")] = Field(
        "", description="the log's name in its checkpoints; empty: event-pipeline/<dbname>/<schema>"
    )
    audit_checkpoint_every: Annotated[int, Field(ge=1)] = 10_000
    audit_checkpoint_interval_s: Annotated[float, Field(gt=0)] = 10.0
    audit_batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5000
    audit_hsm_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    audit_hsm_token: str = "pipeline-audit"
    audit_hsm_key_label: str = "pipeline-audit-ed25519"
    # The HSM user's PIN: from the environment or a file, never a settings file
    audit_hsm_pin: str = ""
    audit_mldsa_key_file: str = ""
    # The public keys (vkey lines) checkpoints are verified with
    audit_keys_file: str = ""
    # Witnesses whose cosignatures the API accepts and serves (their vkey lines)
    audit_witness_keys_file: str = ""
    audit_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9300

    # Redis cache of committed ids (optional)
    redis_url: str | None = None
    # The CA that signed the Redis server's certificate (rediss:// URLs); empty: the system's
    redis_tls_ca_file: str = ""
    dedup_ttl_s: Annotated[int, Field(ge=1)] = 24 * 3600

    # Metrics endpoint
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    consumer_lag_interval_s: Annotated[float, Field(gt=0)] = 5.0

    # Logging
    log_format: Literal["text", "json"] = "text"

    # Tracing (OpenTelemetry): spans exported over OTLP/HTTP when an endpoint is set
    otel_exporter_otlp_endpoint: str = ""
    otel_service_name: str = "event-pipeline"

    # Secrets read from files (a mounted secret) instead of the variables above
    nats_password_file: str = ""
    postgres_password_file: str = ""
    postgres_writer_password_file: str = ""
    postgres_projector_password_file: str = ""
    postgres_api_password_file: str = ""
    postgres_auditor_password_file: str = ""
    redis_url_file: str = ""
    ray_auth_token_file: str = ""
    api_tokens_file: str = ""
    api_session_key_file: str = ""
    audit_hsm_pin_file: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _NoPinInFiles(dotenv_settings), file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in _SECRETS:
            path = data.get(f"{name}_file")
            if not path:
                continue
            if data.get(name):
                raise ValueError(
                    f"PIPELINE_{name.upper()} and PIPELINE_{name.upper()}_FILE are both set; "
                    "set one of them"
                )
            try:
                content = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(
                    f"PIPELINE_{name.upper()}_FILE: cannot read {path}: {exc.strerror}"
                ) from None
            data = {**data, name: json.loads(content) if name == "api_tokens" else content}
        return data

    @field_validator("api_session_key")
    @classmethod
    def _session_key_long_enough(cls, value: str) -> str:
        if value and len(value) < 32:
            raise ValueError(
                "PIPELINE_API_SESSION_KEY: at least 32 characters (openssl rand -hex 32)"
            )
        return value

    @field_validator("api_session_origins")
    @classmethod
    def _origins_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                raise ValueError(
                    f"PIPELINE_API_SESSION_ORIGINS: {origin!r} is not an origin "
                    "(scheme://host[:port], no path)"
                )
        return value

    @field_validator("nats_url")
    @classmethod
    def _nats_urls_well_formed(cls, value: str) -> str:
        nats_server_urls(value)
        return value

    @field_validator("postgres_port", mode="before")
    @classmethod
    def _port_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _postgres_servers_well_formed(self) -> Settings:
        self.postgres_servers()
        return self

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("ray_num_cpus", "detector_classes", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _one_nats_authentication(self) -> Settings:
        given = [
            name
            for name, value in (
                ("PIPELINE_NATS_USER", self.nats_user),
                ("PIPELINE_NATS_CREDS_FILE", self.nats_creds_file),
                ("PIPELINE_NATS_NKEY_SEED_FILE", self.nats_nkey_seed_file),
            )
            if value
        ]
        if len(given) > 1:
            raise ValueError(f"set one way to authenticate to NATS, not {' and '.join(given)}")
        return self

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        if not self.oidc_issuer:
            return self
        if not self.oidc_audience:
            raise ValueError("PIPELINE_OIDC_AUDIENCE: set the audience access tokens name")
        if bool(self.oidc_jwks_url) == bool(self.oidc_jwks_file):
            raise ValueError(
                "PIPELINE_OIDC_JWKS_URL or PIPELINE_OIDC_JWKS_FILE: set one of them "
                "(where the identity provider's signing keys are)"
            )
        refused = sorted(set(self.oidc_algorithms) - JWT_ALGORITHMS)
        if refused or not self.oidc_algorithms:
            raise ValueError(
                f"PIPELINE_OIDC_ALGORITHMS: {', '.join(refused) or 'empty'} not allowed "
                f"(choose from {', '.join(sorted(JWT_ALGORITHMS))})"
            )
        return self

    @model_validator(mode="after")
    def _cache_outlives_redelivery(self) -> Settings:
        redelivery = self.ack_wait_s * self.max_deliver + sum(self.retry_backoff_s)
        if self.dedup_ttl_s <= redelivery:
            raise ValueError(
                f"dedup_ttl_s ({self.dedup_ttl_s}) must exceed ack_wait_s x max_deliver plus "
                f"the retry backoff ({redelivery:.0f} s)"
            )
        return self

    def refuse_unsafe(self, *, nats: bool = False, api: bool = False) -> None:
        """Raise `ConfigError` naming each secret a production process lacks (see below)."""
        missing = self.unsafe_for_production(nats=nats, api=api)
        if missing:
            raise ConfigError(
                "PIPELINE_ENV=production", "refusing to start without " + "; ".join(missing)
            )

    def unsafe_for_production(self, *, nats: bool = False, api: bool = False) -> list[str]:
        """What a production process using NATS (`nats`) or serving the API (`api`) lacks.

        Empty outside production. Each entry names the setting to set.
        """
        if self.env != "production":
            return []
        missing = []
        if nats and not (
            (self.nats_user and self.nats_password)
            or self.nats_creds_file
            or self.nats_nkey_seed_file
        ):
            missing.append(
                "NATS authentication: PIPELINE_NATS_USER and PIPELINE_NATS_PASSWORD(_FILE), "
                "PIPELINE_NATS_CREDS_FILE or PIPELINE_NATS_NKEY_SEED_FILE"
            )
        if not self.postgres_password:
            missing.append("a database password: PIPELINE_POSTGRES_PASSWORD(_FILE)")
        if nats and self.redis_url:
            redis = urlsplit(self.redis_url)
            if not redis.password or redis.username in (None, "", "default"):
                # The default user may do anything; the pipeline's own ACL user only
                # what the id cache needs (see pipeline/ingest/dedup.py).
                missing.append(
                    "a Redis ACL user and password in PIPELINE_REDIS_URL(_FILE): "
                    "redis://pipeline:PASSWORD@host (or rediss://)"
                )
        if nats and Domain.FRAMES in self.domains:
            missing.extend(self._unsafe_detector())
        if api and not self.api_tokens and not self.oidc_issuer:
            missing.append("API tokens: PIPELINE_API_TOKENS(_FILE) or PIPELINE_OIDC_ISSUER")
        return missing

    def _unsafe_detector(self) -> list[str]:
        """What the frames' detector lacks in production: real weights whose hash is
        pinned, and the Ray cluster's token."""
        missing = []
        if Path(self.detector_model).suffix.lower() in (".yaml", ".yml"):
            missing.append(
                f"trained weights: PIPELINE_DETECTOR_MODEL is {self.detector_model!r}, a model "
                "YAML with random weights (name a .pt, .onnx or .engine file)"
            )
        elif not self.detector_model_sha256:
            missing.append(
                "the model file's hash: PIPELINE_DETECTOR_MODEL_SHA256 (sha256sum of "
                f"{self.detector_model})"
            )
        if self.ray_address and not self.ray_auth_token:
            missing.append("the Ray cluster's token: PIPELINE_RAY_AUTH_TOKEN(_FILE)")
        return missing

    def nats_servers(self) -> list[str]:
        """The NATS servers to connect to: each URL of `PIPELINE_NATS_URL`, in its order."""
        return nats_server_urls(self.nats_url)

    def nats_options(self) -> dict[str, Any]:
        """Authentication and TLS keyword arguments of `nats.connect`."""
        options: dict[str, Any] = {"inbox_prefix": self.inbox_prefix()}
        if self.nats_user:
            options.update(user=self.nats_user, password=self.nats_password)
        if self.nats_creds_file:
            options["user_credentials"] = self.nats_creds_file
        if self.nats_nkey_seed_file:
            options["nkeys_seed"] = self.nats_nkey_seed_file
        tls = self.nats_tls()
        if tls is not None:
            options["tls"] = tls
        return options

    def inbox_prefix(self) -> str:
        """This client's inbox prefix: `_INBOX_<user>` (deploy/nats/accounts.conf lets each
        user subscribe to its own only), or `_INBOX`, nats-py's default, without a user."""
        if self.nats_inbox_prefix:
            return self.nats_inbox_prefix
        return f"_INBOX_{self.nats_user}" if self.nats_user else "_INBOX"

    def nats_tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS: when a CA or client certificate is set, or the URLs
        say `tls://` (all of them or none, as checked); None for a plain connection."""
        wanted = self.nats_tls_ca_file or self.nats_tls_cert_file
        if not wanted and not self.nats_servers()[0].startswith("tls://"):
            return None
        context = ssl.create_default_context(cafile=self.nats_tls_ca_file or None)
        if self.nats_tls_cert_file:
            context.load_cert_chain(self.nats_tls_cert_file, self.nats_tls_key_file or None)
        return context

    def retry_delay(self, delivered: int) -> float:
        """Seconds to wait before redelivery after the `delivered`-th failed attempt."""
        if not self.retry_backoff_s:
            return 0.0
        return self.retry_backoff_s[min(delivered, len(self.retry_backoff_s)) - 1]

    def postgres_servers(self) -> list[tuple[str, int]]:
        """(host, port) of each PostgreSQL server, in the order libpq tries them.

        Raises `ConfigError` naming the setting when a host or port is empty or not a
        port number, or when there are neither one port nor one per host.
        """
        hosts = [h.strip() for h in self.postgres_host.split(",")]
        texts = [p.strip() for p in self.postgres_port.split(",")]
        if len(hosts) > 1 and not all(hosts):
            raise ConfigError(
                "PIPELINE_POSTGRES_HOST",
                f"an empty host in {self.postgres_host!r}; name every server of the list",
            )
        ports = []
        for text in texts:
            if not text.isdigit() or not 1 <= int(text) <= 65535:
                raise ConfigError(
                    "PIPELINE_POSTGRES_PORT",
                    f"{text!r} in {self.postgres_port!r} is not a port (1 to 65535)",
                )
            ports.append(int(text))
        if len(ports) == 1:
            ports *= len(hosts)
        elif len(ports) != len(hosts):
            raise ConfigError(
                "PIPELINE_POSTGRES_PORT",
                f"{len(ports)} ports for the {len(hosts)} hosts of PIPELINE_POSTGRES_HOST; "
                "give one port for all of them or one per host, in the same order",
            )
        return list(zip(hosts, ports, strict=True))

    def postgres_address(self) -> str:
        """The servers for messages: `host:port`, several separated by commas."""
        return ", ".join(f"{host}:{port}" for host, port in self.postgres_servers())

    def postgres_connection(self) -> dict[str, Any]:
        """Keyword arguments of `psycopg.connect` for the event store's database."""
        return {
            "host": self.postgres_host,
            "port": self.postgres_port,
            "dbname": self.postgres_dbname,
            "user": self.postgres_user,
            "password": self.postgres_password,
            "connect_timeout": self.postgres_connect_timeout(),
            "target_session_attrs": self.postgres_target_session_attrs,
        }

    def postgres_connect_timeout(self) -> int:
        """`PIPELINE_POSTGRES_CONNECT_TIMEOUT_S` as libpq takes it: whole seconds, rounded up
        to at least its minimum of 2 (libpq reads 0 as no limit at all)."""
        return max(2, math.ceil(self.postgres_connect_timeout_s))

    def postgres_role(self, kind: Literal["writer", "projector", "api", "auditor"]) -> str:
        """The name of one of the store's roles (see `pipeline db migrate`)."""
        return f"{self.postgres_roles_prefix}_{kind}"

    def audit_log_origin(self) -> str:
        """The audit log's origin line: `PIPELINE_AUDIT_ORIGIN`, or one made from the store's
        database and schema."""
        return self.audit_origin or f"event-pipeline/{self.postgres_dbname}/{self.postgres_schema}"

    def eventsourcing_env(self, *, create_table: bool = False) -> dict[str, str]:
        """The environment the `eventsourcing` library reads its Postgres settings from.

        Tables are made by `pipeline db migrate` (`create_table=True`), never by a worker.
        The store's factory (eventsourcing's, plus the session attributes and a connect
        timeout for each host) is named by its topic: settings import no store code.
        """
        return {
            "PERSISTENCE_MODULE": "pipeline.store.factory:PostgresFactory",
            "POSTGRES_HOST": self.postgres_host,
            "POSTGRES_PORT": self.postgres_port,
            "POSTGRES_TARGET_SESSION_ATTRS": self.postgres_target_session_attrs,
            "POSTGRES_DBNAME": self.postgres_dbname,
            "POSTGRES_USER": self.postgres_user,
            "POSTGRES_PASSWORD": self.postgres_password,
            "POSTGRES_SCHEMA": self.postgres_schema,
            "POSTGRES_POOL_SIZE": str(self.postgres_pool_size),
            "POSTGRES_MAX_OVERFLOW": "0",
            "POSTGRES_CONNECT_TIMEOUT": str(self.postgres_connect_timeout()),
            "POSTGRES_LOCK_TIMEOUT": str(self.postgres_lock_timeout_s),
            "CREATE_TABLE": "y" if create_table else "n",
        }


class _NoPinInFiles(PydanticBaseSettingsSource):
    """The `.env` file's settings, refusing the HSM's PIN: it belongs in the environment
    or in a file of its own (`PIPELINE_AUDIT_HSM_PIN_FILE`), not beside other settings."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self._source = source

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = self._source()
        if values.get("audit_hsm_pin"):
            raise ConfigError(
                "PIPELINE_AUDIT_HSM_PIN",
                "is set in a settings file; set it in the environment or put the PIN in a file "
                "of its own named by PIPELINE_AUDIT_HSM_PIN_FILE",
            )
        return values
