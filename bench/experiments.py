"""Experiments: the fleet's own decision functions on seeded synthetic feedback.

(a) A/B: the fixed-horizon test at the power calculation's sample size against "peeking" (the
same test after every tenth of the horizon, stopping at the first significant look) — false
positives on identical arms and power on a real 5-point lift, over many seeded runs.

(b) Bandit: the experiment engine (``advance``: Thompson weights with a floor, pushed once per
batch of feedback) against a uniform split, on arms rewarding 0.50 / 0.55 / 0.70 — feedbacks until
the best arm gets >= 80 % of the traffic, the best arm's share afterwards, and cumulative regret.

    .venv/bin/python bench/experiments.py [--runs 2000] [--bandit-runs 100] [--record]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edgeserve.fleet.experiments import (
    ArmData,
    Collected,
    ExperimentSpec,
    ExperimentState,
    ab_decision,
    advance,
    samples_per_arm,
)

console = Console()
RATES = {"a": 0.50, "b": 0.55, "c": 0.70}


def _arm(wins: float, n: int) -> ArmData:
    return ArmData(requests=n, feedback=n, rewarded=n, reward_sum=wins, reward_sumsq=wins)


def ab_trial(spec: ExperimentSpec, rates: tuple[float, float], rng: np.random.Generator,
             looks: int) -> tuple[str | None, str | None]:
    """(fixed-horizon winner, peeking winner) of one simulated A/B test."""
    n = spec.min_samples
    steps = [n * (i + 1) // looks for i in range(looks)]
    a = np.cumsum(rng.random(n) < rates[0])
    b = np.cumsum(rng.random(n) < rates[1])
    peeking = None
    for k in steps:
        winner, _, _ = ab_decision(spec, {"a": _arm(float(a[k - 1]), k),
                                          "b": _arm(float(b[k - 1]), k)})
        if winner is not None:
            peeking = winner
            break
    fixed, _, _ = ab_decision(spec, {"a": _arm(float(a[-1]), n), "b": _arm(float(b[-1]), n)})
    return fixed, peeking


def bench_ab(runs: int, progress: Progress) -> dict[str, Any]:
    n = samples_per_arm(0.5, 0.05)
    spec = ExperimentSpec(id="bench", model="m", arms={"a": 1, "b": 1}, min_samples=n)
    rng = np.random.default_rng(7)
    out: dict[str, Any] = {"samples_per_arm": n, "runs": runs, "looks": 10}
    for name, rates, want in (("identical", (0.5, 0.5), None), ("lift", (0.50, 0.55), "b")):
        task = progress.add_task(f"A/B {name}", total=runs)
        fixed = peek = 0
        for _ in range(runs):
            f, p = ab_trial(spec, rates, rng, 10)
            fixed += f is not None and (want is None or f == want)
            peek += p is not None and (want is None or p == want)
            progress.advance(task)
        out[name] = {"fixed": fixed / runs, "peeking": peek / runs}
    return out


def bandit_run(seed: int, total: int, batch: int, floor: float) -> dict[str, float]:
    """One bandit through the engine and one uniform split, on the same reward stream."""
    spec = ExperimentSpec(id="bench", model="m", kind="bandit", arms=dict.fromkeys(RATES, 1.0),
                          floor=floor, push_every_s=1.0, min_samples=100)
    state = ExperimentState(started=0.0)
    arms = {v: ArmData() for v in RATES}
    rng = np.random.default_rng(seed)
    names = list(RATES)
    regret = 0.0
    reached: int | None = None
    late_best = late_all = 0
    for step in range(total // batch):
        state, _ = advance(spec, state, Collected(groups={"*": arms}), float(step), seed=seed)
        weights = state.weights["*"]
        if reached is None and weights["c"] >= 0.8:
            reached = step * batch
        p = np.array([weights[v] for v in names])
        chosen = rng.choice(len(names), size=batch, p=p / p.sum())  # as the router normalises
        for index in chosen:
            version = names[index]
            win = float(rng.random() < RATES[version])
            data = arms[version]
            data.rewarded += 1
            data.reward_sum += win
            data.reward_sumsq += win
            regret += RATES["c"] - RATES[version]
            if step * batch >= total // 2:
                late_all += 1
                late_best += version == "c"
    uniform = total * (RATES["c"] - statistics.fmean(RATES.values()))
    return {"reached": float(reached if reached is not None else total), "regret": regret,
            "uniform_regret": uniform, "late_share": late_best / max(late_all, 1)}


def bench_bandit(runs: int, total: int, batch: int, floor: float,
                 progress: Progress) -> dict[str, Any]:
    task = progress.add_task("bandit", total=runs)
    results = []
    for seed in range(runs):
        results.append(bandit_run(seed, total, batch, floor))
        progress.advance(task)

    def pct(key: str, q: float) -> float:
        return float(np.quantile([r[key] for r in results], q))

    return {"runs": runs, "feedbacks": total, "batch": batch, "floor": floor,
            "reached_median": pct("reached", 0.5), "reached_p90": pct("reached", 0.9),
            "reached_max": pct("reached", 1.0),
            "late_share_median": pct("late_share", 0.5), "late_share_min": pct("late_share", 0.0),
            "regret_median": pct("regret", 0.5), "regret_p90": pct("regret", 0.9),
            "uniform_regret": results[0]["uniform_regret"],
            "regret_ratio_median": float(np.median([r["regret"] / r["uniform_regret"]
                                                    for r in results]))}


def _tables(ab: dict[str, Any], bandit: dict[str, Any]) -> tuple[Table, Table]:
    t1 = Table(title=f"A/B at {ab['samples_per_arm']} per arm (alpha 0.05, power 0.8), "
                     f"{ab['runs']} runs")
    for column in ("", "fixed horizon", f"peeking ({ab['looks']} looks)", "ratio"):
        t1.add_column(column)
    for key, label in (("identical", "winner on identical arms"),
                       ("lift", "0.50 → 0.55 detected")):
        f, p = ab[key]["fixed"], ab[key]["peeking"]
        t1.add_row(label, f"{f:.3f}", f"{p:.3f}", f"{p / f:.2f}" if f else "-")
    t2 = Table(title=f"bandit 0.50/0.55/0.70, {bandit['feedbacks']} feedbacks, push every "
                     f"{bandit['batch']}, floor {bandit['floor']}, {bandit['runs']} runs")
    for column in ("", "median", "p90 / worst"):
        t2.add_column(column)
    t2.add_row("feedbacks until best arm ≥ 80 %", f"{bandit['reached_median']:.0f}",
               f"{bandit['reached_p90']:.0f} / {bandit['reached_max']:.0f}")
    t2.add_row("best arm's share, second half", f"{bandit['late_share_median']:.3f}",
               f"min {bandit['late_share_min']:.3f}")
    t2.add_row("cumulative regret (uniform: "
               f"{bandit['uniform_regret']:.0f})", f"{bandit['regret_median']:.1f}",
               f"{bandit['regret_p90']:.1f}")
    t2.add_row("regret / uniform split's", f"{bandit['regret_ratio_median']:.3f}", "")
    return t1, t2


def _record(ab: dict[str, Any], bandit: dict[str, Any]) -> None:
    path = Path(__file__).parents[1] / "docs" / "benchmarks.md"
    text = path.read_text()
    section = (
        "## Experiments\n\n"
        "`bench/experiments.py --record` — the fleet's own decision functions (`ab_decision`, "
        "the engine's `advance` with Thompson sampling) on seeded synthetic feedback; "
        "deterministic, so the machine's load does not matter.\n\n"
        f"**A/B, fixed horizon vs peeking** — {ab['runs']} seeded tests per row at the power "
        f"calculation's {ab['samples_per_arm']} samples per arm (alpha 0.05, power 0.8, 5-point "
        f"effect); peeking runs the same test after every tenth of the horizon and stops at "
        "the first significant look.\n\n"
        "| | fixed horizon | peeking (10 looks) | ratio |\n|---|---|---|---|\n"
        f"| winner declared on identical arms (false positives) | {ab['identical']['fixed']:.3f}"
        f" | {ab['identical']['peeking']:.3f} | "
        f"{ab['identical']['peeking'] / ab['identical']['fixed']:.2f} |\n"
        f"| 0.50 → 0.55 detected (power) | {ab['lift']['fixed']:.3f} | "
        f"{ab['lift']['peeking']:.3f} | {ab['lift']['peeking'] / ab['lift']['fixed']:.2f} |\n\n"
        f"**Bandit vs uniform split** — arms rewarding 0.50 / 0.55 / 0.70, {bandit['runs']} "
        f"seeded runs of {bandit['feedbacks']} feedbacks, weights pushed after every "
        f"{bandit['batch']} feedbacks, floor {bandit['floor']} per arm.\n\n"
        "| | median | p90 / worst |\n|---|---|---|\n"
        f"| feedbacks until the best arm gets ≥ 80 % | {bandit['reached_median']:.0f} | "
        f"{bandit['reached_p90']:.0f} / {bandit['reached_max']:.0f} |\n"
        f"| best arm's share of traffic, second half | {bandit['late_share_median']:.3f} | "
        f"min {bandit['late_share_min']:.3f} |\n"
        f"| cumulative regret (uniform split: {bandit['uniform_regret']:.0f}) | "
        f"{bandit['regret_median']:.1f} | p90 {bandit['regret_p90']:.1f} |\n"
        f"| regret relative to the uniform split | {bandit['regret_ratio_median']:.3f} | |\n\n")
    pattern = re.compile(r"## Experiments\n.*?(?=\n## |\Z)", re.S)
    marker = "<!-- experiments-e2e -->"
    kept = ""
    old = pattern.search(text)
    if old is not None and marker in old.group(0):
        kept = old.group(0)[old.group(0).index(marker):].rstrip() + "\n"
    new = section + kept
    text = pattern.sub(lambda _: new.rstrip() + "\n", text) if old else \
        text.rstrip() + "\n\n" + new
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="A/B tests per row")
    parser.add_argument("--bandit-runs", type=int, default=100)
    parser.add_argument("--feedbacks", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=100, help="feedbacks per weight push")
    parser.add_argument("--floor", type=float, default=0.05)
    parser.add_argument("--record", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    with Progress(console=console) as progress:
        ab = bench_ab(args.runs, progress)
        bandit = bench_bandit(args.bandit_runs, args.feedbacks, args.batch, args.floor, progress)
    for table in _tables(ab, bandit):
        console.print(table)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "experiments.json").write_text(json.dumps({"ab": ab, "bandit": bandit}, indent=2))
    if args.record:
        _record(ab, bandit)


if __name__ == "__main__":
    main()
