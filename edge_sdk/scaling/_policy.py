"""Which training levers the planner may use: a policy value (pinned and forbidden levers).

The planner (:func:`~edge_sdk.scaling.plan_training` with ``policy=``) chooses a device's
:class:`~edge_sdk._levers.Levers` among the values a policy allows:

=================  ==========================  ===========================================
lever name         Levers field                values the planner tries (unless pinned)
=================  ==========================  ===========================================
micro_batches      ``micro_batches``           1, 2, 4, 8, ... up to the batch and ``max_micro_batches``
checkpointing      ``checkpointing``           off, on
embedding_rows     ``embeddings="rows"``       (with train) the table trained on its touched rows only
frozen_embeddings  ``embeddings="frozen"``     (with train) the table not trained
lora               ``lora_rank``               0 and each of ``lora_ranks``
sdpa               ``attention="sdpa"``        eager, sdpa
=================  ==========================  ===========================================

``forbid`` names levers the planner must not use (their field keeps its plain value); ``pin`` fixes
fields of :class:`Levers` to a value (``{"checkpointing": True}``, ``{"lora_rank": 8}``), which the
planner then uses for every device. Torch-free: a coordinator config parses it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from edge_sdk._errors import ConfigError, EdgeFMError
from edge_sdk._levers import MAX_LORA_RANK, MAX_MICRO_BATCHES, Levers

__all__ = ["LEVER_NAMES", "LeverPolicy", "add_lever_arguments", "describe_policy", "policy_from_arguments"]

LEVER_NAMES = ("micro_batches", "checkpointing", "embedding_rows", "frozen_embeddings", "lora", "sdpa")
_FIELDS = tuple(f.name for f in fields(Levers))
_PLAIN = Levers()


@dataclass(frozen=True)
class LeverPolicy:
    """What the planner may do beyond cutting width. The default allows every lever."""

    forbid: frozenset[str] = frozenset()
    pin: tuple[tuple[str, Any], ...] = ()  # (Levers field, value) pairs; a mapping is accepted too
    lora_ranks: tuple[int, ...] = (64, 32, 16, 8, 4)  # ranks tried, the largest that fits wins
    max_micro_batches: int = 16

    def __post_init__(self) -> None:
        forbid = frozenset(self.forbid)
        unknown = sorted(str(n) for n in forbid - set(LEVER_NAMES))
        if unknown:
            raise ConfigError(f"levers: cannot forbid unknown lever(s) {unknown}; known: {list(LEVER_NAMES)}")
        object.__setattr__(self, "forbid", forbid)
        pin = tuple(sorted((self.pin.items() if isinstance(self.pin, Mapping) else self.pin), key=lambda kv: kv[0]))
        bad = sorted(str(k) for k, _ in pin if k not in _FIELDS)
        if bad:
            raise ConfigError(f"levers: cannot pin unknown field(s) {bad}; known: {list(_FIELDS)}")
        try:
            pinned = Levers(**dict(pin))
        except EdgeFMError as exc:
            raise ConfigError(f"levers: bad pinned value: {exc}") from None
        object.__setattr__(self, "pin", pin)
        ranks = tuple(sorted(set(self.lora_ranks), reverse=True))
        if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_LORA_RANK for r in ranks):
            raise ConfigError(f"levers: lora_ranks must be integers in 1..{MAX_LORA_RANK}, got {list(self.lora_ranks)}")
        object.__setattr__(self, "lora_ranks", ranks)
        k = self.max_micro_batches
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_MICRO_BATCHES:
            raise ConfigError(f"levers: max_micro_batches must be an integer in 1..{MAX_MICRO_BATCHES}, got {k!r}")
        self._check_conflicts(pinned)

    def _check_conflicts(self, pinned: Levers) -> None:
        pins = self.pinned
        clashes = [
            name
            for name, field, used in (
                ("micro_batches", "micro_batches", pinned.micro_batches > 1),
                ("checkpointing", "checkpointing", pinned.checkpointing),
                ("embedding_rows", "embeddings", pinned.embeddings == "rows"),
                ("frozen_embeddings", "embeddings", pinned.embeddings == "frozen"),
                ("lora", "lora_rank", pinned.lora_rank > 0),
                ("sdpa", "attention", pinned.attention == "sdpa"),
            )
            if name in self.forbid and field in pins and used
        ]
        if clashes:
            raise ConfigError(f"levers: {clashes} both pinned and forbidden")

    # -- reading ------------------------------------------------------------------------------------

    @property
    def pinned(self) -> dict[str, Any]:
        return dict(self.pin)

    @classmethod
    def plain(cls) -> LeverPolicy:
        """No lever at all: plain training, the width search alone."""
        return cls(forbid=frozenset(LEVER_NAMES))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LeverPolicy:
        """Parse ``{"forbid": [...], "pin": {...}, "lora_ranks": [...], "max_micro_batches": k}``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"levers policy must be a table, got {type(data).__name__}")
        known = {"forbid", "pin", "lora_ranks", "max_micro_batches"}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"levers policy: unknown key(s) {unknown}; known: {sorted(known)}")
        forbid, pin = data.get("forbid", ()), data.get("pin", {})
        if isinstance(forbid, str) or not isinstance(forbid, Iterable):
            raise ConfigError(f"levers policy: forbid must be a list of lever names, got {forbid!r}")
        if not isinstance(pin, Mapping):
            raise ConfigError(f"levers policy: pin must be a table of Levers fields, got {pin!r}")
        ranks = data.get("lora_ranks", cls.lora_ranks)
        if isinstance(ranks, str) or not isinstance(ranks, Iterable):
            raise ConfigError(f"levers policy: lora_ranks must be a list of integers, got {ranks!r}")
        return cls(
            forbid=frozenset(forbid),
            pin=tuple(pin.items()),
            lora_ranks=tuple(ranks),
            max_micro_batches=data.get("max_micro_batches", cls.max_micro_batches),
        )

    @classmethod
    def from_cli(cls, forbid: Iterable[str] = (), pins: Iterable[str] = ()) -> LeverPolicy:
        """From command-line values: lever names to forbid, and ``FIELD=VALUE`` pins
        (``checkpointing=true``, ``micro_batches=4``, ``embeddings=frozen``, ``lora_rank=8``)."""
        return cls(forbid=frozenset(forbid), pin=tuple(_parse_pin(text) for text in pins))

    def to_dict(self) -> dict[str, Any]:
        return {
            "forbid": sorted(self.forbid),
            "pin": self.pinned,
            "lora_ranks": list(self.lora_ranks),
            "max_micro_batches": self.max_micro_batches,
        }

    # -- the values the planner tries -----------------------------------------------------------

    def choices(self, *, batch: int, table: bool, lora: bool) -> dict[str, tuple[Any, ...]]:
        """Per Levers field, the values to try for a batch of ``batch`` rows.

        ``table``: the model has a token-embedding table; ``lora``: its family has LoRA targets.
        Pinned values are kept even where they do not apply, so the planner can name the problem.
        """
        pins, off = self.pinned, self.forbid
        ks = [1]
        while ks[-1] * 2 <= min(batch, self.max_micro_batches):
            ks.append(ks[-1] * 2)
        embeddings = ["train"]
        if table:
            modes = (("rows", "embedding_rows"), ("frozen", "frozen_embeddings"))
            embeddings += [mode for mode, name in modes if name not in off]
        found: dict[str, tuple[Any, ...]] = {
            "micro_batches": (1,) if "micro_batches" in off else tuple(ks),
            "checkpointing": (False,) if "checkpointing" in off else (False, True),
            "embeddings": tuple(embeddings),
            "lora_rank": (0,) if "lora" in off or not lora else (0, *self.lora_ranks),
            "attention": ("eager",) if "sdpa" in off else ("eager", "sdpa"),
        }
        for name, value in pins.items():
            found[name] = (value,)
        return found


