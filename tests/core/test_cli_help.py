"""Every option and every argument of every command says what it is for in ``--help``."""

from __future__ import annotations

from collections.abc import Iterator

import click

from edgeserve.cli import cli


def _commands(command: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    """Every command under ``command``, the lazily imported groups (agent, fleet, convert,
    demo) loaded as ``--help`` would load them."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{path} {name} is listed but cannot be loaded"
            if not sub.hidden:
                yield from _commands(sub, f"{path} {name}")


def test_every_option_and_argument_has_help() -> None:
    """Walking the whole command tree finds no visible option or argument without help text,
    and reaches the commands of every part (so a group that failed to load cannot pass)."""
    missing = []
    paths = []
    for path, command in _commands(cli, "edgeserve"):
        paths.append(path)
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            if not (getattr(param, "help", None) or "").strip():
                name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
                missing.append(f"{path} {name}")
    for expected in ("edgeserve agent serve", "edgeserve fleet rollout create",
                     "edgeserve fleet device remove", "edgeserve convert", "edgeserve demo"):
        assert expected in paths, f"{expected} was not reached: a lazy group did not load"
    assert not missing, "options/arguments without help:\n  " + "\n  ".join(missing)
