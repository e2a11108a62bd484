"""Choosing a device's training levers for one sub-network: cost in accuracy first, then in time.

Every lever set a :class:`~edge_sdk.scaling._policy.LeverPolicy` allows is priced by the memory model
(:func:`~edge_sdk.scaling._memory.training_estimate`) and the step-time model
(:mod:`~edge_sdk.scaling._step_time`). Among the sets that fit a budget, the chosen one is the first by

1. accuracy cost: none (micro-batches, checkpointing, embedding rows, SDPA) < frozen embeddings <
   LoRA, the largest rank first (at one rank, a trained or row-trained table before a frozen one);
2. predicted step time (relative MACs);
3. fewer levers (a lever that buys nothing is not applied), then less memory.

For cutting width, :meth:`LeverChooser.cheapest` gives the least memory any allowed set needs for a
sub-network: the width search runs on that envelope, so it cuts only what no lever set can save.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from edge_sdk._errors import SpecError
from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._memory import MemoryEstimate, Workload, training_estimate, workload_for
from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._policy import LeverPolicy
from edge_sdk.scaling._step_time import step_macs

__all__ = ["Choice", "LeverChooser", "accuracy_cost"]

PLAIN = Levers()


@dataclass(frozen=True)
class Choice:
    """A lever set for one sub-network, its predicted peak and its step's relative compute."""

    levers: Levers
    estimate: MemoryEstimate
    macs: float


def accuracy_cost(levers: Levers) -> tuple[int, ...]:
    """Sort key of a lever set's accuracy cost (smaller is better; see the module docstring)."""
    if levers.lora_rank:
        return (2, -levers.lora_rank, int(levers.embeddings == "frozen"))
    return (int(levers.embeddings == "frozen"),)


def _lever_count(levers: Levers) -> int:
    return sum(
        (
            levers.micro_batches > 1,
            levers.checkpointing,
            levers.embeddings != "train",
            levers.lora_rank > 0,
            levers.attention != "eager",
        )
    )


class LeverChooser:
    """The lever sets ``policy`` allows for ``parent`` at ``work``, priced per sub-network."""

    def __init__(self, parent: ParentModel, work: Workload, runtime: int, policy: LeverPolicy) -> None:
        family, task = parent.family, parent.task
        table = family.word_embedding(task)
        if table is not None and work.vocab == 0:
            work = replace(work, vocab=int(parent.state[table].shape[0]))
        work = workload_for(parent, work)  # a decoder's layout and logits
        self.work, self.runtime, self.policy = work, runtime, policy
        if family.tied_aliases(parent.config, task):  # the output projection reads every row of the table
            if policy.pinned.get("embeddings") == "rows":
                raise SpecError(
                    f"embeddings='rows' does not apply to the {family.name} {task!r} model: its table is tied"
                )
            policy = replace(policy, forbid=policy.forbid | {"embedding_rows"})
        choices = policy.choices(batch=work.batch, table=table is not None, lora=bool(family.lora_targets))
        pinned = policy.pinned
        if pinned.get("lora_rank", 0) > 0:
            family.require_lora()
        if pinned.get("embeddings", "train") != "train" and table is None:
            raise SpecError(
                f"embeddings={pinned['embeddings']!r} does not apply to the {family.name} family's "
                f"{task!r} model: it has no token-embedding table"
            )
        if pinned.get("micro_batches", 1) > work.batch:
            raise SpecError(f"{pinned['micro_batches']} micro-batches cannot split a batch of {work.batch}")
        names = list(choices)
        self.candidates = tuple(
            Levers(**dict(zip(names, values, strict=True))) for values in itertools.product(*choices.values())
        )
        # The memory-minimal sets: the fewest activations (most micro-batches) or none held across
        # micro-batches (one), checkpointing either way, the least trained table, no LoRA or the
        # smallest rank, and SDPA only where it saves memory (without dropout).
        attention = choices["attention"][0]
        if len(choices["attention"]) > 1:
            full = SubnetSpec.full(parent.dims)
            fused = Levers(attention=choices["attention"][-1])
            if training_estimate(full, 0, work, levers=fused).total < training_estimate(full, 0, work).total:
                attention = fused.attention
        self._extremes = tuple(
            Levers(
                micro_batches=k, checkpointing=c, embeddings=choices["embeddings"][-1], lora_rank=r, attention=attention
            )
            for k in dict.fromkeys((choices["micro_batches"][0], choices["micro_batches"][-1]))
            for c in choices["checkpointing"]
            for r in dict.fromkeys((choices["lora_rank"][0], choices["lora_rank"][-1]))
        )

    def price(self, spec: SubnetSpec, params: int, levers: Levers) -> Choice:
        estimate = training_estimate(spec, params, self.work, self.runtime, levers=levers)
        return Choice(levers, estimate, step_macs(spec, params, self.work, levers))

    def best(self, spec: SubnetSpec, params: int, budget: int) -> Choice | None:
        """The first allowed set that fits ``budget`` by the order above; None if none fits."""
        fitting = [c for c in (self.price(spec, params, lv) for lv in self.candidates) if c.estimate.total <= budget]
        if not fitting:
            return None
        return min(
            fitting,
            key=lambda c: (accuracy_cost(c.levers), c.macs, _lever_count(c.levers), c.estimate.total),
        )

    def cheapest(self, spec: SubnetSpec, params: int) -> Choice:
        """The allowed set that needs the least memory for ``spec`` (ties: less accuracy cost, then time)."""
        return min(
            (self.price(spec, params, lv) for lv in self._extremes),
            key=lambda c: (c.estimate.total, accuracy_cost(c.levers), c.macs),
        )
