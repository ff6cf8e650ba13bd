"""``edgeserve fleet publish`` and ``edgeserve fleet rollout …``: the fleet manager's rollout CLI.

The CLI reads and writes the fleet store (``--db``) and the artifact store (``--artifacts``); the
rollout controller inside ``edgeserve fleet serve`` carries rollouts out. Operator actions
(promote, pause, resume, roll back) are queued in the store and applied on its next tick.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from edgeserve.cli import SuggestingGroup
from edgeserve.console import console, emit, err_console, format_bytes, json_option, table
from edgeserve.console import watch as watch_view
from edgeserve.errors import ConfigError
from edgeserve.signing import TrustStore

from .artifacts import ArtifactStore
from .cli_options import (
    artifacts_option,
    db_option,
    default_artifacts_dir,
    parse_duration,
    parse_labels,
    trusted_keys_option,
)
from .rollouts.admission import create_rollout
from .rollouts.controller import device_views
from .rollouts.repo import RolloutRecord, Rollouts
from .store import Store, default_url
from .transfers import TransferLog, TransferSummary

__all__ = ["publish_command", "rollout"]


def _trust(paths: tuple[Path, ...]) -> TrustStore:
    given = list(paths) or [Path(p) for p in
                            os.environ.get("EDGESERVE_FLEET_TRUSTED_KEYS", "").split(os.pathsep)
                            if p]
    if not given:
        raise ConfigError("no trusted keys: pass --trusted-key PUB.pem (the key packages are "
                          "signed with) or set EDGESERVE_FLEET_TRUSTED_KEYS")
    return TrustStore.from_paths(given)


@click.command("publish")
@click.argument("package", type=click.Path(dir_okay=False, path_type=Path),
                help="The signed .edgepkg to publish.")
@artifacts_option
@trusted_keys_option
@json_option
def publish_command(package: Path, artifacts_dir: Path | None, trusted_keys: tuple[Path, ...],
                    as_json: bool) -> None:
    """Verify a package and store it in the fleet's artifact store.

    Warns when the new version's inputs or outputs (names, dtypes, shapes) differ from the
    newest published version's: clients of the model would need changing too."""
    store = ArtifactStore(artifacts_dir or default_artifacts_dir(), _trust(trusted_keys))
    published = store.publish(package)
    for change in published.interface_changes:  # on stderr; --json output carries them too
        err_console.print(f"[yellow]warning:[/] {published.name} {published.version} changes "
                          f"the model's interface: {change}", soft_wrap=True)
    emit(published.to_dict(), as_json, lambda d: console.print(
        f"published [bold]{d['name']} {d['version']}[/] (release {d['release']}, "
        f"{len(d['artifacts'])} artifacts) to {store.root}"))


@click.group("rollout", cls=SuggestingGroup)
def rollout() -> None:
    """Create, watch and steer rollouts of model versions."""


@rollout.command("create")
@click.argument("model", help="The model's name, as published.")
@click.argument("version", help="The published version to roll out.")
@click.option("--strategy", type=click.Choice(["canary", "blue-green"]), default="canary",
              show_default=True,
              help="canary: move devices stage by stage; blue-green: run the new version as "
                   "a shadow first, gate on disagreement, then switch every device at once.")
@click.option("--stages", default="1,10,50,100", show_default=True,
              help="Percent of devices in scope per stage, ending at 100.")
@click.option("--gate", "gates", multiple=True,
              help="Gate, e.g. 'error_rate<=0.01' or 'p95_ms<=1.2*control'; repeatable. "
                   "[default: error_rate<=0.01, p95_ms<=1.5*control]")
@click.option("--no-gates", is_flag=True, help="No gates (e.g. a first deployment).")
@click.option("--soak", default="5m", show_default=True,
              help="Minimum time per stage: seconds or 30s/5m/1h.")
@click.option("--soak-inferences", type=int, default=0, show_default=True,
              help="Minimum canary inferences per stage.")
@click.option("--min-requests", type=int, default=50, show_default=True,
              help="Canary inferences before a gate may pass or fail.")
@click.option("--min-devices", type=int, default=1, show_default=True,
              help="Minimum devices per stage.")
@click.option("--max-failed-devices", type=int, default=0, show_default=True,
              help="On-device health-check failures tolerated before rolling back.")
@click.option("--silent-after", default="10m", show_default=True,
              help="A device silent this long does not block a stage.")
@click.option("--stage-timeout", default="1h", show_default=True,
              help="A stage not complete this long after it began (pauses not counted) is "
                   "rolled back, naming what it waited for.")
@click.option("--watch-inferences", type=click.IntRange(min=0), default=20, show_default=True,
              help="Live requests each device watches after activating the version before it "
                   "commits (0: the package's samples alone decide).")
@click.option("--watch-time", default="2m", show_default=True,
              help="A device with fewer live requests than that decides after this long.")
