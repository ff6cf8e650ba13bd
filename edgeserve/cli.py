"""The ``edgeserve`` command line.

The core commands (``keys``, ``package``, ``profiles``) live here. The ``convert``, ``agent``,
``fleet`` and ``demo`` groups are imported only when used, so ``edgeserve agent …`` on a device
never imports the converter's torch/TensorFlow, and a missing extra gives an install hint instead
of an ImportError. :func:`main` maps :class:`~edgeserve.errors.EdgeserveError` to a one-line
message and an exit code; ``--debug`` (or ``EDGESERVE_DEBUG=1``) shows tracebacks.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from . import __version__
from .console import console, emit, err_console, escape, format_bytes, json_option, table
from .errors import ConfigError, EdgeserveError, PackageError, exit_code_for
from .manifest import manifest_json_schema
from .package import open_package, package_summary
from .profiles import HardwareProfile, list_profiles, load_profile
from .signing import TrustStore, write_keypair

__all__ = ["cli", "main"]

_LAZY_GROUPS = {
    "convert": ("edgeserve.converters.cli", "convert", "convert"),
    "agent": ("edgeserve.device_agent.cli", "agent", "agent"),
    "fleet": ("edgeserve.fleet.cli", "fleet", "fleet"),
    "demo": ("edgeserve.demo.app", "demo", "all"),
}
_HELP = {
    "convert": "Convert a trained model into a validated, signed package.",
    "agent": "Run models on this device: install, predict, serve.",
    "fleet": "Fleet service: devices, telemetry, rollouts, experiments.",
    "demo": "Run the end-to-end demo on embedded defaults.",
}


class EdgeserveGroup(click.Group):
    """A group that suggests close commands and imports heavy sub-groups lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_GROUPS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_GROUPS and cmd_name not in self.commands:
            return _lazy_command(cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = click.utils.make_str(args[0]) if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint} See '{ctx.command_path} --help'.")
        return super().resolve_command(ctx, args)


def subscribe_qos_option(f: Any) -> Any:
    """``--subscribe-qos 0|1`` for a device's MQTT link (``agent run``, ``fleet simulate``)."""
    return click.option(
        "--subscribe-qos", type=click.Choice(["0", "1"]), default="1", show_default=True,
        help="QoS of the device's subscriptions: 0 loses nothing of the contract (desired "
             "state is retained, acks and file chunks are asked for again) and on a NATS "
             "broker spares each subscription a JetStream consumer.")(f)


