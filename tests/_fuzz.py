"""Seeded mutations of real protocol frames, for the fuzz test (``tests/test_fuzz.py``) and
``bench/fuzz.py``. No I/O here: ``tests/_fuzz_live.py`` sends what this builds to a live coordinator.

A control message is mutated as a JSON tree, then written by :func:`dump`, which passes :class:`Raw`
leaves through verbatim, so a mutation can put in what a well-behaved JSON writer never writes:
``1e309`` (infinity once parsed), ``NaN``, ``10**400``, ``"\\ud800"`` (a lone surrogate), nesting
deeper than any parser's stack. Text and binary frames are also mutated as bytes (truncation,
bit flips, splices); sequences of frames are cut, doubled and reordered (:func:`mutate_transfer`).
Every choice comes from the ``random.Random`` passed in: a seed replays a run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_sdk.protocol import (
    Bye,
    DeployResult,
    Error,
    EvalResult,
    encode_message,
)


@dataclasses.dataclass(frozen=True)
class Raw:
    """A JSON token written as is (it need not be valid JSON)."""

    text: str


# Values a careless or hostile device may send where a number, a string or anything else belongs.
SPECIAL_NUMBERS = (
    "1e309",
    "-1e309",
    "1E400",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "-0.0",
    "1e-400",
    "0.1e1",
    str(10**309),
    str(10**400),
    str(-(10**400)),
    str(2**53 + 1),
    str(2**63),
    str(2**64 + 1),
    "9" * 5000,
    "123456789012345678901234567890.5",
)
SPECIAL_STRINGS = (
    '"\\ud800"',
    '"x\\udfff"',
    '"\\udc00\\ud800"',
    '"\\ud800\\u0041"',
    '"\\ud83d\\ude00"',  # a valid pair: one astral character
    '"\\u0000"',
    '""',
    '"\\u00e9\\u4e2d\\ud83d\\ude00"',
    json.dumps("\u00e9" * 3000, ensure_ascii=False),
    json.dumps("x" * 70_000),
    '"bad \\escape"',
)
TYPE_SWAPS: tuple[Any, ...] = (None, True, False, 0, -1, 1, 1.5, "", "x", [], {}, [1, "a"], {"a": 1}, [[[]]])
TEXT_JUNK = (
    "",
    "{",
    "}",
    "[]",
    "null",
    "1",
    '"x"',
    "{}",
    '{"type":"bye"}',
    '{"v":1}',
    '{"type":"hello","v":1}',
    '{"type":null,"v":1}',
    '{"type":"bye","v":1,"type":"bye"}',
    "\x00\x01\x02",
    "\ufeff{}",
    "[" * 100_000,
    '{"a":' * 5_000 + "1" + "}" * 5_000,
)
OTHER_TYPES = ("hello", "welcome", "train_task", "evaluate_task", "deploy", "update", "eval_result",
               "deploy_result", "error", "bye", "gossip", "", "HELLO")  # fmt: skip


def dump(value: Any) -> str:
    """JSON text of ``value``, with :class:`Raw` leaves written verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indices) to a value inside ``value``, containers included."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        out.append((*prefix, key))
        out.extend(_paths(item, (*prefix, key)))
    return out


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


def _deep(rng: random.Random) -> Raw:
    depth = rng.choice((30, 65, 200, 1000, 20_000))
    opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
    return Raw(opener * depth + "1" + closer * depth)


def _replacement(rng: random.Random) -> Any:
    kind = rng.randrange(5)
    if kind == 0:
        return Raw(rng.choice(SPECIAL_NUMBERS))
    if kind == 1:
        return Raw(rng.choice(SPECIAL_STRINGS))
    if kind == 2:  # a copy: a later mutation may insert into it (a shared one would end up holding itself)
        return copy.deepcopy(rng.choice(TYPE_SWAPS))
    if kind == 3:
        return _deep(rng)
    return rng.choice(
        (rng.randrange(-(2**31), 2**31), rng.random() * 10 ** rng.randrange(-5, 30), rng.randbytes(8).hex())
    )