@click.option("--only-fitting", is_flag=True,
              help="Narrow the scope to the devices that can run the package (by default a "
                   "rollout is refused when a device in scope has no artifact it can run).")
@click.option("--manual", is_flag=True, help="Wait for 'rollout promote' after each stage.")
@click.option("--shadow-sample", type=float, default=1.0, show_default=True,
              help="Blue-green: fraction of live requests the shadow also runs.")
@click.option("--profile", "profiles", multiple=True, help="Only devices of this profile.")
@click.option("--label", "labels", multiple=True, help="Only devices with KEY=VALUE.")
@click.option("--device", "device_ids", multiple=True, help="Only these devices.")
@db_option
@artifacts_option
@json_option
def rollout_create(model: str, version: str, strategy: str, stages: str,
                   gates: tuple[str, ...], no_gates: bool, soak: str, soak_inferences: int,
                   min_requests: int, min_devices: int, max_failed_devices: int,
                   silent_after: str, stage_timeout: str, watch_inferences: int,
                   watch_time: str, only_fitting: bool, manual: bool,
                   shadow_sample: float, profiles: tuple[str, ...], labels: tuple[str, ...],
                   device_ids: tuple[str, ...], db: str | None, artifacts_dir: Path | None,
                   as_json: bool) -> None:
    """Roll MODEL VERSION out to the devices in scope, stage by stage, gated on model health.

    Refused up front when a device in scope has no artifact it can run (see --only-fitting),
    when no device is in scope, or when a gate relative to the control cohort can never get one
    (a single device, a first deployment)."""
    artifacts = ArtifactStore(artifacts_dir or default_artifacts_dir(), TrustStore())
    try:
        stage_list = [float(s) for s in stages.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{stages!r} is not a comma-separated list of percentages",
                                 param_hint="--stages") from None
    spec: dict[str, Any] = {
        "model": model, "version": version, "strategy": strategy, "stages": stage_list,
        "soak_seconds": parse_duration(soak), "soak_inferences": soak_inferences,
        "min_requests": min_requests, "min_devices": min_devices,
        "max_failed_devices": max_failed_devices, "silent_after_s": parse_duration(silent_after),
        "stage_timeout_s": parse_duration(stage_timeout),
        "health": {"min_inferences": watch_inferences, "max_watch_s": parse_duration(watch_time)},
        "auto_promote": not manual, "shadow_sample_rate": shadow_sample,
        "selector": {"profiles": list(profiles), "labels": parse_labels(labels),
                     "devices": list(device_ids)},
    }
    if no_gates:
        spec["gates"] = []
    elif gates:
        spec["gates"] = list(gates)
    with Store.open(db or default_url()) as store:
        record, admission = create_rollout(store, artifacts, spec, only_fitting=only_fitting)
    for note in [] if as_json else admission.notes:  # with --json they are in the output
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    emit({**record.to_dict(), "admission": admission.to_dict()}, as_json,
         lambda d: console.print(
             f"created rollout [bold]{d['id']}[/]: {d['strategy']} {model} {version}, stages "
             f"{', '.join(f'{s:g}%' for s in d['stages'])}; gates: "
             f"{', '.join(record.spec.gates) or 'none'}; {len(admission.fitting)} device(s) "
             "checked"))


def _transfer(transfers: TransferLog, record: RolloutRecord) -> TransferSummary:
    return transfers.summary(record.spec.model, record.spec.version, since=record.created)


def _transfer_line(t: TransferSummary) -> str | None:
    if not t.full_transfers and not t.delta_transfers:
        return None
    return (f"  sent {format_bytes(t.bytes_sent)}: {t.delta_transfers} file(s) as deltas "
            f"({format_bytes(t.delta_bytes_sent)} instead of {format_bytes(t.delta_full_bytes)}),"
            f" {t.full_transfers} in full ({format_bytes(t.full_bytes_sent)}); saved "
            f"{format_bytes(t.saved)}"
            + (f"; {t.fallbacks} delta(s) refused by devices and sent in full"
               if t.fallbacks else ""))


