"""Wire basics shared by messages and tensors: close codes, strict JSON, typed frozen records.

Strict JSON (:func:`loads_json_object`) bounds everything a peer can put in a value, so no number or
string it sends can break the code that reads it: integers within ``|x| <= 2**53`` (:data:`MAX_JSON_INT`,
the range every JSON reader holds exactly), finite floats (``1e309`` parses as infinity in Python and
is refused like ``NaN``), strings and keys valid Unicode (a ``"\\ud800"`` escape for a lone surrogate
cannot be written as UTF-8, so it is refused), no duplicate keys, bounded nesting.

A :class:`WireRecord` is a frozen, keyword-only dataclass whose fields are checked against their
annotations on construction (from Python or from JSON), so a record that exists is a valid one.
Every fault is a :class:`~edge_sdk.ProtocolError` naming the field (``Update.num_samples: expected an
integer, got string``). JSON payloads that stay opaque here (a device profile, a sub-network spec, a
Hugging Face config) are deep-frozen: objects become read-only mappings and arrays become tuples;
:func:`thaw_json` turns them back into plain ``dict``/``list``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from edge_sdk._errors import EdgeFMError, ProtocolError

__all__ = [
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "MAX_JSON_INT",
    "OPTIONAL_ON_WIRE",
    "WIRE_OPTIONAL",
    "JSONObject",
    "WireRecord",
    "dumps_json",
    "freeze_json",
    "json_type_name",
    "loads_json_object",
    "thaw_json",
]

# Websocket close codes (RFC 6455, section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002  # malformed message, wrong version, out-of-order or corrupt data
CLOSE_UNSUPPORTED_DATA = 1003  # unknown message type, a frame kind not acceptable in this state
CLOSE_POLICY_VIOLATION = 1008  # well-formed but refused: unknown task, wrong manifest, bad values
CLOSE_MESSAGE_TOO_BIG = 1009  # a frame or a transfer above the receiver's limit
CLOSE_INTERNAL_ERROR = 1011  # a bug on this side; the peer did nothing wrong

# A JSON object kept opaque by the protocol (deep-frozen: read-only mappings, tuples for arrays).
JSONObject = Mapping[str, Any]

_MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**53  # the largest magnitude of an integer a peer may send (exact in every JSON reader)
_MAX_INT_DIGITS = len(str(MAX_JSON_INT))
# A \uXXXX escape of a UTF-16 surrogate; only these can decode to a lone surrogate (a valid pair
# decodes to one astral character). Finding one (or a backslash-escaped look-alike) triggers a check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

# Field metadata key: a field added to a record after its protocol version was fixed. It travels only
# when its value differs from its default and decodes to its default when absent, so peers that do not
# know it still exchange every message that does not use it (the version ``v`` stays the same).
# Declare one as ``name: T = dataclasses.field(default=..., metadata=OPTIONAL_ON_WIRE)``.
WIRE_OPTIONAL = "wire_optional"
OPTIONAL_ON_WIRE: Mapping[str, bool] = types.MappingProxyType({WIRE_OPTIONAL: True})

_R = TypeVar("_R", bound="WireRecord")


def json_type_name(value: object) -> str:
    """Name ``value``'s type the way a JSON reader thinks of it (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _fail(path: str, problem: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> ProtocolError:
    return ProtocolError(f"{path}: {problem}", close_code)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"duplicate JSON key {key!r}", CLOSE_PROTOCOL_ERROR)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"non-finite JSON number {name} is not allowed", CLOSE_PROTOCOL_ERROR)


def _bounded_int(text: str) -> int:
    digits = text.lstrip("-")
    value = int(text) if len(digits) <= _MAX_INT_DIGITS else None
    if value is None or abs(value) > MAX_JSON_INT:
        shown = text if len(text) <= 24 else f"{text[:20]}... ({len(digits)} digits)"
        raise ProtocolError(f"integer {shown} is out of range (|x| <= 2**53)", CLOSE_PROTOCOL_ERROR)
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else f"{text[:20]}..."
        raise ProtocolError(f"number {shown} is out of range (not a finite double)", CLOSE_PROTOCOL_ERROR)
    return value


