"""The agent's settings: cache directory, hardware profile, trusted keys.

Resolution order for each (first wins): command-line option, environment variable
(``EDGESERVE_CACHE``, ``EDGESERVE_PROFILE``, ``EDGESERVE_TRUSTED_KEYS`` — paths separated by
``os.pathsep``), the cache's own ``agent.toml``, the default (the user data directory's
``edgeserve/cache``, profile ``generic-cpu``, no keys). ``agent.toml`` example::

    profile = "raspberry-pi-5"
    trusted_keys = ["/etc/edgeserve/release.pub.pem"]
    cache_bytes = 2_000_000_000
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgeserve.errors import ConfigError

from .agent import Agent

__all__ = ["AgentConfig", "default_cache_dir", "load_config", "open_agent"]


def default_cache_dir() -> Path:
    env = os.environ.get("EDGESERVE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir
    return Path(user_data_dir("edgeserve")) / "cache"


@dataclass(frozen=True)
class AgentConfig:
    """Where the cache lives, which profile the device has, which keys it trusts."""

    cache_dir: Path
    profile: str = "generic-cpu"
    trusted_keys: list[Path] = field(default_factory=list)
    cache_bytes: int | None = None


def _file_settings(cache_dir: Path) -> dict[str, object]:
    path = cache_dir / "agent.toml"
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read agent settings: {exc}") from None
    unknown = set(data) - {"profile", "trusted_keys", "cache_bytes"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {sorted(unknown)}; allowed: profile, "
                          "trusted_keys, cache_bytes")
    return data


def load_config(cache_dir: Path | None = None, profile: str | None = None,
                trusted_keys: list[Path] | tuple[Path, ...] = ()) -> AgentConfig:
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    settings = _file_settings(cache)
    keys = list(trusted_keys)
    env_keys = os.environ.get("EDGESERVE_TRUSTED_KEYS", "")
    keys += [Path(p) for p in env_keys.split(os.pathsep) if p]
    configured = settings.get("trusted_keys", [])
    if not isinstance(configured, list):
        raise ConfigError(f"{cache / 'agent.toml'}: trusted_keys must be a list of paths")
    keys += [Path(str(p)) for p in configured]
    chosen = profile or os.environ.get("EDGESERVE_PROFILE") or \
        str(settings.get("profile", "generic-cpu"))
    budget = settings.get("cache_bytes")
    return AgentConfig(cache, chosen, keys, int(budget) if isinstance(budget, int) else None)


def open_agent(config: AgentConfig, **kwargs: object) -> Agent:
    """An :class:`Agent` for ``config`` (extra keyword arguments go to ``Agent``)."""
    return Agent(config.cache_dir, config.profile, config.trusted_keys,
                 cache_bytes=config.cache_bytes, **kwargs)  # type: ignore[arg-type]
