"""``edgeserve agent``: install, list, predict, batch, activate, rollback, remove, check, events,
serve, feedback.

Every command takes ``--cache DIR`` (default: see :mod:`.config`) and ``--json``. The telemetry
part adds ``agent run`` (serving + MQTT link) in ``run.py`` with the same options.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import click
import numpy as np

from edgeserve.cli import SuggestingGroup
from edgeserve.console import (
    console,
    emit,
    err_console,
    format_bytes,
    json_option,
    plain,
    table,
)
from edgeserve.errors import (
    AuthError,
    ConfigError,
    EdgeserveError,
    InvalidInputError,
    ModelNotFoundError,
)
from edgeserve.manifest import Manifest

from .agent import Agent
from .config import EVENT_LOOPS, load_config, open_agent
from .inputs import INPUT_SUFFIXES, read_inputs

__all__ = ["agent", "agent_from_options", "agent_options"]


def agent_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--cache``, ``--profile`` and ``--trusted-key`` (shared with ``agent run``)."""
    f = click.option("--trusted-key", "trusted_keys", multiple=True,
                     type=click.Path(exists=True, path_type=Path),
                     help="Public key PEM (or directory of them) packages must be signed "
                          "with; repeatable. Adds to EDGESERVE_TRUSTED_KEYS and agent.toml.")(f)
    f = click.option("--profile", default=None,
                     help="Hardware profile name or TOML path (default: agent.toml, "
                          "EDGESERVE_PROFILE or generic-cpu).")(f)
    return click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, help="Model cache directory (default: EDGESERVE_CACHE or "
                                           "the user data directory).")(f)


def agent_from_options(cache_dir: Path | None, profile: str | None,
                       trusted_keys: tuple[Path, ...], **kwargs: Any) -> Agent:
    return open_agent(load_config(cache_dir, profile, trusted_keys), **kwargs)


@contextlib.contextmanager
def _agent(cache_dir: Path | None, profile: str | None, trusted_keys: tuple[Path, ...],
           **kwargs: Any) -> Iterator[Agent]:
    made = agent_from_options(cache_dir, profile, trusted_keys, **kwargs)
    try:
        yield made
    finally:
        made.close()


def quiet_third_party_warnings() -> None:
    """Drop the deprecation walls some runtimes' dependencies print on import (setuptools'
    ``pkg_resources`` and ``distutils`` notices): nothing an agent's user can act on."""
    warnings.filterwarnings("ignore", module=r"(setuptools|pkg_resources|_distutils_hack)(\..*)?")
    warnings.filterwarnings("ignore", message=r".*pkg_resources.*")
    warnings.filterwarnings("ignore", message=r".*(declare_namespace|Setuptools is replacing).*")


class _AgentGroup(SuggestingGroup):
    """``agent run`` (serving + the MQTT link) is imported only when asked for: the MQTT client
    and the telemetry stack stay out of ``agent serve``'s memory."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "run"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "run" and "run" not in self.commands:
            command = getattr(importlib.import_module(f"{__package__}.run"), "run", None)
            if isinstance(command, click.Command):
                self.add_command(command)
        return super().get_command(ctx, cmd_name)


@click.group("agent", cls=_AgentGroup)
def agent() -> None:
    """Run models on this device: install, predict, serve."""
    quiet_third_party_warnings()


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@agent.command("install")
@click.argument("pkg", type=click.Path(dir_okay=False, path_type=Path),
                help="The signed .edgepkg to install.")
@click.option("--no-activate", is_flag=True, help="Stage the version without activating it.")
@click.option("--artifact", "artifact_id", default=None,
              help="Keep this artifact id instead of the profile's choice.")
@agent_options
@json_option
def install(pkg: Path, no_activate: bool, artifact_id: str | None, cache_dir: Path | None,
            profile: str | None, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Verify a package (signature, hashes, release) and install what this device needs."""
    with _agent(cache_dir, profile, trusted_keys, warmup=False) as a:
        info = a.install(pkg, activate=not no_activate, artifact_id=artifact_id)
    emit(info.to_dict(), as_json, lambda d: console.print(
        f"[green]installed[/] {d['name']} {d['version']} (release {d['release']}, artifact "
        f"{d['artifact_id']}, {format_bytes(d['size_bytes'])})"
        + (" - [bold]active[/]" if d["active"] else " - staged")))