def mutate_tree(tree: dict[str, Any], rng: random.Random) -> None:
    """One structural mutation of a decoded message, in place."""
    paths = _paths(tree)
    op = rng.randrange(7)
    if op == 0 and paths:  # delete a field or an item
        path = rng.choice(paths)
        del _parent(tree, path)[path[-1]]
    elif op in (1, 2) and paths:  # replace a value (a number or string where anything belongs)
        path = rng.choice(paths)
        _parent(tree, path)[path[-1]] = _replacement(rng)
    elif op == 3:  # an unknown field, or a special key
        key = rng.choice(("extra", "\ud800", "type ", "__proto__", "x" * 300))
        containers = [tree] + [_parent(tree, p)[p[-1]] for p in paths if isinstance(_parent(tree, p)[p[-1]], dict)]
        rng.choice(containers)[key] = _replacement(rng)
    elif op == 4:
        tree["type"] = rng.choice(OTHER_TYPES)
    elif op == 5:
        tree["v"] = rng.choice((0, 2, -1, "1", 1.0, None, Raw("1e309"), Raw(str(10**400)), True))
    else:  # a numeric field gets an extreme value
        numeric = [p for p in paths if isinstance(_parent(tree, p)[p[-1]], (int, float))]
        path = rng.choice(numeric or paths or [("v",)])
        _parent(tree, path)[path[-1]] = Raw(rng.choice(SPECIAL_NUMBERS))


def mutate_text(text: str, rng: random.Random) -> str:
    """A mutated control message: its JSON tree changed 1-3 times, sometimes its text too."""
    if rng.random() < 0.06:
        return rng.choice(TEXT_JUNK)
    try:
        tree = _thaw(json.loads(text))
    except ValueError:
        tree = {"type": "bye", "v": 1}
    if not isinstance(tree, dict):
        tree = {"value": tree}
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutate_tree(tree, rng)
    out = dump(tree)
    if rng.random() < 0.15:
        out = _splice_text(out, rng)
    return out


def _splice_text(text: str, rng: random.Random) -> str:
    op = rng.randrange(5)
    at = rng.randrange(len(text) + 1)
    if op == 0:
        return text[:at]  # truncated
    if op == 1:
        return text[:at] + rng.choice('{}[]",:\\ 0e-') + text[at:]
    if op == 2:
        return text[:at] + text[at + 1 :]
    if op == 3 and text.endswith("}"):
        return text[:-1] + ',"type":"bye"}'  # a duplicate key
    return text + rng.choice(("", " ", "}", "\x00", "garbage"))


def mutate_binary(frame: bytes, rng: random.Random) -> bytes:
    """A mutated chunk frame: bit flips (header or payload), cuts, growth, a forged header."""
    data = bytearray(frame)
    op = rng.randrange(7)
    if op in (0, 1) and data:  # flip 1-8 bits, often in the 24-byte header
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(min(len(data), 24)) if op == 0 else rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    elif op == 2:
        del data[rng.randrange(len(data) + 1) :]
    elif op == 3:
        data += rng.randbytes(rng.choice((1, 100, 4096)))
    elif op == 4 and len(data) >= 24:  # another transfer id, or another index
        if rng.random() < 0.5:
            data[4:20] = rng.randbytes(16)
        else:
            data[20:24] = rng.choice((0, 1, 2, 7, 2**31, 2**32 - 1)).to_bytes(4, "big")
    elif op == 5:
        data[:4] = rng.choice((b"EFC0", b"efc1", b"\x00\x00\x00\x00", b'{"ty'))
    else:
        return rng.choice((b"", b"EF", b"EFC1", rng.randbytes(rng.randrange(1, 64))))
    return bytes(data)