def _parse_pin(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    if not sep or name not in _FIELDS:
        raise ConfigError(f"levers: a pin is FIELD=VALUE with FIELD one of {list(_FIELDS)}, got {text!r}")
    default = getattr(_PLAIN, name)
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
            raise ConfigError(f"levers: {name} is true or false, got {raw!r}")
        return name, raw.lower() in ("true", "on", "yes", "1")
    if isinstance(default, int):
        try:
            return name, int(raw)
        except ValueError:
            raise ConfigError(f"levers: {name} is an integer, got {raw!r}") from None
    return name, raw


# ------------------------------------------------------------------------------- command lines


def add_lever_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, steps: int = 10) -> None:
    """``--steps``, ``--no-levers``, ``--forbid``, ``--pin``: what a planning command line may use."""
    parser.add_argument(
        "--steps",
        type=int,
        default=steps,
        metavar="N",
        help=f"optimizer steps of a task: bounds the embedding rows it touches (default {steps})",
    )
    parser.add_argument(
        "--no-levers",
        action="store_true",
        help="plan plain training: no micro-batches, checkpointing, embedding, LoRA or SDPA levers",
    )
    parser.add_argument(
        "--forbid",
        action="append",
        default=[],
        choices=LEVER_NAMES,
        metavar="LEVER",
        help=f"a lever the planner must not use (repeatable): {', '.join(LEVER_NAMES)}",
    )
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="fix a lever for every plan (repeatable): checkpointing=true, micro_batches=4, "
        "embeddings=frozen, lora_rank=8, attention=sdpa",
    )


def policy_from_arguments(args: argparse.Namespace) -> LeverPolicy | None:
    """The policy :func:`add_lever_arguments`'s options give; None (plain training) with ``--no-levers``."""
    if args.steps < 0:
        raise ConfigError(f"--steps must not be negative, got {args.steps}")
    if args.no_levers:
        if args.forbid or args.pin:
            raise ConfigError("--no-levers cannot be combined with --forbid or --pin")
        return None
    return LeverPolicy.from_cli(args.forbid, args.pin)


def describe_policy(policy: LeverPolicy | None) -> str:
    """A short description of a policy, for a plan's heading."""
    if policy is None:
        return "none (plain training)"
    parts = [f"forbidden: {', '.join(sorted(policy.forbid))}"] if policy.forbid else []
    parts += [f"{name}={value}" for name, value in policy.pin]
    return "; ".join(parts) or "all allowed"
