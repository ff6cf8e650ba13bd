"""Generate the CLI reference (``docs/cli.md``) from the click commands themselves.

``python -m edgeserve.clidoc > docs/cli.md``; a test fails when the file is out of date, so the
reference always matches what ``--help`` says.
"""

from __future__ import annotations

import inspect
import sys

import click

from .cli import cli

__all__ = ["render"]


def _usage(command: click.Command, path: str) -> str:
    ctx = click.Context(command, info_name=path)
    pieces = command.collect_usage_pieces(ctx)
    return f"{path} {' '.join(pieces)}".strip()


def _options(command: click.Command) -> list[str]:
    lines = []
    for param in command.params:
        if isinstance(param, click.Argument):
            metavar = param.make_metavar(click.Context(command))
            lines.append(f"| `{metavar}` | {(param.help or '').replace(chr(10), ' ')} |")
            continue
        if not isinstance(param, click.Option) or param.hidden:
            continue
        names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        help_text = (param.help or "").replace("\n", " ")
        if param.show_default and param.default not in (None, False, ()):
            help_text += f" [default: {param.default}]"
        lines.append(f"| {names} | {help_text} |")
    return lines


def _walk(command: click.Command, path: str, out: list[str], depth: int) -> None:
    ctx = click.Context(command, info_name=path)
    heading = "#" * min(depth + 2, 6)
    out.append(f"{heading} `{path}`\n")
    help_text = inspect.cleandoc(command.help or "").replace("\b\n", "")
    if help_text:
        out.append(help_text + "\n")
    if not isinstance(command, click.Group):
        out.append(f"```\n{_usage(command, path)}\n```\n")
        options = _options(command)
        if options:
            out.extend(["| argument / option | meaning |", "|---|---|", *options, ""])
        return
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is not None and not sub.hidden:
            _walk(sub, f"{path} {name}", out, depth + 1)


def render() -> str:
    out = ["# CLI reference\n",
           "Generated from the commands by `python -m edgeserve.clidoc`; every command also "
           "answers `--help`. Commands that list or report take `--json`.\n"]
    _walk(cli, "edgeserve", out, 0)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