def _check_strings(value: object) -> None:
    """Refuse a string or key holding a lone surrogate (it has no UTF-8 form)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ProtocolError(
                    f"string with a lone surrogate {item[exc.start : exc.end]!r} is not valid Unicode",
                    CLOSE_PROTOCOL_ERROR,
                ) from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads_json_object(data: str | bytes, what: str) -> dict[str, Any]:
    """Parse ``data`` as one JSON object: no duplicate keys, no NaN/Infinity, bounded nesting, numbers in
    range (integers ``|x| <= 2**53``, finite floats), strings valid Unicode (UTF-8 when ``data`` is bytes)."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        if not text.isascii():
            text.encode("utf-8")  # a str may hold lone surrogates (websockets' frames never do)
        obj = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
        if _SURROGATE_ESCAPE.search(text):
            _check_strings(obj)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}", exc.close_code) from None
    except UnicodeError:
        raise ProtocolError(f"{what}: not valid UTF-8", CLOSE_PROTOCOL_ERROR) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"{what}: malformed JSON ({exc})", CLOSE_PROTOCOL_ERROR) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {json_type_name(obj)}", CLOSE_PROTOCOL_ERROR)
    return obj


def dumps_json(obj: Mapping[str, Any]) -> str:
    """Compact ASCII JSON (so its length is its size), refusing NaN/Infinity as the peer would."""
    return json.dumps(thaw_json(obj), ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def freeze_json(value: object, path: str, _depth: int = 0) -> Any:
    """Check ``value`` is a JSON value and return it deep-frozen (mappings read-only, arrays tuples)."""
    if _depth > _MAX_JSON_DEPTH:
        raise _fail(path, f"nested deeper than {_MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise _fail(path, "integer out of range (|x| <= 2**53)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(path, f"non-finite number {value!r} is not allowed")
        return value
    if isinstance(value, (list, tuple)):
        return tuple(freeze_json(item, f"{path}[{i}]", _depth + 1) for i, item in enumerate(value))
    if isinstance(value, Mapping):
        frozen: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(path, f"object keys must be strings, got {type(key).__name__}")
            frozen[key] = freeze_json(item, f"{path}.{key}", _depth + 1)
        return types.MappingProxyType(frozen)
    raise _fail(path, f"not a JSON value: {type(value).__name__}")


def _is_dict_record(ann: Any) -> bool:
    """A plain frozen dataclass that parses and writes itself (``from_dict``/``to_dict``), e.g. Levers."""
    return (
        isinstance(ann, type)
        and dataclasses.is_dataclass(ann)
        and callable(getattr(ann, "from_dict", None))
        and callable(getattr(ann, "to_dict", None))
    )


def thaw_json(value: Any) -> Any:
    """Plain ``dict``/``list`` copy of a frozen JSON value or a :class:`WireRecord`'s JSON form."""
    if value is None or isinstance(value, (str, int, float)):  # most values: no dataclass lookups
        return value
    if isinstance(value, WireRecord):
        return value.to_json()
    if _is_dict_record(type(value)):
        return thaw_json(value.to_dict())
    if isinstance(value, Mapping):
        return {key: thaw_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw_json(item) for item in value]
    return value


# A field's check, compiled once per annotation: (value, path) -> the normalized, frozen value.
Coercer = Callable[[object, str], Any]
_COERCERS: dict[Any, Coercer] = {}
_SCALARS: tuple[type, ...] = (str, bool, int, float)


def _coerce_scalar(value: object, ann: type, path: str) -> Any:
    """A JSON scalar checked against ``str``, ``bool``, ``int`` or ``float`` (finite)."""
    if ann is str and isinstance(value, str):
        return value
    if ann is bool and isinstance(value, bool):
        return value
    if ann is int and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_JSON_INT:
            raise _fail(path, "integer out of range (|x| <= 2**53)")
        return value
    if ann is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise _fail(path, "number out of range") from None
        if not math.isfinite(number):
            raise _fail(path, f"expected a finite number, got {number!r}")
        return number
    expected = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}[ann]
    raise _fail(path, f"expected {expected}, got {json_type_name(value)}")


def _coerce_dict_record(value: object, ann: Any, path: str) -> Any:
    """A value record parsed from a JSON object by its ``from_dict`` (e.g. the training levers)."""
    if isinstance(value, ann):
        return value
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected an object, got {json_type_name(value)}")
    try:
        return ann.from_dict(freeze_json(value, path))
    except EdgeFMError as exc:
        raise _fail(path, str(exc)) from None


def _coercer(ann: Any) -> Coercer:
    """The check of values annotated ``ann`` (compiled on first use, then kept)."""
    found = _COERCERS.get(ann)
    if found is None:
        found = _COERCERS[ann] = _compile(ann)
    return found


def _compile(ann: Any) -> Coercer:
    """Build the check for one annotation; the common case of each kind is a single type test."""
    if ann is Any:
        return freeze_json
    if ann in _SCALARS:
        return _scalar_coercer(ann)
    if isinstance(ann, type) and issubclass(ann, WireRecord):
        record: type[WireRecord] = ann
        return lambda value, path: value if isinstance(value, record) else record.from_json(value, path)
    if _is_dict_record(ann):
        return lambda value, path: _coerce_dict_record(value, ann, path)
    origin, args = get_origin(ann), get_args(ann)
    if origin in (Union, types.UnionType):
        (inner,) = (arg for arg in args if arg is not type(None))
        present = _coercer(inner)
        return lambda value, path: None if value is None else present(value, path)
    if origin is Literal:
        return lambda value, path: _literal(value, args, path)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple_coercer(args[0])
    if origin is Mapping and args and args[0] is str:
        return _mapping_coercer(args[1])
    raise TypeError(f"unsupported field annotation {ann!r}")  # a bug in a record definition


def _scalar_coercer(ann: type) -> Coercer:
    """One exact type test for the common case (an in-range int, a finite float); else the full check."""
    if ann is int:
        return _int
    if ann is float:
        return _float

    def coerce(value: object, path: str) -> Any:
        return value if type(value) is ann else _coerce_scalar(value, ann, path)

    return coerce


def _int(value: object, path: str) -> Any:
    if type(value) is int and -MAX_JSON_INT <= value <= MAX_JSON_INT:
        return value
    return _coerce_scalar(value, int, path)


def _float(value: object, path: str) -> Any:
    if type(value) is float and math.isfinite(value):
        return value
    return _coerce_scalar(value, float, path)


def _literal(value: object, choices: tuple[Any, ...], path: str) -> Any:
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return value
    raise _fail(path, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _tuple_coercer(item_ann: Any) -> Coercer:
    item = _coercer(item_ann)
    exact = item_ann if item_ann in (str, int) else None

    def coerce(value: object, path: str) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise _fail(path, f"expected an array, got {json_type_name(value)}")
        if _all_exact(value, exact):  # shapes, names: no per-item path
            return tuple(value)
        return tuple(item(x, f"{path}[{i}]") for i, x in enumerate(value))

    return coerce


def _all_exact(items: list[Any] | tuple[Any, ...], exact: type | None) -> bool:
    """Every item is exactly a ``str``, or exactly an ``int`` within range (the fast path of arrays)."""
    if exact is None or not all(type(x) is exact for x in items):
        return False
    return exact is str or all(-MAX_JSON_INT <= x <= MAX_JSON_INT for x in items)


def _mapping_coercer(item_ann: Any) -> Coercer:
    item = _coercer(item_ann)

    def coerce(value: object, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise _fail(path, f"expected an object, got {json_type_name(value)}")
        if item_ann is Any:
            return freeze_json(value, path)
        out: dict[str, Any] = {}
        for key, x in value.items():
            if not isinstance(key, str):
                raise _fail(path, f"object keys must be strings, got {type(key).__name__}")
            out[key] = item(x, f"{path}[{key!r}]")
        return types.MappingProxyType(out)

    return coerce


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A record class's fields as its checks need them (built once per class)."""

    coercers: tuple[tuple[str, Coercer], ...]
    names: frozenset[str]
    required: tuple[str, ...]
    absent: Mapping[str, Callable[[], Any]]  # each wire-optional field: what makes its default
    unset: tuple[tuple[str, Any], ...]  # each wire-optional field and its default (left off the wire)


_PLANS: dict[type, _Plan] = {}


def _default_maker(cls: type, field: dataclasses.Field[Any]) -> Callable[[], Any]:
    """What makes a wire-optional field's default (its ``default_factory``, or one returning its ``default``)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory
    if field.default is not dataclasses.MISSING:
        default = field.default
        return lambda: default
    raise TypeError(f"{cls.__name__}.{field.name}: a field optional on the wire needs a default")  # a bug


def _plan(cls: type) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        hints = get_type_hints(cls)
        fields = dataclasses.fields(cls)
        absent = {f.name: _default_maker(cls, f) for f in fields if f.metadata.get(WIRE_OPTIONAL)}
        plan = _PLANS[cls] = _Plan(
            coercers=tuple((f.name, _coercer(hints[f.name])) for f in fields),
            names=frozenset(f.name for f in fields),
            required=tuple(f.name for f in fields if f.name not in absent),
            absent=types.MappingProxyType(absent),
            unset=tuple((name, make()) for name, make in absent.items()),
        )
    return plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class WireRecord:
    """Base of every frozen record that travels as JSON; fields are validated on construction.

    A record's own constraints (ranges, formats, fields that go together) belong in :meth:`_validate`:
    :meth:`from_json` checks each field once and then calls it, without the constructor (so a
    subclass must not override ``__post_init__``).
    """

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field, coerce in _plan(type(self)).coercers:
            object.__setattr__(self, field, coerce(getattr(self, field), f"{name}.{field}"))
        self._validate()

    def _validate(self) -> None:
        """Check constraints across or within fields (ranges, formats); raise ProtocolError."""

    def _invalid(self, field: str, problem: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> ProtocolError:
        return _fail(f"{type(self).__name__}.{field}", problem, close_code)

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON-ready ``dict``/``list`` values (wire-optional fields only when set)."""
        plan = _plan(type(self))
        unset = {field for field, default in plan.unset if getattr(self, field) == default}
        return {field: thaw_json(getattr(self, field)) for field, _ in plan.coercers if field not in unset}

    @classmethod
    def from_json(cls: type[_R], obj: object, path: str | None = None) -> _R:
        """Build the record from a decoded JSON object: exactly the record's fields, each well typed
        (each checked once, under ``path``; then the record's own constraints)."""
        path = path or cls.__name__
        if not isinstance(obj, Mapping):
            raise _fail(path, f"expected an object, got {json_type_name(obj)}")
        plan = _plan(cls)
        missing = [name for name in plan.required if name not in obj]
        unknown = sorted(key for key in obj if key not in plan.names)
        if missing or unknown:
            problems = [f"missing field {name!r}" for name in missing]
            problems += [f"unknown field {name!r}" for name in unknown]
            raise _fail(path, "; ".join(problems))
        record = cls.__new__(cls)  # the checked values go straight in: not checked a second time
        for name, coerce in plan.coercers:  # an absent field is wire-optional: its default, checked alike
            value = obj[name] if name in obj else plan.absent[name]()
            object.__setattr__(record, name, coerce(value, f"{path}.{name}"))
        record._validate()
        return record
