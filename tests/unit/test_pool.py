"""The detector pool's Ray connection: versions compared, token authentication kept on."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pipeline.detection.raycluster import RayVersions, check_versions, use_token_auth
from pipeline.errors import ConfigError


@pytest.mark.parametrize(
    ("cluster", "agrees"),
    [
        (RayVersions("3.11.7", "2.60.0"), True),
        (RayVersions("3.11.12", "2.60.0"), True),  # Ray's clients allow another patch
        (RayVersions("3.12.3", "2.60.0"), False),
        (RayVersions("3.11.7", "2.59.1"), False),
    ],
)
def test_a_cluster_of_another_python_minor_or_ray_is_refused_naming_both(
    cluster: RayVersions, agrees: bool
) -> None:
    local = RayVersions("3.11.7", "2.60.0")
    if agrees:
        check_versions(cluster, local, "ray://head:10001")
        return
    with pytest.raises(ConfigError) as refused:
        check_versions(cluster, local, "ray://head:10001")
    assert refused.value.setting == "PIPELINE_RAY_ADDRESS"
    assert f"ray://head:10001 runs {cluster}, this worker {local}" in str(refused.value)
    assert str(cluster) in str(refused.value)


@pytest.fixture
def ray_env() -> Iterator[None]:
    """Ray's authentication variables, and Ray's reading of them, restored after the test
    (a later test in this process may start a local Ray)."""
    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    saved = {name: os.environ.pop(name, None) for name in names}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.mark.usefixtures("ray_env")
def test_token_authentication_stays_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cluster's token, from the settings.
    use_token_auth("ray://head:10001", "s3cret", required=True)
    assert (os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"]) == ("token", "s3cret")
    # A local Ray without one: a random token of its own.
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    use_token_auth("", "", required=True)
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    # Disabled in the environment: refused in production, left as it is elsewhere.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE: Ray's token authentication"):
        use_token_auth("", "", required=True)
    use_token_auth("", "", required=False)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    # A token given wins over the environment.
    use_token_auth("ray://head:10001", "s3cret", required=False)
    assert os.environ["RAY_AUTH_MODE"] == "token"
