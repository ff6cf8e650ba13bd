"""``edgeserve fleet simulate``: thousands of simulated devices against a real fleet and broker."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import click

from edgeserve.cli import subscribe_qos_option
from edgeserve.console import console, emit, err_console, json_option, table

from .cli_options import broker_options, broker_settings, parse_duration, parse_labels

__all__ = ["simulate_command"]


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for value in values:
        model, sep, version = value.partition("=")
        if not sep or not model or not version:
            raise click.BadParameter(f"{value!r} is not MODEL=VERSION", param_hint=option)
        out[model] = version
    return out


@click.command("simulate")
@click.option("--devices", type=click.IntRange(1, 1_000_000), required=True,
              help="How many devices to simulate in this process (one MQTT session each).")
@click.option("--fleet", "fleet_name", envvar="EDGESERVE_FLEET", required=True,
              help="Fleet name: the MQTT topic prefix edgeserve/v1/FLEET/… [env EDGESERVE_FLEET].")
@broker_options
@subscribe_qos_option
@click.option("--prefix", default="sim-", show_default=True,
              help="Device ids are PREFIX followed by a 5-digit number.")
@click.option("--first", type=click.IntRange(min=0), default=1, show_default=True,
              help="Number of the first device (several simulator processes take disjoint "
                   "ranges).")
@click.option("--windows-per-device", type=click.IntRange(0, 100_000), default=5,
              show_default=True,
              help="Telemetry windows each device sends once connected (its backlog).")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Then new windows per second across all devices (round robin), for "
                   "--duration.")
@click.option("--duration", default="0", show_default=True,
              help="How long --rate goes on (30, 30s, 5m).")
@click.option("--storm", "storm_within", default=None, metavar="SECONDS",
              help="Then a reconnect storm: every connection drops without DISCONNECT (Last "
                   "Wills fire) and each device returns within SECONDS (e.g. 10s).")
@click.option("--storm-windows", type=click.IntRange(0, 100_000), default=5, show_default=True,
              help="Windows each device records while away in the storm (its backlog on return).")
@click.option("--model", "models", multiple=True, metavar="MODEL=VERSION",
              help="A model version every device runs at the start (in its birth message and "
                   "windows); repeatable [default: none, health windows only].")
@click.option("--bad-version", "bad_versions", multiple=True, metavar="MODEL=VERSION",
              help="A version devices report as failing its health check (rolled back) when "
                   "their desired state names it; repeatable.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label in every birth message; repeatable.")
@click.option("--profile", default="simulated", show_default=True,
              help="Hardware profile in the birth messages.")
@click.option("--fleet-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="The fleet's public key (FLEET.pub.pem) to verify desired state with "
                   "[default: desired state is read unverified].")
@click.option("--batch-windows", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="Windows per telemetry batch.")
@click.option("--ack-timeout", type=click.FloatRange(min=0.5), default=30.0, show_default=True,
              help="Send unacked windows again after this many seconds without an ack.")
@click.option("--connect-concurrency", type=click.IntRange(1, 10_000), default=256,
              show_default=True, help="Connections being opened at once.")
@click.option("--no-acks", is_flag=True,
              help="Do not wait for the fleet's acks, only for the broker's PUBACKs (measures "
                   "the broker without a fleet).")
@click.option("--timeout", "timeout", default="5m", show_default=True,
              help="Longest wait for one phase's acks.")
@click.option("--hold", default="0", show_default=True,
              help="Keep the sessions this long at the end (e.g. while a rollout runs).")
@click.option("--forget-sessions", is_flag=True,
              help="At the end, end every device's broker session (a broker keeps MQTT 3.1.1 "
                   "persistent sessions, and what is queued for them, until then).")
@click.option("--seed", type=int, default=None, help="Random seed (storm return times, back-off).")
@click.option("--window", "window_s", type=click.FloatRange(0.5, 86400), default=60.0,
              show_default=True,
              help="Telemetry window length in seconds (the agent's window_s; aligned to it).")
@click.option("--spread", is_flag=True,
              help="With several --broker nodes: start device n on node n mod their number "
                   "(as DNS or a load balancer would), not all on the first.")
@json_option
def simulate_command(devices: int, fleet_name: str, prefix: str, first: int,
                     windows_per_device: int, rate: float, duration: str,
                     storm_within: str | None, storm_windows: int, models: tuple[str, ...],
                     bad_versions: tuple[str, ...], labels: tuple[str, ...], profile: str,
                     fleet_key: Path | None, batch_windows: int, ack_timeout: float,
                     connect_concurrency: int, no_acks: bool, timeout: str, hold: str,
                     forget_sessions: bool, seed: int | None, window_s: float, spread: bool,
                     as_json: bool,
                     **options: Any) -> None:
    """Simulate --devices agents in one process over MQTT 3.1.1: sessions with Last Wills,
    birth messages, telemetry backlogs until acked, desired state answered with reported state
    (artifacts "installed" by hash, not downloaded); prints what was sent and what it cost."""
    from edgeserve.errors import ConfigError

    from .simulate import Scenario, SimSettings, raise_open_files_limit

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if options.get("mqtt_version") == "5":
        raise click.BadParameter("the simulator speaks MQTT 3.1.1 (the contract needs nothing "
                                 "of 5); use auto or 3.1.1", param_hint="--mqtt-version")
    broker = broker_settings(options, subscribe_qos=int(options.pop("subscribe_qos")))
    settings = SimSettings(
        broker=broker, fleet=fleet_name, devices=devices, prefix=prefix, first=first,
        profile=profile, labels=parse_labels(labels), models=_pairs(models, "--model"),
        bad_versions=frozenset(f"{m}={v}" for m, v in _pairs(bad_versions,
                                                                "--bad-version").items()),
        fleet_key=fleet_key, batch_windows=batch_windows,
        max_unacked_windows=max(1000, batch_windows), ack_timeout_s=ack_timeout,
        connect_concurrency=connect_concurrency, seed=seed, window_s=window_s,
        spread=spread)
    scenario = Scenario(
        windows_per_device=windows_per_device, rate=rate, duration_s=parse_duration(duration),
        storm_within_s=parse_duration(storm_within) if storm_within is not None else None,
        storm_windows=storm_windows, acks=not no_acks, timeout_s=parse_duration(timeout),
        hold_s=parse_duration(hold), forget=forget_sessions)
    if no_acks and windows_per_device + storm_windows > settings.max_unacked_windows:
        raise ConfigError(f"with --no-acks a device sends at most {settings.max_unacked_windows} "
                          "windows (nothing is acked); lower --windows-per-device/--storm-windows")
    raise_open_files_limit(devices + 256)
    report = _run(settings, scenario, as_json)
    emit(report, as_json, _render)


def _run(settings: Any, scenario: Any, as_json: bool) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    from .simulate import run_scenario

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with Progress(console=Console(stderr=True), disable=as_json, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def tell(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(f"{phase}: windows acked", total=total)
            progress.update(tasks[phase], completed=done, total=total)

        err_console.print(f"connecting {settings.devices} simulated devices to "
                          f"{settings.broker.url} (fleet {settings.fleet})…")
        return dict(runner(run_scenario(settings, scenario, tell)))


def _render(report: dict[str, Any]) -> None:
    rows = [("devices / sessions held", f"{report['devices']} / {report['sessions']}"),
            ("connect", f"{report['connect_s']} s, {report['connect_cpu_s']} s CPU"),
            ("memory", f"{report['rss_mb']} MiB, {report['kib_per_session']} KiB per session"),
            ("idle CPU", f"{report['idle_cpu_percent']} % of one core")]
    for phase in ("backlog", "steady", "storm"):
        if phase in report:
            rows.append((phase, ", ".join(f"{k} {v}" for k, v in report[phase].items())))
    rows += [("windows numbered / acked", f"{report['windows']} / {report['acked']}"),
             ("windows sent (with resends)", str(report["windows_sent"])),
             ("connects / lost / failed", f"{report['connects']} / {report['connections_lost']}"
                                          f" / {report['connect_failures']}"),
             ("CPU", f"{report['cpu_s']} s, peak RSS {report['peak_rss_mb']} MiB")]
    console.print(table("fleet simulate", ["", "value"], rows))