class SuggestingGroup(EdgeserveGroup):
    """Sub-groups get the same suggestions, without the lazy top-level entries."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return click.Group.list_commands(self, ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return click.Group.get_command(self, ctx, cmd_name)


def _lazy_command(name: str) -> click.Command:
    module_name, attr, extra = _LAZY_GROUPS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or str(exc)

        @click.command(name, help=_HELP[name], context_settings={"ignore_unknown_options": True},
                       add_help_option=False)
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def unavailable(args: tuple[str, ...]) -> None:
            raise ConfigError(
                f"'edgeserve {name}' needs the {extra!r} extra, which is not installed here "
                f"(missing module {missing!r}); install it with: pip install 'edgeserve[{extra}]'"
            )

        return unavailable
    command = getattr(module, attr)
    assert isinstance(command, click.Command)
    return command


@click.group(cls=EdgeserveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeserve")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgeserve: convert models for edge devices, serve them offline, roll them out over MQTT.

    \b
    Start with:  edgeserve demo             (the whole system on embedded defaults)
                 edgeserve profiles list    (the device classes it builds for)
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# -- keys ------------------------------------------------------------------------------------------

@cli.group(cls=SuggestingGroup)
def keys() -> None:
    """Signing keys (ed25519) for model packages."""


@keys.command("generate")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(),
              show_default=True, help="Where to write the key files.")
@click.option("--name", default="edgeserve", show_default=True,
              help="File name stem: NAME.key (private, PKCS#8) and NAME.pub.pem (public).")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@json_option
def keys_generate(out_dir: Path, name: str, force: bool, as_json: bool) -> None:
    """Generate an ed25519 key pair for signing packages."""
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub.pem"
    keyid = write_keypair(private, public, overwrite=force)
    data = {"private_key": str(private), "public_key": str(public), "key_id": keyid}
    emit(data, as_json, lambda d: console.print(
        f"private key: {d['private_key']} (keep it secret)\n"
        f"public key:  {d['public_key']} (pin it on devices and fleet)\n"
        f"key id:      {d['key_id']}"))


@keys.command("hash-password")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              envvar="EDGESERVE_PASSWORD",
              help="The password to hash [prompted, or env EDGESERVE_PASSWORD].")
def keys_hash_password(password: str) -> None:
    """Print a salted scrypt hash of a password, to store in '--auth basic:USER:HASH'."""
    from .auth import hash_password

    click.echo(hash_password(password))


# -- package ---------------------------------------------------------------------------------------

@cli.group(cls=SuggestingGroup)
def package() -> None:
    """Inspect and verify model packages (.edgepkg)."""


def _render_package(data: dict[str, Any]) -> None:
    state = (f"[green]signed by trusted key {data['signed_by'][:16]}[/]" if data["verified"]
             else "[yellow]signature not checked (use 'package verify')[/]")
    console.print(f"[bold]{data['name']}[/] {data['version']} (release {data['release']}, "
                  f"task {data['task']}) - {state}")
    console.print(table("inputs", ["name", "dtype", "shape", "layout"],
                        [(t["name"], t["dtype"], t["shape"], t.get("layout"))
                         for t in data["inputs"]]))
    console.print(table("outputs", ["name", "dtype", "shape"],
                        [(t["name"], t["dtype"], t["shape"]) for t in data["outputs"]]))
    console.print(table("artifacts", ["id", "format", "precision", "quantization", "size",
                                      "profiles", "validation"],
                        [(a["id"], a["format"], a["precision"], a["quantization"],
                          format_bytes(a["size_bytes"]), ", ".join(a["profiles"]), a["status"])
                         for a in data["artifacts"]]))


@package.command("inspect")
@click.argument("pkg", type=click.Path(dir_okay=False, path_type=Path),
                help="The .edgepkg to show.")
@json_option
def package_inspect(pkg: Path, as_json: bool) -> None:
    """Show a package's manifest: model signature, artifacts, sizes (signature not checked)."""
    with open_package(pkg) as opened:
        emit(package_summary(opened), as_json, _render_package)


@package.command("verify")
@click.argument("pkg", type=click.Path(dir_okay=False, path_type=Path),
                help="The .edgepkg to verify.")
@click.option("--trusted-key", "trusted_keys", multiple=True, required=True,
              type=click.Path(exists=True, path_type=Path),
              help="Public key PEM (or a directory of them) to trust; repeatable.")
