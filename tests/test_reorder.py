"""Reordering by salience must leave every model's function unchanged (to float rounding)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._build import build_model
from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import Salience, activation_aware, weight_l1

from .models import minilm, tiny_inputs, tiny_parent

FAMILIES = ["bert", "roberta", "distilbert", "vit"]


def logits(parent: ParentModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = build_model(SubnetSpec.full(parent.dims), parent.config, parent.state)
    with torch.no_grad():
        return model(**inputs).logits


def random_salience(parent: ParentModel, seed: int) -> Salience:
    g = torch.Generator().manual_seed(seed)
    d = parent.dims
    return Salience(
        torch.rand(d.num_layers, d.num_heads, generator=g),
        torch.rand(d.num_layers, d.ffn, generator=g),
        "random",
    )


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_reordering_keeps_logits(family: str, seed: int) -> None:
    parent = tiny_parent(family)
    inputs = tiny_inputs(family)
    reordered, _, plan = reorder(parent, random_salience(parent, seed))
    # the permutation really moved weights (a no-op would pass trivially)
    assert any(not torch.equal(parent.state[n], reordered.state[n]) for n in parent.state)
    assert any(not torch.equal(order.ffn, torch.arange(parent.dims.ffn)) for order in plan.layers)
    torch.testing.assert_close(logits(reordered, inputs), logits(parent, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_salience_scores_are_sorted_after_reordering(family: str) -> None:
    parent = tiny_parent(family)
    calib = [tiny_inputs(family, batch=4, seed=s) for s in range(2)]
    for score in (weight_l1(parent), activation_aware(parent, calib)):
        reordered, sorted_scores, _ = reorder(parent, score)
        again = weight_l1(reordered) if score.method == "weight_l1" else activation_aware(reordered, calib)
        torch.testing.assert_close(again.heads, sorted_scores.heads, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(again.ffn, sorted_scores.ffn, rtol=1e-4, atol=1e-6)
        assert bool((again.ffn[:, :-1] >= again.ffn[:, 1:] - 1e-6).all())


def test_activation_salience_ignores_padding() -> None:
    parent = tiny_parent("bert")
    batch = tiny_inputs("bert", batch=2)
    padded = dict(batch)
    padded["input_ids"] = batch["input_ids"].clone()
    padded["input_ids"][0, -3:] = 7  # different tokens under the mask
    a, b = activation_aware(parent, [batch]), activation_aware(parent, [padded])
    torch.testing.assert_close(a.ffn, b.ffn)


@pytest.mark.slow
def test_real_minilm_reordering_keeps_logits() -> None:
    parent = minilm()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 30000, (3, 24), generator=g),
        "attention_mask": torch.ones(3, 24, dtype=torch.long),
    }
    reordered, _, _ = reorder(parent, weight_l1(parent))
    torch.testing.assert_close(logits(reordered, inputs), logits(parent, inputs), atol=1e-5, rtol=0)
    reordered, _, _ = reorder(parent, activation_aware(parent, [inputs]))
    torch.testing.assert_close(logits(reordered, inputs), logits(parent, inputs), atol=1e-5, rtol=0)