def mutate_transfer(frames: Sequence[str | bytes], rng: random.Random) -> list[str | bytes]:
    """A message and its chunk frames, cut, reordered, doubled or with one frame mutated."""
    seq = list(frames)
    op = rng.randrange(9)
    if op == 0:
        seq[0] = mutate_text(str(seq[0]), rng)
    elif op == 1 and len(seq) > 1:
        at = rng.randrange(1, len(seq))
        seq[at] = mutate_binary(bytes(seq[at]), rng)
    elif op == 2 and len(seq) > 2:
        chunks = seq[1:]
        rng.shuffle(chunks)
        seq = [seq[0], *chunks]
    elif op == 3 and len(seq) > 1:
        del seq[rng.randrange(1, len(seq))]  # a chunk missing: the next text frame comes too early
    elif op == 4 and len(seq) > 1:
        at = rng.randrange(1, len(seq))
        seq.insert(at, seq[at])  # a chunk twice
    elif op == 5:
        seq = [*seq[1:], seq[0]]  # chunks before their manifest
    elif op == 6:
        seq = [seq[0], *seq]  # the message twice
    elif op == 7 and len(seq) > 1:
        seq.insert(rng.randrange(1, len(seq)), rng.choice(("{}", str(seq[0]), '{"type":"bye","v":1}')))
    else:
        seq.append(rng.choice((seq[-1], rng.randbytes(32), str(seq[0]))))
    return seq


# -------------------------------------------------------------------------------- tensor poisons


def poison_tensors(tensors: dict[str, np.ndarray], rng: random.Random) -> str:
    """Change an update's tensors so that they still frame correctly but are wrong; returns what."""
    floats = [n for n, a in tensors.items() if a.dtype.kind == "f"]
    name = rng.choice(floats or list(tensors))
    with np.errstate(over="ignore", invalid="ignore"):
        return _poison(tensors, name, rng)


def _poison(tensors: dict[str, np.ndarray], name: str, rng: random.Random) -> str:
    array = np.array(tensors[name])
    op = rng.randrange(8)
    if op == 0 and array.size:
        array.flat[rng.randrange(array.size)] = rng.choice((np.nan, np.inf, -np.inf))
    elif op == 1:
        array = array * np.float32(rng.choice((-1.9, 1e3, 1e30, -1.0)))
    elif op == 2:
        del tensors[name]
        return f"dropped {name}"
    elif op == 3:
        tensors["extra.weight"] = np.zeros(3, np.float32)
        return "extra tensor"
    elif op == 4:
        array = array.reshape(-1)
    elif op == 5:
        array = array.astype(rng.choice((np.float16, np.float64, np.int32)))
    elif op == 6:
        array = np.zeros_like(array)
    else:
        array = np.full_like(array, np.finfo(np.float32).max)
    tensors[name] = array
    return f"poison {op} on {name}"


# -------------------------------------------------------------------------------- base messages


def device_messages(task_id: str | None, rng: random.Random) -> list[str]:
    """Real device-to-coordinator messages other than Hello and Update (the corpus they mutate)."""
    tid = task_id or rng.choice(("t-unknown", "r1-a", "x"))
    return [
        encode_message(Error(task_id=None, code="task_failed", message=rng.choice(("oom", "\u00e9 \u4e2d", "")))),
        encode_message(Error(task_id=tid, code="task_failed", message="out of memory")),
        encode_message(EvalResult(task_id=tid, num_samples=3, metrics={"accuracy": 0.5})),
        encode_message(DeployResult(task_id=tid, ok=rng.random() < 0.5, metrics={"parity": 1e-6}, message="")),
        encode_message(Bye(reason="going", code=1000)),
    ]


def harmless_message(rng: random.Random) -> str:
    """A valid frame the coordinator logs and carries on after: an Error about no task in particular."""
    message = rng.choice(("warming up", "\u00e9t\u00e9 \u4e2d\u6587 \U0001f600", "x" * rng.randrange(200)))
    return encode_message(Error(task_id=None, code=rng.choice(("note", "task_failed", "busy")), message=message))
