"""The base of every core document (manifests, profiles, MQTT messages, telemetry sketches).

Documents are ``msgspec`` structs: importing msgspec and defining a struct costs about 1 MB of
RSS, where pydantic cost the agent about 15 MB (docs/benchmarks.md, "Agent footprint"). The
base keeps the small part of the pydantic API the code base uses (``model_validate``,
``model_validate_json``, ``model_dump``, ``model_dump_json``, ``model_copy``,
``model_json_schema``), with pydantic's lax conversions (``"1"`` for an int, a timestamp for a
datetime) and its behaviour on construction: ``Model(field=...)`` validates and converts (nested
dicts become documents) and raises :class:`ValidationError` on bad values.

Validators are ``__post_init__`` methods raising ``ValueError``; constraints are
``msgspec.Meta``. Pydantic models (fleet, converters) may use documents as field types: the
schema pydantic asks for is built on first use, so pydantic is imported only by them.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec
import msgspec.structs

__all__ = ["Document", "ValidationError", "field"]

D = TypeVar("D", bound="Document")
field = msgspec.field

_NO_DEFAULT = msgspec.NODEFAULT


class ValidationError(ValueError):
    """A document did not validate. ``errors()`` lists the problems in pydantic's form: dicts
    with ``type`` (``missing``, ``extra_forbidden``, ``json_invalid``, ``value_error``, or
    ``type_error``), ``loc`` (a tuple of keys and indexes), ``msg`` and, when known, ``input``."""

    def __init__(self, title: str, problems: list[dict[str, Any]]) -> None:
        self.title = title
        self._problems = problems
        first = problems[0] if problems else {"loc": (), "msg": "not valid"}
        where = ".".join(str(p) for p in first["loc"])
        super().__init__(f"{title}: {first['msg']}" + (f" at {where}" if where else ""))

    def errors(self, include_url: bool = False) -> list[dict[str, Any]]:
        return [dict(p) for p in self._problems]

    def error_count(self) -> int:
        return len(self._problems)


# -- per-class field tables -----------------------------------------------------------------------

class _Field:
    __slots__ = ("default", "factory", "name", "wire")

    def __init__(self, name: str, wire: str, default: Any, factory: Any) -> None:
        self.name, self.wire, self.default, self.factory = name, wire, default, factory

    def is_default(self, value: Any) -> bool:
        if self.default is not _NO_DEFAULT:
            return bool(value == self.default)
        if self.factory is not _NO_DEFAULT:
            return bool(value == self.factory())
        return False


_FIELDS: dict[type, tuple[_Field, ...]] = {}
_WIRE_NAMES: dict[type, dict[str, str]] = {}


def _fields(cls: type) -> tuple[_Field, ...]:
    """Fields in declaration order, base classes first (pydantic's order, also on the wire)."""
    table = _FIELDS.get(cls)
    if table is None:
        infos = {f.name: f for f in msgspec.structs.fields(cls)}
        order: list[str] = []
        for klass in reversed(cls.__mro__):
            for name in getattr(klass, "__annotations__", {}):
                if name in infos and name not in order:
                    order.append(name)
        order += [n for n in infos if n not in order]
        table = _FIELDS[cls] = tuple(
            _Field(n, infos[n].encode_name, infos[n].default, infos[n].default_factory)
            for n in order)
    return table


def _wire_names(cls: type) -> dict[str, str]:
    names = _WIRE_NAMES.get(cls)
    if names is None:
        names = _WIRE_NAMES[cls] = {f.name: f.wire for f in _fields(cls) if f.name != f.wire}
    return names


_NESTED = (msgspec.Struct, dict, list, tuple)


def _dump(value: Any, by_alias: bool, exclude_none: bool, exclude_defaults: bool) -> Any:
    """Python-mode dump: documents become dicts, containers are copied, other values kept."""
    if isinstance(value, msgspec.Struct):
        out: dict[str, Any] = {}
        for f in _fields(type(value)):
            item = getattr(value, f.name)
            if (exclude_none and item is None) or (exclude_defaults and f.is_default(item)):
                continue
            out[f.wire if by_alias else f.name] = _dump(item, by_alias, exclude_none,
                                                       exclude_defaults)
        return out
    if isinstance(value, dict):
        return {k: _dump(v, by_alias, exclude_none, exclude_defaults) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if not any(isinstance(v, _NESTED) for v in value):  # numbers, strings: a flat copy
            return value[:]
        items = [_dump(v, by_alias, exclude_none, exclude_defaults) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


_NONE_PLANS: dict[type, tuple[tuple[str, str], ...]] = {}


def _may_hold(tp: Any) -> tuple[bool, bool]:
    """(whether a value of msgspec type ``tp`` may be None, whether it may hold documents)."""
    import msgspec.inspect as mi

    if isinstance(tp, mi.Metadata):  # Annotated[..., Meta(...)]
        return _may_hold(tp.type)
    if isinstance(tp, mi.UnionType):
        kinds = [_may_hold(t) for t in tp.types]
        return any(k[0] for k in kinds), any(k[1] for k in kinds)
    if isinstance(tp, mi.NoneType):
        return True, False
    if isinstance(tp, mi.StructType | mi.DataclassType):
        return False, True
    if isinstance(tp, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        return False, _may_hold(tp.item_type)[1]
    if isinstance(tp, mi.TupleType):
        return False, any(_may_hold(t)[1] for t in tp.item_types)
    if isinstance(tp, mi.DictType):
        return False, _may_hold(tp.value_type)[1]
    if isinstance(tp, mi.LiteralType):
        return None in tp.values, False
    if isinstance(tp, mi.IntType | mi.FloatType | mi.StrType | mi.BoolType | mi.BytesType
                  | mi.DateTimeType | mi.DateType | mi.EnumType):
        return False, False
    return True, True  # a type not told apart here: looked at, as the full walk would


def _none_plan(cls: type) -> tuple[tuple[str, str], ...]:
    """(name, wire name) of the fields of ``cls`` that may be None or hold documents: the only
    ones :func:`_prune_none` has to look at (a window has ~15 fields, ~6 of them such)."""
    plan = _NONE_PLANS.get(cls)
    if plan is None:
        import msgspec.inspect as mi

        info = mi.type_info(cls)
        kinds = {f.name: _may_hold(f.type) for f in info.fields}  # type: ignore[attr-defined]
        plan = _NONE_PLANS[cls] = tuple((f.name, f.wire) for f in _fields(cls)
                                        if any(kinds.get(f.name, (True, True))))
    return plan


def _prune_none(doc: Any, data: dict[str, Any]) -> None:
    """:func:`_prune` for ``exclude_none`` alone, looking only at the fields that matter."""
    for name, wire in _none_plan(type(doc)):
        item = getattr(doc, name)
        if item is None:
            data.pop(wire, None)
        elif isinstance(item, msgspec.Struct):
            _prune_none(item, data[wire])
        elif isinstance(item, list | tuple) and item and isinstance(item[0], msgspec.Struct):
            for element, out in zip(item, data[wire], strict=True):
                _prune_none(element, out)
        elif isinstance(item, dict) and item \
                and isinstance(next(iter(item.values())), msgspec.Struct):
            out = data[wire]
            for key, element in item.items():
                _prune_none(element, out[key])


def _prune(doc: Any, data: dict[str, Any], exclude_none: bool,
           exclude_defaults: bool) -> None:
    """Drop from ``data`` (``doc`` as msgspec.to_builtins made it) the fields of ``doc`` and of
    the documents it holds that are None or at their default."""
    for f in _fields(type(doc)):
        item = getattr(doc, f.name)
        if (exclude_none and item is None) or (exclude_defaults and f.is_default(item)):
            data.pop(f.wire, None)
        elif isinstance(item, msgspec.Struct):
            _prune(item, data[f.wire], exclude_none, exclude_defaults)
        elif isinstance(item, list | tuple) and item and isinstance(item[0], msgspec.Struct):
            for element, out in zip(item, data[f.wire], strict=True):
                _prune(element, out, exclude_none, exclude_defaults)
        elif isinstance(item, dict) and item \
                and isinstance(next(iter(item.values())), msgspec.Struct):
            out = data[f.wire]
            for key, element in item.items():
                _prune(element, out[key], exclude_none, exclude_defaults)


# -- errors: msgspec's one-line message into pydantic's problem form --------------------------------

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<key>key` in `)?(?P<path>\$[^`]*)`)?$", re.S)
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
    "array": "a list", "object": "an object", "null": "null", "datetime": "a date-time",
    "bytes": "base64 bytes",
}
_EXPECTED = re.compile(r"^Expected `([^`]+)`(.*?)(?:, got `([^`]+)`)?$", re.S)


def _words(type_text: str) -> str:
    return " or ".join(_TYPE_WORDS.get(t.strip(), f"`{t.strip()}`") for t in type_text.split("|"))


def _strip(tp: Any) -> Any:
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def _members(tp: Any) -> list[Any]:
    tp = _strip(tp)
    if get_origin(tp) in (Union, types.UnionType):
        return [_strip(a) for a in get_args(tp) if a is not type(None)]
    return [tp]


def _step(tp: Any, segment: str | int) -> Any:
    """The type one path segment down from ``tp`` (None when it cannot be told)."""
    for member in _members(tp):
        origin = get_origin(member)
        if isinstance(member, type) and issubclass(member, msgspec.Struct):
            if isinstance(segment, str):
                hints = typing.get_type_hints(member, include_extras=True)
                for f in _fields(member):
                    if f.wire == segment:
                        return hints.get(f.name)
        elif origin in (list, tuple) and isinstance(segment, int):
            args = get_args(member)
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                return args[segment] if segment < len(args) else None
            return args[0] if args else None
        elif origin is dict and segment == "...":
            return get_args(member)[1]
    return None


def _locate(tp: Any, data: Any, path: str) -> tuple[list[str | int], Any, Any]:
    """Walk ``path`` (``$.a[0][...].b``) through the input and its type: the key path with the
    dict keys msgspec leaves out (``[...]``: the first entry that does not validate), the value
    found there, and its type."""
    loc: list[str | int] = []
    found: Any = data
    for match in _SEGMENT.finditer(path):
        name, index = match.group(1), match.group(2)
        segment: str | int = name if name is not None else (
            "..." if index == "..." else int(index))
        inner = _step(tp, segment) if tp is not None else None
        if segment == "...":
            key = None
            if isinstance(found, dict):
                for k, v in found.items():
                    try:
                        msgspec.convert(v, inner if inner is not None else Any, strict=False)
                    except (msgspec.ValidationError, TypeError):
                        key = k
                        break
            loc.append(key if key is not None else "...")
            found = found.get(key, _MISSING) if isinstance(found, dict) else _MISSING
        else:
            loc.append(segment)
            if isinstance(found, dict) and isinstance(segment, str):
                found = found.get(segment, _MISSING)
            elif isinstance(found, list | tuple) and isinstance(segment, int) \
                    and segment < len(found):
                found = found[segment]
            else:
                found = _MISSING
        tp = inner
    return loc, found, tp


_MISSING: Any = object()


def _literal_values(tp: Any) -> list[Any]:
    values: list[Any] = []
    for member in _members(tp):
        if get_origin(member) is Literal:
            values += list(get_args(member))
    return values


def _problem(cls: type, data: Any, message: str) -> dict[str, Any]:
    match = _AT.match(message)
    assert match is not None  # the pattern matches any text
    msg, path, is_key = match.group("msg"), match.group("path") or "$", match.group("key")
    loc, found, tp = _locate(cls, data, path)
    if is_key:  # a dict key failed: report the first key that does not validate
        key_type = None
        for member in _members(tp):
            if get_origin(member) is dict:
                key_type = get_args(member)[0]
        bad = _MISSING
        if isinstance(found, dict):
            for k in found:
                try:
                    msgspec.convert(k, key_type if key_type is not None else str)
                except (msgspec.ValidationError, TypeError):
                    bad = k
                    break
        loc.append(bad if bad is not _MISSING else "(key)")
        found, tp = bad, key_type
    missing = re.match(r"Object missing required field `(.+)`$", msg)
    if missing:
        return {"type": "missing", "loc": (*loc, missing.group(1)), "msg": "Field required"}
    extra = re.match(r"Object contains unknown field `(.+)`$", msg)
    if extra:
        return {"type": "extra_forbidden", "loc": (*loc, extra.group(1)),
                "msg": "Extra inputs are not permitted"}
    problem: dict[str, Any] = {"loc": tuple(loc)}
    if found is not _MISSING:
        problem["input"] = found
    expected = _EXPECTED.match(msg)
    enum = re.match(r"Invalid enum value (.+)$", msg)
    if expected:
        words = _words(expected.group(1)) + expected.group(2)
        if expected.group(3) and found is _MISSING:
            words += f" (found {_words(expected.group(3))})"
        problem.update(type="type_error", msg=words)
    elif enum:
        allowed = _literal_values(tp)
        problem.update(type="type_error", msg="one of " + ", ".join(map(repr, allowed))
                       if allowed else "one of the allowed values")
    else:  # a validator's ValueError: its own sentence
        problem.update(type="value_error", msg=msg)
    return problem


def _error(cls: type, data: Any, exc: msgspec.ValidationError) -> ValidationError:
    return ValidationError(cls.__name__, [_problem(cls, data, str(exc))])


# -- the base ------------------------------------------------------------------------------------

class _DocumentMeta(msgspec.StructMeta):
    if not TYPE_CHECKING:
        def __new__(mcls, name, bases, namespace, **options):
            """Every document's fields are keyword-only (msgspec applies the option per class),
            so required fields may follow optional ones as in pydantic."""
            options.setdefault("kw_only", True)
            return super().__new__(mcls, name, bases, namespace, **options)

        def __call__(cls, *args, **kwargs):
            """Construct with validation and pydantic's conversions (nested dicts included)."""
            if args:
                raise TypeError(f"{cls.__name__} takes keyword arguments only")
            renames = _wire_names(cls)
            if renames:
                kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
            return cls.model_validate(kwargs)


if TYPE_CHECKING:
    from typing import dataclass_transform

    @dataclass_transform(field_specifiers=(msgspec.field,), frozen_default=True,
                         kw_only_default=True)
    class _Struct:
        """What _DocumentMeta makes of a struct, for type checkers (msgspec.Struct's own
        transform knows nothing of it): every subclass is frozen and keyword-only."""

        def __init_subclass__(cls, **options: Any) -> None: ...
else:
    _Struct = msgspec.Struct


class Document(_Struct, metaclass=_DocumentMeta, forbid_unknown_fields=True, frozen=True,
               kw_only=True):
    """A validated, immutable document (unknown keys refused unless a subclass says otherwise)."""

    @classmethod
    def model_validate(cls: type[D], obj: Any) -> D:
        if type(obj) is cls:
            return obj
        if isinstance(obj, msgspec.Struct):
            obj = _dump(obj, True, False, False)
        try:
            return msgspec.convert(obj, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise _error(cls, obj, exc) from None

    @classmethod
    def model_validate_json(cls: type[D], raw: bytes | bytearray | str) -> D:
        try:
            return msgspec.json.decode(raw, type=cls, strict=False)
        except msgspec.ValidationError as exc:
            try:
                data = msgspec.json.decode(raw)
            except (msgspec.DecodeError, RecursionError):
                data = _MISSING
            raise _error(cls, data, exc) from None
        except msgspec.DecodeError as exc:
            raise ValidationError(cls.__name__, [{"type": "json_invalid", "loc": (),
                                                  "msg": f"Invalid JSON: {exc}"}]) from None

    def model_dump(self, *, mode: Literal["python", "json"] = "python", by_alias: bool = False,
                   exclude_none: bool = False, exclude_defaults: bool = False,
                   exclude: set[str] | None = None) -> dict[str, Any]:
        data: dict[str, Any]
        if mode == "json" and (by_alias or not _wire_names(type(self))):
            # msgspec's encoder does the walk (field order and wire names are the same)
            data = msgspec.to_builtins(self)
            if exclude_none and not exclude_defaults:
                _prune_none(self, data)
            elif exclude_none or exclude_defaults:
                _prune(self, data, exclude_none, exclude_defaults)
            mode = "python"  # already JSON types
        else:
            data = _dump(self, by_alias, exclude_none, exclude_defaults)
        if exclude:
            for name in exclude:
                data.pop(name, None)
        if mode == "json":
            data = msgspec.to_builtins(data)
        return data

    def model_dump_json(self, *, by_alias: bool = False, exclude_none: bool = False,
                        exclude_defaults: bool = False) -> str:
        if not (exclude_none or exclude_defaults) and (by_alias or not _wire_names(type(self))):
            return msgspec.json.encode(self).decode()
        data = self.model_dump(mode="json", by_alias=by_alias, exclude_none=exclude_none,
                               exclude_defaults=exclude_defaults)
        return msgspec.json.encode(data).decode()

    def model_copy(self: D, *, update: dict[str, Any] | None = None, deep: bool = False) -> D:
        """A copy with ``update`` applied (not validated, as pydantic's model_copy)."""
        copied = copy.deepcopy(self) if deep else self
        return msgspec.structs.replace(copied, **(update or {}))  # type: ignore[type-var]

    @classmethod
    def model_json_schema(cls, by_alias: bool = True) -> dict[str, Any]:
        """JSON Schema of the document: its own definition at the top, others in ``$defs``."""
        generated = msgspec.json.schema(cls)
        defs = generated.get("$defs", {})
        schema = dict(defs.pop(cls.__name__, generated))
        if defs:
            schema["$defs"] = defs
        return schema

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """Lets pydantic models (fleet, converters) hold documents as fields."""
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.model_validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda doc: doc.model_dump(mode="json", by_alias=True)))