@agent.command("list")
@agent_options
@json_option
def list_models(cache_dir: Path | None, profile: str | None, trusted_keys: tuple[Path, ...],
                as_json: bool) -> None:
    """List installed models and versions (active and previous marked)."""
    with _agent(cache_dir, profile, trusted_keys, warmup=False) as a:
        rows = [v.to_dict() for v in a.list_models()]
    emit(rows, as_json, lambda rs: console.print(table(
        "installed models", ["model", "version", "release", "state", "artifact", "size",
                             "installed"],
        [(r["name"], r["version"], r["release"],
          "active" if r["active"] else "previous" if r["previous"] else "",
          r["artifact_id"], format_bytes(r["size_bytes"]), _when(r["installed_at"]))
         for r in rs])))


def _summary(outputs: dict[str, np.ndarray], labels: list[str] | None) -> dict[str, Any]:
    data: dict[str, Any] = {name: value.tolist() for name, value in outputs.items()}
    if labels and len(outputs) == 1:
        scores = next(iter(outputs.values()))
        if scores.ndim == 2 and scores.shape[1] == len(labels):
            data["top"] = [[{"label": labels[i], "score": float(row[i])}
                            for i in np.argsort(row)[::-1][:3]] for row in scores]
    return data


_SHOWN_ROWS = 5


def _render_prediction(d: dict[str, Any]) -> None:
    samples = d.get("samples")
    console.print(f"[bold]{d['model']}[/] {d['version']} in {d['latency_ms']:.2f} ms"
                  + (f" ({samples} samples)" if samples else ""))
    if d.get("accuracy") is not None:
        console.print(f"  accuracy {d['accuracy']:.4f} against the file's {samples} labels")
    elif d.get("labels") == "ignored":
        console.print("  (the file's labels were ignored: they do not match the model's "
                      "output classes)")
    outputs = d["outputs"]
    tops = outputs.get("top", [])
    for row, top in enumerate(tops[:_SHOWN_ROWS]):
        console.print(f"  [{row}] " + ", ".join(f"{t['label']} {t['score']:.3f}" for t in top))
    if len(tops) > _SHOWN_ROWS:
        console.print(f"  … {len(tops) - _SHOWN_ROWS} more rows (--json shows every one)")
    for name, value in outputs.items():
        if name != "top":
            text = str(np.asarray(value).round(5).tolist())
            console.print(f"  {name}: {text[:300]}{'…' if len(text) > 300 else ''}")


