"""The planner counts the copy a device keeps of what it trains in place when its update travels as
deltas (``Workload.keeps_received``): the device's rule (``TaskRunner._as_received``) names the
tensors; the memory model must count the same elements."""

from __future__ import annotations

import dataclasses

import pytest

from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import extract, param_count
from edge_sdk.scaling._memory import Workload, reference_params, training_estimate, workload_for

from .models import tiny_parent


def copied_elements(parent, spec: SubnetSpec, levers: Levers) -> int:  # type: ignore[no-untyped-def]
    """Elements the device copies: every float tensor but the LoRA targets (under LoRA) and the token
    table (frozen or row-trained), as ``TaskRunner._as_received`` decides."""
    family, task = parent.family, parent.task
    table = family.word_embedding(task)
    total = 0
    for name, tensor in extract(parent, spec).items():
        frozen = (levers.lora_rank and family.lora_target(name, task)) or (
            name == table and levers.embeddings != "train"
        )
        if tensor.is_floating_point() and not frozen:
            total += tensor.numel()
    return total


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize(
    "levers", [Levers(), Levers(lora_rank=4), Levers(embeddings="frozen"), Levers(lora_rank=2, embeddings="frozen")]
)
def test_the_reference_copy_counts_what_the_device_copies(family: str, levers: Levers) -> None:
    parent = tiny_parent(family)
    spec = SubnetSpec.full(parent.dims)
    params = param_count(parent, spec)
    vocab = int(parent.state[parent.family.word_embedding(parent.task)].shape[0])
    work = workload_for(parent, Workload(2, 16, vocab=vocab, keeps_received=True))
    assert reference_params(spec, params, work, levers) == copied_elements(parent, spec, levers)
    without = dataclasses.replace(work, keeps_received=False)
    assert reference_params(spec, params, without, levers) == 0
    extra = (
        training_estimate(spec, params, work, levers=levers).total
        - training_estimate(spec, params, without, levers=levers).total
    )
    assert extra == 4 * copied_elements(parent, spec, levers)
