"""``python -m edgeserve``: the same as the ``edgeserve`` command."""

from .cli import main

main()
