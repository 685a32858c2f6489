"""The Ray the detector actors run on: connected to (or started), versions compared, token
authentication kept on, and the Ultralytics settings the actors inherit."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = [
    "RayVersions",
    "check_versions",
    "connect_ray",
    "local_versions",
    "use_token_auth",
    "yolo_env",
]


@dataclass(frozen=True)
class RayVersions:
    """The Python and Ray of a Ray process (a client or a cluster)."""

    python: str
    ray: str

    def agrees_with(self, other: RayVersions) -> bool:
        """Whether a client of one may use a cluster of the other: the same Ray and the
        same Python minor (Ray's own rule for its clients)."""
        return self.ray == other.ray and _minor(self.python) == _minor(other.python)

    def __str__(self) -> str:
        return f"Python {self.python}, Ray {self.ray}"


def _minor(python: str) -> str:
    return ".".join(python.split(".")[:2])


def local_versions() -> RayVersions:
    """This process's Python and Ray."""
    import ray

    return RayVersions(".".join(map(str, sys.version_info[:3])), ray.__version__)


def check_versions(cluster: RayVersions, local: RayVersions, address: str) -> None:
    """Refuse a Ray cluster whose Python minor or Ray version differs from this process's."""
    if not cluster.agrees_with(local):
        raise ConfigError(
            "PIPELINE_RAY_ADDRESS",
            f"the Ray cluster at {address} runs {cluster}, this worker {local}: build the "
            "worker's and the Ray nodes' images with the same Python minor and Ray "
            "(deploy/Dockerfile, deploy/Dockerfile.gpu, ray.kuberay.rayVersion)",
        )


def use_token_auth(address: str, token: str, *, required: bool) -> None:
    """Ray's token authentication for this process and the Ray it starts.

    Ray reads its mode and token from the environment (`RAY_AUTH_MODE`,
    `RAY_AUTH_TOKEN`), here and in the processes it starts. A local Ray without a token
    gets a random one that only this process knows. `RAY_AUTH_MODE=disabled` is honoured
    only where it is not `required` (development) and no token is given.
    """
    disabled = os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"
    if disabled and not token:
        if required:
            raise ConfigError(
                "RAY_AUTH_MODE",
                "Ray's token authentication may not be disabled in production",
            )
        return
    if not token and not address:
        token = secrets.token_hex(32)
    if token:
        os.environ["RAY_AUTH_TOKEN"] = token
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray read its configuration and token when it was imported: read them again, as Ray's
    # own `_enable_token_auth` does (ray 2.60, ray/_private/authentication).
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect_ray(
    address: str = "",
    *,
    num_cpus: int | None = None,
    temp_dir: str = "",
    auth_token: str = "",
    require_auth: bool = False,
) -> bool:
    """Connect to the Ray cluster at `address` (or `RAY_ADDRESS`), else start a local one.

    Ray's token authentication stays on (`auth_token`: the cluster's token; see
    `use_token_auth`). A cluster of another Python minor or Ray version is refused with a
    `ConfigError` naming both. Returns True if this call started Ray (and so should shut
    it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    use_token_auth(address, auth_token, required=require_auth)
    if address:
        try:
            context = ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            # Ray's client gives up the same way on a port it cannot reach and on a cluster
            # that refuses its token.
            raise ConfigError(
                "PIPELINE_RAY_ADDRESS",
                f"no Ray cluster let this worker in at {address} ({exc}): check that it is "
                "reachable from here (for ray://, the head's client port) and that "
                "PIPELINE_RAY_AUTH_TOKEN is the cluster's token (\"Initialization failure "
                'from server": the head let it in but could not start its client server; '
                "see the head's ray_client_server logs)",
            ) from exc
        except RuntimeError as exc:
            if "Version mismatch" not in str(exc):
                raise
            # Ray's own check (its message names both sides' versions).
            raise ConfigError("PIPELINE_RAY_ADDRESS", f"{exc}".strip()) from exc
        try:
            check_versions(_cluster_versions(context), local_versions(), address)
        except ConfigError:
            ray.shutdown()
            raise
        return True
    extra: dict[str, Any] = {"_temp_dir": temp_dir} if temp_dir else {}
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        # Ray nices its workers to 15; the detector actors are the work this machine is
        # for, and a preempted inference thread stalls the model's other threads.
        _system_config={"worker_niceness": 0},
        **extra,
    )
    return True


def _cluster_versions(context: Any) -> RayVersions:
    """The cluster's Python and Ray, as `ray.init` reports them.

    A Ray client's context carries the cluster's (its server's) versions; a driver
    joining a cluster by its GCS address was checked by Ray itself, strictly, and its
    context carries its own.
    """
    return RayVersions(str(context.python_version), str(context.ray_version))


def yolo_env(*, offline: bool = False) -> dict[str, str]:
    """Ultralytics settings of this process, passed on to the actors (`offline`: nothing
    is downloaded, whatever this process's environment says)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("YOLO_")}
    env.setdefault("YOLO_AUTOINSTALL", "0")
    if offline:
        env.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0")
    return env