def _status_view(store: Store, records: list[RolloutRecord],
                 transfers: TransferLog | None = None) -> Group:
    now = time.time()
    parts: list[Any] = []
    for record in records:
        spec, state = record.spec, record.state
        views = device_views(store, spec, now)
        converged = sum(1 for v in views if v.device_id in state.assigned
                        and v.active == spec.version)
        colour = {"completed": "green", "rolled-back": "red", "rolling-back": "red",
                  "paused": "yellow", "awaiting-promotion": "yellow"}.get(state.phase, "cyan")
        header = (f"[bold]{record.id}[/]  {spec.strategy} {spec.model} → {spec.version}  "
                  f"[{colour}]{state.phase}[/]")
        if state.reason:
            header += f"\n  reason: {state.reason}"
        line = _transfer_line(_transfer(transfers, record)) if transfers is not None else None
        if line:
            header += f"\n{line}"
        stages = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
        for column in ("stage", "target", "progress", "devices"):
            stages.add_column(column)
        in_scope = max(len(views), 1)
        for i, pct in enumerate(spec.stages):
            wanted = min(len(views), max(spec.min_devices, -(-int(pct * len(views)) // 100)))
            done = converged if i <= state.stage else 0
            if i < state.stage or state.phase == "completed":
                done = wanted
            bar = ProgressBar(total=max(wanted, 1), completed=min(done, wanted), width=30)
            marker = "▶" if i == state.stage and state.phase not in ("completed",
                                                                      "rolled-back") else " "
            stages.add_row(f"{marker}{i + 1}", f"{pct:g}% ({wanted}/{in_scope})", bar,
                           f"{min(done, wanted)}/{wanted}")
        gates = table(None, ["gate", "verdict", "canary", "bound", "detail"],
                      [(g.gate, g.verdict, _num(g.canary), _num(g.bound), g.detail)
                       for g in state.gate_results])
        parts.extend([header, stages, gates, ""])
    if not parts:
        parts.append("no rollouts")
    return Group(*parts)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@rollout.command("status")
@click.argument("rollout_id", required=False,
                help="The rollout (an unambiguous prefix will do) [default: every running one, "
                     "else the newest].")
@click.option("--watch", is_flag=True,
              help="Refresh until the rollout ends (Ctrl-C stops); piped, each change is "
                   "printed.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--gate-ticks", type=click.IntRange(min=0), default=50, show_default=True,
              help="With --json: how many of the newest gate evaluations to include beside "
                   "every milestone event.")
@db_option
@artifacts_option
@json_option
def rollout_status(rollout_id: str | None, watch: bool, interval: float, gate_ticks: int,
                   db: str | None, artifacts_dir: Path | None, as_json: bool) -> None:
    """Show one rollout (or every running one): stages with progress bars, gate values, and
    the bytes its version's files cost (in full and as deltas) and saved.

    With --json each rollout carries its history: every milestone (created, assigned, stage,
    awaiting-promotion, paused, resumed, device-failed, completed, rolled-back, ...), the
    newest gate values, and "transfer"."""
    from .events import rollout_history

    transfers = TransferLog(artifacts_dir or default_artifacts_dir())
    with Store.open(db or default_url(), migrate=False) as store:
        repo = Rollouts(store)

        def load() -> list[RolloutRecord]:
            if rollout_id:
                return [repo.get(rollout_id)]
            return repo.find(active_only=True) or repo.find()[-1:]

        if as_json:
            emit([{**r.to_dict(), "events": rollout_history(store, r.id, gate_ticks),
                   "transfer": _transfer(transfers, r).to_dict()} for r in load()], True)
            return
        if not watch:
            console.print(_status_view(store, load(), transfers))
            return

        def view() -> tuple[Group, bool]:
            records = load()
            return _status_view(store, records, transfers), all(r.state.done for r in records)

        watch_view(view, interval)


@rollout.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include finished rollouts.")
@db_option
@json_option
def rollout_list(show_all: bool, db: str | None, as_json: bool) -> None:
    """List rollouts (running ones, or all with --all)."""
    with Store.open(db or default_url(), migrate=False) as store:
        records = Rollouts(store).find(active_only=not show_all)
    rows = [r.to_dict() for r in records]
    emit(rows, as_json, lambda rs: console.print(table(
        "rollouts", ["id", "model", "version", "strategy", "phase", "stage", "devices", "reason"],
        [(r["id"], r["model"], r["version"], r["strategy"], r["phase"],
          f"{r['stage']}/{len(r['stages'])}", r["devices"], r["reason"]) for r in rs])))


def _action(name: str, help_text: str) -> click.Command:
    @click.command(name, help=help_text)
    @click.argument("rollout_id", help="The rollout (an unambiguous prefix will do).")
    @click.option("--reason", default="", help="Recorded with the action.")
    @db_option
    @json_option
    def command(rollout_id: str, reason: str, db: str | None, as_json: bool) -> None:
        with Store.open(db or default_url(), migrate=False) as store:
            record = Rollouts(store).queue_action(rollout_id, name, reason)  # type: ignore[arg-type]
        emit({"id": record.id, "action": name, "queued": True}, as_json, lambda d: console.print(
            f"{name} queued for rollout {d['id']}; the controller applies it on its next tick"))

    return command


for _name, _help in (("promote", "Move to the next stage now (skipping the rest of the soak)."),
                     ("pause", "Freeze a rollout: no new devices, no gate decisions."),
                     ("resume", "Continue a paused rollout."),
                     ("rollback", "Return every device of the rollout to its previous version.")):
    rollout.add_command(_action(_name, _help))
