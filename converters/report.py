"""The conversion report: ``report.json`` (schema ``edgeserve.convert-report/1``), ``report.md``
and the rich table printed at the end of ``edgeserve convert``.

``report.json`` lists each artifact with at least ``id``, ``format``, ``precision``,
``quantization``, ``size_bytes``, ``size_ratio`` (to the fp32 reference), ``profiles``,
``required_by`` and ``validation`` = {``status``, ``max_abs_error``, ``cosine_similarity``
(vector outputs), ``range_error`` and ``decision_agreement`` (scalar and sigmoid outputs),
``top1_agreement`` (classifiers), ``accuracy`` (with labels), ``outputs`` (each output's kind
and figures), ``gated_by`` (the metrics the verdict used), ``latency_ms_p50``,
``latency_ratio``, ``sample_max_abs_error``, ``reasons`` …}, plus one entry per profile with its
status (:data:`PROFILE_STATUSES`), the artifacts that ship for it (``ships``), the fallbacks used
and the reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from edgeserve.console import format_bytes

__all__ = ["PROFILE_STATUSES", "REPORT_SCHEMA", "render_markdown", "render_table"]

REPORT_SCHEMA = "edgeserve.convert-report/1"
_STYLE = {"passed": "green", "warned": "yellow", "failed": "red", "not-executed": "cyan"}
PROFILE_STATUSES = ("passed", "warned", "not-executed", "fallback", "failed")
"""A profile's status: its required artifacts' worst, ``fallback`` when a declared fallback ships
in place of one, ``failed`` when a required artifact failed with no fallback that passed."""


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _status_text(validation: Mapping[str, Any]) -> str:
    status = str(validation.get("status", "failed"))
    return "not executed (needs macOS)" if status == "not-executed" else status


def _not_built(artifact: Mapping[str, Any]) -> bool:
    return str(artifact.get("error") or "").startswith("not built")


def _row(artifact: Mapping[str, Any]) -> list[str]:
    v = artifact.get("validation", {})
    size = artifact.get("size_bytes")
    return [
        artifact["id"], ", ".join(artifact.get("profiles", [])),
        "-" if not size else f"{format_bytes(size)} ({_ratio(artifact.get('size_ratio'))})",
        "-" if v.get("latency_ms_p50") is None
        else f"{v['latency_ms_p50']:.3f} ({_ratio(v.get('latency_ratio'))})",
        _num(v.get("max_abs_error"), ".3g"), _closeness(v), _agreement(v),
        _num(v.get("accuracy"), ".4f"),
        "not built" if _not_built(artifact) else _status_text(v),
    ]


def _closeness(v: Mapping[str, Any]) -> str:
    """Cosine for vector outputs; else the error over the output's range ('r …')."""
    if v.get("cosine_similarity") is not None:
        return _num(v.get("cosine_similarity"), ".5f")
    return "-" if v.get("range_error") is None else f"r {v['range_error']:.2g}"


def _agreement(v: Mapping[str, Any]) -> str:
    """Top-1 for classifiers; else decisions at 0.5 of sigmoid outputs ('d …')."""
    if v.get("top1_agreement") is not None:
        return _num(v.get("top1_agreement"), ".4f")
    return "-" if v.get("decision_agreement") is None else f"d {v['decision_agreement']:.4f}"


_COLUMNS = ["artifact", "profiles", "size (× fp32)", "p50 ms (× fp32)", "max err",
            "cosine / range err", "top-1 / decisions", "accuracy", "verdict"]


def render_table(report: Mapping[str, Any]) -> Table:
    """The artifact table people see at the end of ``edgeserve convert``."""
    model = report["model"]
    table = Table(title=f"{model['name']} {model['version']}: artifacts", title_justify="left",
                  header_style="bold")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold")
    for artifact in report["artifacts"]:
        cells = _row(artifact)
        style = "yellow" if _not_built(artifact) else \
            _STYLE.get(str(artifact.get("validation", {}).get("status")), "red")
        cells[-1] = f"[{style}]{cells[-1]}[/]"
        table.add_row(*cells)
    return table


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the same facts as the table, plus reasons, notes and profile verdicts."""
    model = report["model"]
    lines = [f"# {model['name']} {model['version']} (release {model['release']})", "",
             f"Source: {model['source']['framework']} `{model['source'].get('filename') or '-'}` "
             f"(sha256 `{model['source']['sha256'][:16]}…`), task: {model['task']}.", "",
             f"Calibration: {report['data']['calibration']}. Evaluation: "
             f"{report['data']['evaluation']}.", ""]
    notes = report["data"].get("notes") or []
    if notes:
        lines += [*(f"- {n}" for n in notes), ""]
    lines += ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_row(a)) + " |" for a in report["artifacts"]]
    lines += ["", "## Profiles", ""]
    for name, profile in report["profiles"].items():
        why = "; ".join(profile.get("reasons", []))
        lines.append(f"- **{name}**: {profile['status']}" + (f" — {why}" if why else ""))
    details = [a for a in report["artifacts"]
               if a.get("validation", {}).get("reasons") or a.get("notes") or a.get("error")]
    if details:
        lines += ["", "## Details", ""]
        for artifact in details:
            v = artifact.get("validation", {})
            items = [*(artifact.get("notes") or []), *(v.get("reasons") or [])]
            if artifact.get("error"):
                items.insert(0, f"error: {artifact['error']}")
            lines.append(f"- `{artifact['id']}`: " + "; ".join(items))
    return "\n".join(lines) + "\n"
