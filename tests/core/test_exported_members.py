"""The public API is on purpose: every public module's __all__ names things that exist."""

from __future__ import annotations

import importlib

import pytest

import edgeserve

PUBLIC_MODULES = ["edgeserve", "edgeserve.errors", "edgeserve.manifest", "edgeserve.package",
                  "edgeserve.profiles", "edgeserve.signing", "edgeserve.contract",
                  "edgeserve.telemetry", "edgeserve.console", "edgeserve.testing",
                  "edgeserve.delta", "edgeserve.package_diff"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_names_exist(name: str) -> None:
    """Every name in __all__ exists, once (ruff's RUF022 keeps the order)."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    for member in exported:
        assert hasattr(module, member), f"{name}.{member} is exported but missing"


def test_top_level_is_curated() -> None:
    """The top level re-exports the main entry points and nothing private."""
    assert all(not n.startswith("_") or n == "__version__" for n in edgeserve.__all__)
    assert "open_package" in edgeserve.__all__ and "EdgeserveError" in edgeserve.__all__
