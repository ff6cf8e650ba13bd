"""The agent's settings: cache directory, hardware profile, trusted keys.

Resolution order for each (first wins): command-line option, environment variable
(``EDGESERVE_CACHE``, ``EDGESERVE_PROFILE``, ``EDGESERVE_TRUSTED_KEYS`` and
``EDGESERVE_FLEET_KEYS`` — paths separated by ``os.pathsep``), the cache's own
``agent.toml``, the default (the user data directory's ``edgeserve/cache``, profile
``generic-cpu``, no keys). ``agent.toml`` example::

    profile = "raspberry-pi-5"
    trusted_keys = ["/etc/edgeserve/release.pub.pem"]     # sign packages
    fleet_keys = ["/etc/edgeserve/factory.pub.pem"]       # sign desired state
    cache_bytes = 2_000_000_000
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgeserve.errors import ConfigError

from .agent import Agent

__all__ = ["EVENT_LOOPS", "AgentConfig", "default_cache_dir", "load_config", "open_agent"]

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
"""The servers' event loops (``--loop``): ``auto`` is uvloop when installed, else asyncio's."""


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
    fleet_keys: list[Path] = field(default_factory=list)
    """public keys of the fleet(s) whose signed desired state this device obeys"""


def _file_settings(cache_dir: Path) -> dict[str, object]:
    path = cache_dir / "agent.toml"
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read agent settings: {exc}") from None
    unknown = set(data) - {"profile", "trusted_keys", "cache_bytes", "fleet_keys"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {sorted(unknown)}; allowed: profile, "
                          "trusted_keys, fleet_keys, cache_bytes")
    return data


def _keys(given: list[Path] | tuple[Path, ...], env: str, settings: dict[str, object],
          key: str, where: Path) -> list[Path]:
    keys = list(given)
    keys += [Path(p) for p in os.environ.get(env, "").split(os.pathsep) if p]
    configured = settings.get(key, [])
    if not isinstance(configured, list):
        raise ConfigError(f"{where}: {key} must be a list of paths")
    return keys + [Path(str(p)) for p in configured]


def load_config(cache_dir: Path | None = None, profile: str | None = None,
                trusted_keys: list[Path] | tuple[Path, ...] = (),
                fleet_keys: list[Path] | tuple[Path, ...] = ()) -> AgentConfig:
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    settings = _file_settings(cache)
    where = cache / "agent.toml"
    keys = _keys(trusted_keys, "EDGESERVE_TRUSTED_KEYS", settings, "trusted_keys", where)
    fleet = _keys(fleet_keys, "EDGESERVE_FLEET_KEYS", settings, "fleet_keys", where)
    chosen = profile or os.environ.get("EDGESERVE_PROFILE") or \
        str(settings.get("profile", "generic-cpu"))
    budget = settings.get("cache_bytes")
    return AgentConfig(cache, chosen, keys, int(budget) if isinstance(budget, int) else None,
                       fleet)


def open_agent(config: AgentConfig, **kwargs: object) -> Agent:
    """An :class:`Agent` for ``config`` (extra keyword arguments go to ``Agent``)."""
    return Agent(config.cache_dir, config.profile, config.trusted_keys,
                 cache_bytes=config.cache_bytes, **kwargs)  # type: ignore[arg-type]