def _take_labels(manifest: Manifest, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Pop a ``labels`` array (an eval file's) unless the model has an input of that name."""
    if "labels" in inputs and "labels" not in {t.name for t in manifest.inputs}:
        return inputs.pop("labels")
    return None


def _accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float | None:
    """Top-1 accuracy of a single class-score output against class indices (or one-hot rows);
    None when the labels are not of that kind."""
    if len(outputs) != 1:
        return None
    scores = next(iter(outputs.values()))
    if scores.ndim != 2 or len(labels) != len(scores):
        return None
    if labels.ndim == 2 and labels.shape == scores.shape:
        labels = labels.argmax(axis=1)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        return None
    return float(np.mean(scores.argmax(axis=1) == labels))


def _predict_samples(a: Agent, manifest: Manifest, inputs: dict[str, np.ndarray],
                     version: str | None, where: str) -> tuple[dict[str, np.ndarray], str, float]:
    """Run an eval file's samples as the model takes them: (outputs, version(s), total ms)."""
    from edgeserve.samples import run_samples

    versions: set[str] = set()

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        one = a.predict(manifest.name, feeds, version)
        versions.add(one.version)
        return one.outputs

    start = time.perf_counter()
    outputs = run_samples(run, manifest.inputs, manifest.outputs, inputs, where=where)
    return outputs, ", ".join(sorted(versions)), (time.perf_counter() - start) * 1000.0


@agent.command("predict")
@click.argument("model", help="The installed model to run.")
@click.option("--input", "input_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help=f"Input file ({', '.join(INPUT_SUFFIXES)}); an .npz may carry a 'labels' "
                   "array (the converter's eval file): the accuracy is shown.")
@click.option("--version", default=None, help="A specific installed version (default: active).")
@agent_options
@json_option
def predict(model: str, input_path: Path, version: str | None, cache_dir: Path | None,
            profile: str | None, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Run a prediction on an input file (one sample or a batch).

    An eval .npz (one array per input plus 'labels', as 'edgeserve convert --eval' takes) is
    run the way the model takes samples (in batches, or one by one for a fixed batch axis), and
    the top-1 accuracy against the labels is shown."""
    with _agent(cache_dir, profile, trusted_keys, warmup=False) as a:
        manifest = a.manifest(model, version)
        inputs = read_inputs(manifest, input_path)
        labels = _take_labels(manifest, inputs)
        if labels is None:
            result = a.predict(model, inputs, version)
            outputs, served, latency = result.outputs, result.version, result.latency_ms
        else:
            outputs, served, latency = _predict_samples(a, manifest, inputs, version,
                                                        input_path.name)
    data: dict[str, Any] = {"model": model, "version": served, "latency_ms": latency,
                            "outputs": _summary(outputs, manifest.labels)}
    if labels is not None:
        accuracy = _accuracy(outputs, labels)
        data.update(samples=len(labels), accuracy=accuracy,
                    labels="compared" if accuracy is not None else "ignored")
    emit(data, as_json, _render_prediction)


@agent.command("batch")
@click.argument("model", help="The installed model to run.")
@click.argument("input_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
                help="Directory of input files, one prediction each.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for one NAME.npz of outputs per input file.")
@click.option("--version", default=None, help="A specific installed version (default: active).")
@agent_options
@json_option
def batch(model: str, input_dir: Path, out_dir: Path, version: str | None,
          cache_dir: Path | None, profile: str | None, trusted_keys: tuple[Path, ...],
          as_json: bool) -> None:
    """Predict every input file in INPUT_DIR, writing OUT/NAME.npz (with a progress bar)."""
    from rich.progress import Progress

    files = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in INPUT_SUFFIXES)
    if not files:
        raise ConfigError(f"{input_dir} holds no input files ({', '.join(INPUT_SUFFIXES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[dict[str, str]] = []
    done = 0
    with _agent(cache_dir, profile, trusted_keys) as a, \
            Progress(console=console, disable=as_json, transient=False) as progress:
        manifest = a.manifest(model, version)
        task = progress.add_task(f"{model}: predicting", total=len(files))
        for path in files:
            try:
                inputs = read_inputs(manifest, path)
                _take_labels(manifest, inputs)  # an eval file's labels are not an input
                result = a.predict(model, inputs, version)
                np.savez(out_dir / f"{path.stem}.npz", **result.outputs)  # type: ignore[arg-type]
                done += 1
            except InvalidInputError as exc:
                failures.append({"file": path.name, "error": str(exc)})
            progress.advance(task)
    data = {"model": model, "predicted": done, "failed": failures, "out": str(out_dir)}
    emit(data, as_json, lambda d: console.print(
        f"{d['predicted']} predictions written to {d['out']}"
        + "".join(f"\n[red]failed[/] {f['file']}: {f['error']}" for f in d["failed"])))
    if failures:
        raise click.exceptions.Exit(7)


@agent.command("activate")
@click.argument("model", help="The installed model.")
@click.argument("version", help="The installed version to serve from now on.")
@agent_options
@json_option
def activate(model: str, version: str, cache_dir: Path | None, profile: str | None,
             trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Make an installed version the active one (atomically)."""
    with _agent(cache_dir, profile, trusted_keys, warmup=False) as a:
        info = a.activate(model, version)
    emit(info.to_dict(), as_json, lambda d: console.print(
        f"{d['name']} {d['version']} is now active"))


@agent.command("rollback")
@click.argument("model", help="The model to roll back.")
@agent_options
@json_option
def rollback(model: str, cache_dir: Path | None, profile: str | None,
             trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Return MODEL to its previous version."""
    with _agent(cache_dir, profile, trusted_keys, warmup=False) as a:
        info = a.rollback(model)
    emit(info.to_dict(), as_json, lambda d: console.print(
        f"{d['name']} rolled back to {d['version']}"))


@agent.command("remove")
@click.argument("model", help="The model to remove (every version unless --version).")
@click.option("--version", default=None, help="Remove only this version.")
@click.option("--force", is_flag=True, help="Allow removing the active version.")
@agent_options
@json_option
def remove(model: str, version: str | None, force: bool, cache_dir: Path | None,
           profile: str | None, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Remove a model (every version) or one version of it."""
    with _agent(cache_dir, profile, trusted_keys, warmup=False) as a:
        removed = a.remove(model, version, force)
    emit({"model": model, "removed": removed}, as_json, lambda d: console.print(
        f"removed {d['model']} {', '.join(d['removed'])}"))


@agent.command("check")
@click.option("--no-repair", is_flag=True, help="Only report problems.")
@agent_options
@json_option
def check(no_repair: bool, cache_dir: Path | None, profile: str | None,
          trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Verify every cached file against its hash; repair what can be repaired."""
    with _agent(cache_dir, profile, trusted_keys, warmup=False) as a:
        report = a.check(repair=not no_repair)
    emit(report.to_dict(), as_json, lambda d: console.print(
        ("[green]cache OK[/]" if d["ok"] else "[red]cache has problems[/]")
        + "".join(f"\n  repaired: {r}" for r in d["repaired"])
        + "".join(f"\n  problem: {p}" for p in d["problems"])))
    if not report.ok:
        raise click.exceptions.Exit(9)


@agent.command("events")
@click.option("--model", default=None, help="Only this model's events.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Show the newest N events (in time order).")
@agent_options
@json_option
def events(model: str | None, limit: int, cache_dir: Path | None, profile: str | None,
           trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Show the agent's event log: installs, activations, rollbacks, removals, and what fleet
    updates came to (committed, health failures, failed deliveries)."""
    from .events import EventLog

    config = load_config(cache_dir, profile, trusted_keys)
    rows = [e.to_dict() for e in EventLog(config.cache_dir).read(limit, model)]

    def render(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print(f"no events in {config.cache_dir}")
            return
        console.print(table(f"{len(data)} event(s)", ["time (UTC)", "event", "model", "version",
                                                       "detail"],
                            [(_when(e["ts"]), e["event"], e["model"], e["version"], e["detail"])
                             for e in data]))

    emit(rows, as_json, render)


def tls_options(fn: Any) -> Any:
    """--tls-cert/--tls-key/--tls-client-ca and --insecure, for the agent's servers."""
    options = [
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Serve HTTPS (and gRPC over TLS) with this certificate "
                                        "(PEM)."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="The private key of --tls-cert (PEM)."),
        click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False,
                                                        path_type=Path),
                     default=None, help="Require client certificates signed by this CA "
                                        "(mutual TLS)."),
        click.option("--insecure", is_flag=True,
                     help="Listen beyond loopback without --auth (every model answers anyone "
                          "who reaches the address)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class ByteSize(click.ParamType[int]):
    """A size in bytes: ``67108864``, ``64M``, ``64MiB``, ``512K``, ``1G`` (binary units)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in "KMG" else ""
        number = text[:-1] if unit else text
        try:
            size = int(float(number) * self._UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size; expected bytes or a number with K, M or G "
                      "(e.g. 64M)", param, ctx)
        if size < 1 << 20:
            self.fail(f"{value!r} is less than 1 MiB", param, ctx)
        return size


def limit_options(fn: Any) -> Any:
    """--memory-budget, --max-connections and --header-timeout, for the agent's servers."""
    options = [
        click.option("--memory-budget", type=ByteSize(), default="64M", show_default=True,
                     help="Memory requests may hold at once (bodies and their decoding); past "
                          "it requests wait briefly, then get 503."),
        click.option("--max-connections", type=click.IntRange(16), default=None,
                     help="Open HTTP connections at most [default: the descriptor limit less "
                          "128, at most 4096; a quarter of it per client]."),
        click.option("--header-timeout", type=click.FloatRange(0.5), default=10.0,
                     show_default=True,
                     help="Seconds a client has to send its request headers (and a body may "
                          "pause) before the connection is closed with 408."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def server_limits(memory_budget: int, max_connections: int | None,
                  header_timeout: float) -> Any:
    from .server import ServerLimits

    return ServerLimits(memory_budget=memory_budget, max_connections=max_connections,
                        header_timeout_s=header_timeout, read_timeout_s=header_timeout)


def tls_settings(cert: Path | None, key: Path | None, client_ca: Path | None) -> Any:
    """The TLS settings the options give (None without a certificate)."""
    from .server import TlsSettings

    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    return TlsSettings(cert, key, client_ca)


def batch_option(fn: Any) -> Any:
    return click.option(
        "--batch", "batch", multiple=True, metavar="MODEL[:MAX_BATCH[:DELAY_US]]",
        help="Dynamic batching for MODEL: concurrent requests stacked into one runtime call, "
             "up to MAX_BATCH samples [8], waiting at most DELAY_US microseconds [500]; only "
             "for artifacts with a dynamic batch axis; repeatable. Raises --workers to "
             "MAX_BATCH.")(fn)


def loop_option(default: str) -> Callable[[Any], Any]:
    """``--loop auto|uvloop|asyncio``: the servers' event loop (``agent serve`` takes uvloop when
    installed, for throughput; ``agent run`` asyncio's, 2.6 MB less on a device)."""
    def decorate(fn: Any) -> Any:
        return click.option(
            "--loop", "event_loop", type=click.Choice(EVENT_LOOPS),
            default=default, show_default=True,
            help="The servers' event loop: uvloop serves ~30 % more small requests, asyncio's "
                 "uses 2.6 MB less memory; auto is uvloop when installed.")(fn)
    return decorate


def batching_of(options: tuple[str, ...], workers: int) -> tuple[dict[str, Any], int]:
    """(policies by model, workers): batching stacks only requests that run at once, so the
    worker count is raised to the largest ``max_batch``."""
    from .batching import parse_batch_option

    policies = dict(parse_batch_option(o) for o in options)
    wanted = max((p.max_batch for p in policies.values()), default=0)
    if wanted > workers:
        err_console.print(f"--batch: --workers raised from {workers} to {wanted} (batching "
                          "stacks requests that run at once)", soft_wrap=True)
        workers = wanted
    return policies, workers


@agent.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="HTTP port (0: any).")
@click.option("--grpc-port", default=None, type=int, help="Also serve gRPC on this port.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Inference worker threads.")
@click.option("--queue", default=64, show_default=True, type=click.IntRange(0, 100_000),
              help="Requests that may wait for a worker before 503s are returned.")
@click.option("--threads", default=None, type=click.IntRange(0, 256),
              help="Runtime threads per inference (default: the profile's).")
@click.option("--max-body", default=64 << 20, show_default=True, type=click.IntRange(1),
              help="Largest request body in bytes (413 past it).")
@click.option("--auth", default=None, envvar="EDGESERVE_AUTH",
              help="token:SECRET | jwt-hs256:SECRET[,aud=A][,scope=S] | "
                   "jwt-rs256:KEY.pem[,aud=A] | basic:USER:PASS[;USER:PASS]")
@batch_option
@loop_option("auto")
@tls_options
@limit_options
@agent_options
@json_option
def serve(host: str, port: int, grpc_port: int | None, workers: int, queue: int,
          threads: int | None, max_body: int, auth: str | None, batch: tuple[str, ...],
          event_loop: str,
          tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None,
          insecure: bool, memory_budget: int, max_connections: int | None,
          header_timeout: float, cache_dir: Path | None, profile: str | None,
          trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Serve installed models over HTTP (Open Inference Protocol v2) and optionally gRPC."""
    from .server import (
        MemoryBudget,
        MetricsRegistry,
        check_exposure,
        parse_auth_option,
        start_grpc_server,
        start_http_server,
    )

    authenticator = parse_auth_option(auth)
    tls = tls_settings(tls_cert, tls_key, tls_client_ca)
    check_exposure(host, authenticator, tls, insecure)
    limits = server_limits(memory_budget, max_connections, header_timeout)
    budget = MemoryBudget.of(limits)  # one budget for both transports
    config = load_config(cache_dir, profile, trusted_keys)
    batching, workers = batching_of(batch, workers)
    with _agent(config.cache_dir, config.profile, tuple(config.trusted_keys),
                concurrency=workers, batching=batching) as a:
        if threads is not None:
            a.profile = _with_threads(a, threads)
        # one registry for both transports: /metrics and the statistics extension agree
        metrics = MetricsRegistry()
        a.add_observer(metrics)
        grpc_handle = None
        if grpc_port is not None:
            grpc_handle = start_grpc_server(a, host, grpc_port, auth=authenticator,
                                            workers=workers, queue=queue,
                                            max_message_bytes=max_body, metrics=metrics,
                                            tls=tls, limits=limits, budget=budget,
                                            loop=event_loop)

        def listening(handle: Any) -> None:
            data = {"http": handle.url, "grpc": grpc_handle.address if grpc_handle else None,
                    "models": a.cache.models(), "workers": workers, "queue": queue,
                    "auth": type(authenticator).__name__ if authenticator else None,
                    "preload_failures": handle.preload_failures}
            emit(data, as_json, lambda d: plain(  # plain: no rich in a serving process
                f"HTTP listening on {d['http']}"
                + (f", gRPC on {d['grpc']}" if d["grpc"] else "")
                + f" (models: {', '.join(d['models']) or 'none'})"
                + "".join(f"\ncannot load {f}" for f in d["preload_failures"])))

        try:
            start_http_server(a, host, port, auth=authenticator, workers=workers, queue=queue,
                              max_body_bytes=max_body, metrics=metrics, block=True,
                              on_listen=listening, tls=tls, limits=limits, budget=budget,
                              loop=event_loop)
        finally:
            if grpc_handle is not None:
                grpc_handle.stop()


def _label(text: str | None) -> int | str | None:
    """A class index when the text is a whole number, else a label name."""
    if text is None:
        return None
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _post_feedback(url: str, model: str, body: dict[str, Any], token: str | None,
                   timeout: float) -> dict[str, Any]:
    """POST the feedback to a running agent; its error message becomes the matching error."""
    endpoint = f"{url.rstrip('/')}/v2/models/{model}/feedback"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(endpoint, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return dict(json.loads(response.read() or b"{}"))
    except urllib.error.HTTPError as exc:
        try:
            message = str(json.loads(exc.read()).get("error", exc.reason))
        except ValueError:
            message = str(exc.reason)
        error = {400: InvalidInputError, 401: AuthError, 403: AuthError,
                 404: ModelNotFoundError}.get(exc.code, EdgeserveError)
        raise error(f"the agent refused the feedback ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"cannot reach the agent at {url}: {reason}; is 'edgeserve agent "
                          "serve' or 'agent run' listening there?") from None


@agent.command("feedback")
@click.argument("prediction_id",
                help="The id the agent gave the prediction (its response's \"id\").")
@click.option("--model", required=True, help="The model that made the prediction.")
@click.option("--reward", type=float, default=None,
              help="A number, e.g. 1 (good) or 0 (bad) for binary outcomes.")
@click.option("--label", default=None, help="The true label: a class index or a label name.")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              envvar="EDGESERVE_AGENT_URL", help="The running agent's HTTP address.")
@click.option("--token", default=None, envvar="EDGESERVE_AGENT_TOKEN",
              help="Bearer token when the agent requires one.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the agent's answer.")
@json_option
def feedback(prediction_id: str, model: str, reward: float | None, label: str | None, url: str,
             token: str | None, timeout: float, as_json: bool) -> None:
    """Attach a reward and/or the true label to a past prediction of a running agent."""
    if reward is None and label is None:
        raise InvalidInputError("feedback needs --reward, --label, or both")
    body: dict[str, Any] = {"id": prediction_id}
    if reward is not None:
        body["reward"] = reward
    if label is not None:
        body["label"] = _label(label)
    answer = _post_feedback(url, model, body, token, timeout)
    emit(answer, as_json, lambda d: console.print(
        f"feedback for {prediction_id} accepted ({d.get('model')} {d.get('model_version')})"))


def _with_threads(a: Agent, threads: int) -> Any:
    runtimes = a.profile.runtimes
    update: dict[str, Any] = {}
    if runtimes.onnxruntime is not None:
        update["onnxruntime"] = runtimes.onnxruntime.model_copy(
            update={"intra_op_threads": threads})
    if runtimes.litert is not None:
        update["litert"] = runtimes.litert.model_copy(update={"threads": threads})
    return a.profile.model_copy(update={"runtimes": runtimes.model_copy(update=update)})



