"""Package discovery for the folder-to-namespace mapping (everything else is in pyproject.toml).

The parts live in top-level folders but install under ``edgeserve.*``. Listing every
subpackage by hand in pyproject.toml went stale whenever someone added one, so they are found here:
every folder with an ``__init__.py`` under a mapped root is a package.
"""

from pathlib import Path

from setuptools import setup

ROOTS = {
    "edgeserve": "edgeserve",
    "edgeserve.converters": "converters",
    "edgeserve.demo": "demo",
    "edgeserve.device_agent": "device_agent",
    "edgeserve.fleet": "fleet",
    "edgeserve.hw_profiles": "hw-profiles",
}


def _packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            parts = init.parent.relative_to(folder).parts
            found.append(".".join((name, *parts)))
    return sorted(set(found))


setup(packages=_packages(), package_dir=ROOTS)
