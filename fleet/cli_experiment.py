"""``edgeserve fleet experiment …``: A/B tests and multi-armed bandits between model versions.

The CLI reads and writes the fleet store (``--db``); the experiment controller inside
``edgeserve fleet serve`` pushes traffic splits, decides and promotes. ``stop`` is queued in the
store and carried out on the controller's next tick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from edgeserve.cli import SuggestingGroup
from edgeserve.console import console, emit, json_option, table
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
)
from .experiments.controller import status
from .experiments.repo import ExperimentRecord, Experiments
from .experiments.spec import parse_arms
from .store import Store, default_url

__all__ = ["experiment"]


@click.group("experiment", cls=SuggestingGroup)
def experiment() -> None:
    """A/B tests and multi-armed bandits between versions of a model."""


@experiment.command("create")
@click.argument("model", help="The model whose published versions compete.")
@click.option("--arms", required=True, metavar="V:W,V:W",
              help="Versions and weights, e.g. 1.0.0:50,2.0.0:50; the first is the control.")
@click.option("--kind", type=click.Choice(["ab", "bandit"]), default="ab", show_default=True,
              help="ab: fixed split and one test at the horizon; bandit: Thompson sampling.")
@click.option("--metric", type=click.Choice(["reward", "accuracy", "p95_ms"]), default="reward",
              show_default=True, help="What is compared (from device feedback, or latency).")
@click.option("--binary/--continuous", default=None,
              help="Rewards are 0/1 (default) or any number (accuracy is binary, p95_ms "
                   "continuous).")
@click.option("--min-samples", type=click.IntRange(min=1), default=None,
              help="Samples per arm before the one A/B decision (bandit: before a winner may "
                   "be declared). [default: from --mde, else 1000]")
@click.option("--mde", type=float, default=None,
              help="Smallest effect worth detecting (absolute, e.g. 0.05 for 5 points): sets "
                   "--min-samples by a power calculation.")
@click.option("--baseline", type=float, default=None,
              help="Expected control rate for the power calculation [default: 0.5, the "
                   "most conservative].")
@click.option("--stddev", type=float, default=None,
              help="Outcome standard deviation for the power calculation (continuous rewards).")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="False-positive rate (split among arms compared with the control).")
@click.option("--power", type=float, default=0.8, show_default=True,
              help="Chance of detecting an effect of --mde when there is one (power "
                   "calculation).")
@click.option("--floor", type=float, default=0.05, show_default=True,
              help="Bandit: least weight any arm keeps.")
@click.option("--push-every", default="10s", show_default=True,
              help="Bandit: at most one weight push per this long (30, 30s, 5m).")
@click.option("--group-by", default=None, metavar="LABEL",
              help="Bandit: one bandit per value of this device label ('profile' for the "
                   "hardware profile).")
@click.option("--profile", "profiles", multiple=True, help="Only devices of this profile.")
@click.option("--label", "labels", multiple=True, help="Only devices with KEY=VALUE.")
@click.option("--device", "device_ids", multiple=True, help="Only these devices.")
@db_option
@artifacts_option
@json_option
def experiment_create(model: str, arms: str, kind: str, metric: str, binary: bool | None,
                      min_samples: int | None, mde: float | None, baseline: float | None,
                      stddev: float | None, alpha: float, power: float, floor: float,
                      push_every: str, group_by: str | None, profiles: tuple[str, ...],
                      labels: tuple[str, ...], device_ids: tuple[str, ...], db: str | None,
                      artifacts_dir: Path | None, as_json: bool) -> None:
    """Start an A/B test or a bandit between published versions of MODEL."""
    weights = parse_arms(arms)
    artifacts = ArtifactStore(artifacts_dir or default_artifacts_dir(), TrustStore())
    for version in weights:
        artifacts.get(model, version)
    spec: dict[str, Any] = {
        "model": model, "kind": kind, "arms": weights, "metric": metric,
        "binary": binary if binary is not None else metric != "p95_ms",
        "min_samples": min_samples, "mde": mde, "baseline": baseline, "stddev": stddev,
        "alpha": alpha, "power": power, "floor": floor, "push_every_s": parse_duration(push_every),
        "group_by": group_by,
        "selector": {"profiles": list(profiles), "labels": parse_labels(labels),
                     "devices": list(device_ids)}}
    with Store.open(db or default_url()) as store:
        record = Experiments(store).create(spec)
        report = status(store, record)
    emit(report, as_json, lambda d: console.print(
        f"created experiment [bold]{d['id']}[/]: {kind} on {model}, arms {_split(d['arms'])}, "
        f"metric {metric}; {_plan_line(d)}; the controller in 'fleet serve' pushes the split"))


def _split(arms: list[dict[str, Any]]) -> str:
    return ", ".join(f"{a['version']} {100 * (a['weight'] or 0):.0f}%" for a in arms)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _plan_line(d: dict[str, Any]) -> str:
    p, n = d["plan"], d["min_samples"]
    if d["kind"] == "bandit":
        return (f"a winner needs P(best) >= {1 - p['alpha']:.3g} and {n} samples; weights "
                "follow the evidence until then")
    if d["metric"] == "p95_ms":
        return f"decides at {n} requests per arm (non-overlapping intervals of the p95)"
    if p.get("mde") is None:
        return f"decides at {n} samples per arm"
    if d.get("mde") is not None:
        return (f"decides at {n} samples per arm (power calculation: {p['samples_per_arm']} "
                f"per arm detect {p['mde']:.3g} with power {p['power']:g} at alpha "
                f"{p['alpha']:g})")
    return (f"decides at {n} samples per arm (detects {p['mde']:.3g} or more with power "
            f"{p['power']:g} at alpha {p['alpha']:g})")


def _arms_table(arms: list[dict[str, Any]]) -> Table:
    t = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
    for column in ("arm", "samples", "estimate", "95% interval", "weight", "", "requests"):
        t.add_column(column)
    for a in arms:
        ci = a.get("ci")
        weight = a.get("weight") or 0.0
        t.add_row(a["version"] + (" (control)" if a.get("control") else ""), str(a["n"]),
                  _num(a["mean"]), f"{_num(ci[0])} – {_num(ci[1])}" if ci else "-",
                  ProgressBar(total=1.0, completed=weight, width=20), f"{100 * weight:.1f}%",
                  str(a.get("requests", "")))
    return t


def _view(reports: list[dict[str, Any]]) -> Group:
    parts: list[Any] = []
    for d in reports:
        colour = {"running": "cyan", "decided": "green", "stopped": "dim"}.get(d["state"], "")
        parts.append(f"[bold]{d['id']}[/]  {d['kind']} on {d['model']}, metric {d['metric']}  "
                     f"[{colour}]{d['state']}[/]  {d['devices']} device(s), "
                     f"{d['pushes']} push(es)")
        parts.append(_arms_table(d["arms"]))
        if d.get("comparisons"):
            parts.append(table(None, ["arm", "vs", "difference", "interval", "p", "significant"],
                               [(c["version"], c["vs"], _num(c.get("difference")),
                                 f"{_num(c.get('ci_low'))} – {_num(c.get('ci_high'))}",
                                 _num(c.get("p_value"), 3), c.get("significant"))
                                for c in d["comparisons"]]))
        for group in d.get("groups") or []:
            parts.append(f"group {group['group']}:")
            parts.append(_arms_table(group["arms"]))
        parts.append(f"plan: {_plan_line(d)}")
        if d["kind"] == "bandit" and d.get("p_best"):
            parts.append("P(best): " + ", ".join(f"{v} {p:.3f}" for v, p in d["p_best"].items()))
        if d["rejected"]["windows"]:
            parts.append(f"[yellow]rejected {d['rejected']['windows']} window(s): "
                         f"{escape(str(d['rejected']['reason']))}[/]")
        parts.append(f"result: {escape(str(d['result']))}")
        parts.append("")
    return Group(*(parts or ["no experiments"]))


def _load(store: Store, experiment_id: str | None) -> list[ExperimentRecord]:
    repo = Experiments(store)
    if experiment_id:
        return [repo.get(experiment_id)]
    return repo.find(active_only=True) or repo.find()[-1:]


@experiment.command("status")
@click.argument("experiment_id", required=False,
                help="The experiment (an unambiguous prefix will do) [default: every running "
                     "one, else the newest].")
@click.option("--watch", is_flag=True,
              help="Refresh until the experiment stops (Ctrl-C stops); piped, each change is "
                   "printed.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@db_option
@json_option
def experiment_status(experiment_id: str | None, watch: bool, interval: float, db: str | None,
                      as_json: bool) -> None:
    """Per-arm samples, estimates, 95% intervals and weights; the test, the plan, the result."""
    with Store.open(db or default_url(), migrate=False) as store:
        def reports() -> list[dict[str, Any]]:
            return [status(store, r) for r in _load(store, experiment_id)]

        if as_json or not watch:
            emit(reports(), as_json, lambda rs: console.print(_view(rs)))
            return

        def view() -> tuple[Group, bool]:
            current = reports()
            return _view(current), all(r["state"] == "stopped" for r in current)

        watch_view(view, interval)


@experiment.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include stopped experiments.")
@db_option
@json_option
def experiment_list(show_all: bool, db: str | None, as_json: bool) -> None:
    """List experiments (running ones, or all with --all)."""
    with Store.open(db or default_url(), migrate=False) as store:
        records = Experiments(store).find(active_only=not show_all)
    rows = [{"id": r.id, "model": r.spec.model, "kind": r.spec.kind, "metric": r.spec.metric,
             "state": r.state.phase, "arms": list(r.spec.arms), "started": r.state.started,
             "winner": r.state.decision.winner if r.state.decision else None,
             "rollout": r.state.rollout, "reason": r.state.reason} for r in records]
    emit(rows, as_json, lambda rs: console.print(table(
        "experiments", ["id", "model", "kind", "metric", "state", "arms", "winner", "rollout"],
        [(r["id"], r["model"], r["kind"], r["metric"], r["state"], ", ".join(r["arms"]),
          r["winner"], r["rollout"]) for r in rs])))


@experiment.command("stop")
@click.argument("experiment_id", help="The experiment (an unambiguous prefix will do).")
@click.option("--promote", is_flag=True,
              help="Roll the winner out through the rollout engine (fails when there is no "
                   "winner yet).")
@click.option("--reason", default="", help="Recorded with the stop.")
@click.option("--stages", default=None, help="Promotion rollout stages, e.g. 10,50,100.")
@click.option("--soak", default=None, help="Promotion rollout soak per stage (30s, 5m).")
@click.option("--no-gates", is_flag=True, help="Promotion rollout without gates.")
@db_option
@json_option
def experiment_stop(experiment_id: str, promote: bool, reason: str, stages: str | None,
                    soak: str | None, no_gates: bool, db: str | None, as_json: bool) -> None:
    """End an experiment: devices drop the split (keeping their active version); with
    --promote the winner is rolled out by the rollout engine (stages, gates)."""
    rollout: dict[str, Any] = {"gates": []} if no_gates else {}
    if stages is not None:
        try:
            rollout["stages"] = [float(s) for s in stages.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(f"{stages!r} is not a comma-separated list of "
                                     "percentages", param_hint="--stages") from None
    if soak is not None:
        rollout["soak_seconds"] = parse_duration(soak)
    with Store.open(db or default_url(), migrate=False) as store:
        repo = Experiments(store)
        record = repo.get(experiment_id)
        if promote:
            current = status(store, record)
            if current.get("winner") is None:
                raise ConfigError(
                    f"experiment {record.id} has no winner to promote ({current['result']}); "
                    f"stop it without --promote, or roll a version out yourself with "
                    f"'edgeserve fleet rollout create {record.spec.model} VERSION'")
        record = repo.request_stop(record.id, promote, reason, rollout)
    emit({"id": record.id, "stop": True, "promote": promote, "queued": True}, as_json,
         lambda d: console.print(
             f"stop{' and promotion' if promote else ''} queued for experiment {d['id']}; the "
             "controller applies it on its next tick"))
