"""Turn validation failures of documents into one precise, human sentence per problem.

Every document edgeserve reads (manifests, profiles, MQTT payloads, reports) goes through
:func:`validate`, so all of them report errors the same way: where (file or topic), which key, what
was found and what was expected.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from ._doc import Document, ValidationError
from .errors import SchemaError

__all__ = ["describe_validation_error", "validate", "validate_json"]

M = TypeVar("M", bound=Document)

_MAX_PROBLEMS = 5


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(document)"


def _found(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def describe_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem: ``where: key 'a.b': found X, expected Y``."""
    lines = []
    for problem in err.errors(include_url=False)[:_MAX_PROBLEMS]:
        key = _key_path(tuple(problem["loc"]))
        expected = problem["msg"]
        if problem["type"] == "missing":
            lines.append(f"{where}: key '{key}' is missing (required)")
        elif problem["type"] == "extra_forbidden":
            lines.append(f"{where}: key '{key}' is not allowed here (unknown key; check spelling)")
        elif problem["type"] == "value_error":  # a check across keys: its own sentence
            lines.append(f"{where}: {expected}" if not problem["loc"]
                         else f"{where}: key '{key}': {expected}")
        elif "input" in problem:
            found = _found(problem["input"])
            lines.append(f"{where}: key '{key}': found {found}, expected {expected}")
        else:
            lines.append(f"{where}: key '{key}': expected {expected}")
    extra = err.error_count() - _MAX_PROBLEMS
    if extra > 0:
        lines.append(f"{where}: ... and {extra} more problem(s)")
    return "\n".join(lines)


def validate(
    model: type[M], data: Any, where: str, error: type[SchemaError] | Any = SchemaError
) -> M:
    """Validate already-parsed data against ``model``; raise ``error`` with a precise message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(describe_validation_error(exc, where)) from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise error(f"{where}: cannot be validated: {exc}") from None


def validate_json(
    model: type[M],
    raw: bytes | str,
    where: str,
    error: type[SchemaError] | Any = SchemaError,
    max_bytes: int | None = None,
) -> M:
    """Parse and validate JSON text; size, encoding and syntax errors all become ``error``."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise error(f"{where}: {len(raw)} bytes, larger than the limit of {max_bytes} bytes")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(p["type"] == "json_invalid" for p in exc.errors(include_url=False)):
            raise error(f"{where}: not valid JSON: {_json_reason(raw)}") from None
        raise error(describe_validation_error(exc, where)) from None
    except (RecursionError, ValueError, TypeError, UnicodeError) as exc:
        raise error(f"{where}: cannot be parsed: {exc}") from None


def _json_reason(raw: bytes | str) -> str:
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return str(exc)
    except (RecursionError, ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "not an object of the expected form"