@json_option
def package_verify(pkg: Path, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Verify the signature and every file's hash; exit non-zero on any problem."""
    trust = TrustStore.from_paths(trusted_keys)
    with open_package(pkg, trust=trust, verify_files=True) as opened:
        data = package_summary(opened)
    if not data["verified"]:  # pragma: no cover - open_package raises before this
        raise PackageError(f"{pkg}: not verified")
    emit(data, as_json, lambda d: console.print(
        f"[green]OK[/] {d['name']} {d['version']} (release {d['release']}): signature by "
        f"trusted key {d['signed_by'][:16]}, {d['files']} files match the manifest"))


def _render_diff(data: dict[str, Any]) -> None:
    console.print(f"[bold]{data['name']}[/] {data['from']} -> {data['to']}: "
                  f"{format_bytes(data['sent_bytes'])} to send instead of "
                  f"{format_bytes(data['full_bytes'])} (deltas up to {data['fraction']:g} of a "
                  "file)")
    console.print(table("artifacts", ["id", "format", "full", "delta", "ratio", "sent as",
                                      "tensors same / changed / new"],
                        [(a["id"], a["format"], format_bytes(a["full_bytes"]),
                          format_bytes(a["delta_bytes"]), f"{a['ratio']:.2%}", a["method"],
                          _tensor_counts(a)) for a in data["artifacts"]]))
    for artifact in data["artifacts"]:
        changed = [(f["path"], t["name"], t["status"], format_bytes(t["bytes"]))
                   for f in artifact["files"] for t in f["tensors"] if t["status"] != "same"]
        if changed:
            console.print(table(f"{artifact['id']}: tensors that differ",
                                ["file", "tensor", "status", "size"], changed))


def _tensor_counts(artifact: dict[str, Any]) -> str:
    tensors = [t for f in artifact["files"] for t in f["tensors"]]
    if not tensors:
        return "-"
    return " / ".join(str(sum(t["status"] == s for t in tensors))
                      for s in ("same", "changed", "new"))


@package.command("diff")
@click.argument("old", type=click.Path(dir_okay=False, path_type=Path),
                help="The package a device holds (.edgepkg).")
@click.argument("new", type=click.Path(dir_okay=False, path_type=Path),
                help="The package it would be updated to (.edgepkg).")
@click.option("--fraction", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Send a delta only when it is at most this fraction of the full file.")
@json_option
def package_diff(old: Path, new: Path, fraction: float, as_json: bool) -> None:
    """Show what changed per artifact and tensor, and the delta a device would be sent."""
    from .package_diff import diff_packages

    with open_package(old) as before, open_package(new) as after:
        if before.manifest.name != after.manifest.name:
            raise ConfigError(f"{old} holds model {before.manifest.name!r} and {new} model "
                              f"{after.manifest.name!r}; diff compares two versions of one model")
        diffs = diff_packages(before, after, fraction)
        data = {"name": after.manifest.name, "from": before.manifest.version,
                "to": after.manifest.version, "fraction": fraction,
                "full_bytes": sum(d.full_bytes for d in diffs),
                "sent_bytes": sum(d.sent_bytes for d in diffs),
                "artifacts": [d.to_dict() for d in diffs]}
    emit(data if not as_json else data["artifacts"], as_json, _render_diff)


@package.command("schema")
def package_schema() -> None:
    """Print the JSON Schema of the package manifest (docs/manifest.schema.json)."""
    emit(manifest_json_schema(), True)


# -- profiles --------------------------------------------------------------------------------------

@cli.group(cls=SuggestingGroup)
def profiles() -> None:
    """Hardware profiles: the device classes edgeserve builds and tunes for."""


def _profile_row(p: HardwareProfile) -> dict[str, Any]:
    return {
        "name": p.name, "title": p.title, "class": p.device_class, "arch": p.hardware.arch,
        "cores": p.hardware.cores, "memory_mb": p.hardware.memory_mb,
        "runtimes": p.runtimes.available(),
        "artifacts": [t.key for t in p.artifacts],
    }


@profiles.command("list")
@json_option
def profiles_list(as_json: bool) -> None:
    """List the hardware profiles available (shipped and on EDGESERVE_PROFILE_PATH)."""
    rows = [_profile_row(p) for p in list_profiles()]
    emit(rows, as_json, lambda rs: console.print(table(
        "hardware profiles", ["name", "device", "class", "arch", "cores", "memory", "artifacts"],
        [(r["name"], r["title"], r["class"], r["arch"], r["cores"],
          format_bytes(r["memory_mb"] * 2**20), ", ".join(r["artifacts"])) for r in rs])))


@profiles.command("show")
@click.argument("name", help="A profile name ('profiles list') or a profile TOML file.")
@json_option
def profiles_show(name: str, as_json: bool) -> None:
    """Show one profile (by name or TOML path) in full."""
    profile = load_profile(name)
    data = profile.model_dump(mode="json", by_alias=True)

    def render(d: dict[str, Any]) -> None:
        hw = d["hardware"]
        console.print(f"[bold]{d['name']}[/]: {d['title']} ({d['device_class']}, {d['vendor']})")
        console.print(f"  cpu: {hw['cpu']} - {hw['cores']} cores, {hw['arch']}")
        console.print(f"  memory {format_bytes(hw['memory_mb'] * 2**20)}, storage "
                      f"{format_bytes(hw['storage_mb'] * 2**20)}; model budget "
                      f"{format_bytes(d['budgets']['max_model_bytes'])}")
        for acc in hw["accelerators"]:
            console.print(f"  accelerator: {acc['name']} ({acc['kind']})")
        console.print(f"  runtimes: {', '.join(profile.runtimes.available())}")
        console.print(table("artifacts (in order of preference)",
                            ["format", "precision", "quantization", "required", "I/O"],
                            [(t["format"], t["precision"], t["quantization"], t["required"],
                              t["io_dtype"]) for t in d["artifacts"]]))

    emit(data, as_json, render)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into messages and exit codes."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("EDGESERVE_DEBUG") == "1"
    try:
        code = cli.main(args=args, prog_name="edgeserve", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgeserveError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exit_code_for(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        err_console.print(f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                          "run again with --debug for the traceback, and please report it")
        sys.exit(70)
    sys.exit(code if isinstance(code, int) else 0)
