"""Federated LoRA of different ranks on a Llama, by hand: every round each device's B·A is merged into
the weights, coordinate by coordinate over its sub-network's region, weighted by samples
(``coordinator/federation/_aggregate.py``, docs/method.md "LoRA of different ranks")."""

from __future__ import annotations

import pytest
import torch
import transformers

from coordinator.federation._aggregate import ClientUpdate, aggregate
from edge_sdk import AggregationError
from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import extract
from edge_sdk.scaling._parent import ParentModel, parent_from_module

Q = "model.layers.0.self_attn.q_proj.weight"  # [4, 4]: rows are 2 heads x 2 dims
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def small_llama() -> ParentModel:
    """One layer, hidden 4, 2 heads of 2 (and 2 KV heads), FFN 4; q_proj holds 0.0, 0.1, ..., 1.5."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=4,
        num_hidden_layers=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    parent = parent_from_module(transformers.LlamaForCausalLM(config), "causal-lm")
    return parent.with_state({**parent.state, Q: torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10})


def zero_factors(parent: ParentModel, spec: SubnetSpec, rank: int) -> dict[str, torch.Tensor]:
    """Factors of rank ``rank`` with B = 0 (no change) for every LoRA target of ``spec``."""
    out = {}
    for name, t in extract(parent, spec).items():
        if parent.family.lora_target(name, parent.task):
            out[name + "@lora_A"] = torch.ones(rank, t.shape[1])
            out[name + "@lora_B"] = torch.zeros(t.shape[0], rank)
    return out


def test_llamas_seven_linears_are_its_lora_targets() -> None:
    parent = small_llama()
    targets = {n for n in parent.state if parent.family.lora_target(n, parent.task)}
    attention = {f"model.layers.0.self_attn.{t}.weight" for t in TARGETS[:4]}
    ffn = {f"model.layers.0.mlp.{t}.weight" for t in TARGETS[4:]}
    assert targets == attention | ffn


def test_two_ranks_on_two_widths_merge_in_the_space_of_the_product() -> None:
    parent = small_llama()
    half = SubnetSpec.uniform(parent.dims, heads=1, ffn=4)  # Q rows 0..1
    full = SubnetSpec.full(parent.dims)  # Q rows 0..3
    one = zero_factors(parent, half, 1)  # rank 1, 3 samples
    one[Q + "@lora_A"] = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    one[Q + "@lora_B"] = torch.tensor([[1.0], [2.0]])  # B A = [[1, 0, 2, 0], [2, 0, 4, 0]]
    two = zero_factors(parent, full, 2)  # rank 2, 1 sample
    two[Q + "@lora_A"] = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    two[Q + "@lora_B"] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    # B A = [[1, 1, 0, 0], [0, 0, 1, 1], [2, 2, 0, 0], [0, 0, 2, 2]]
    merged = aggregate(
        parent, [ClientUpdate(half, one, 3, Levers(lora_rank=1)), ClientUpdate(full, two, 1, Levers(lora_rank=2))]
    )
    # rows 0-1, both devices: (3 (B A)_1 + 1 (B A)_2) / 4 = [[1, .25, 1.5, 0], [1.5, 0, 3.25, .25]];
    # rows 2-3, the rank-2 device alone: [[2, 2, 0, 0], [0, 0, 2, 2]]; added to 0.0, 0.1, ..., 1.5
    expected = torch.tensor([[1.0, 0.35, 1.7, 0.3], [1.9, 0.5, 3.85, 0.95], [2.8, 2.9, 1.0, 1.1], [1.2, 1.3, 3.4, 3.5]])
    torch.testing.assert_close(merged.state[Q], expected)
    # averaging the factors instead (rank 1 zero-padded to 2) would give row 1 = [1.5, .375, 2.3125, .0625]
    a = (3 * torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 0]]) + two[Q + "@lora_A"]) / 4
    b = (3 * torch.tensor([[1.0, 0], [2, 0]]) + two[Q + "@lora_B"][:2]) / 4
    torch.testing.assert_close((b @ a)[1], torch.tensor([1.5, 0.375, 2.3125, 0.0625]))
    assert not torch.allclose(parent.state[Q][:2] + b @ a, expected[:2])
    # B = 0 elsewhere: the other six targets keep their values; what LoRA froze (the table) too
    for name, tensor in parent.state.items():
        if name != Q and tensor.is_floating_point():
            torch.testing.assert_close(merged.state[name], tensor, msg=name)


def test_a_lora_update_must_bring_all_seven_targets() -> None:
    parent = small_llama()
    full = SubnetSpec.full(parent.dims)
    factors = zero_factors(parent, full, 2)
    gate = "model.layers.0.mlp.gate_proj.weight"
    del factors[gate + "@lora_A"], factors[gate + "@lora_B"]
    with pytest.raises(AggregationError, match=r"missing model\.layers\.0\.mlp\.gate_proj\.weight@lora_A"):
        aggregate(parent, [ClientUpdate(full, factors, 1, Levers(lora_rank=2))])


def test_a_device_trains_adapters_on_the_seven_targets_and_the_rms_norms() -> None:
    from edge_sdk.training._levers import prepare, trained_tensors

    parent = small_llama()
    config = transformers.LlamaConfig(**parent.config)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    names = list(parent.state)
    prepare(model, Levers(lora_rank=2, embeddings="frozen"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    }
    adapters = {n for n in trainable if "lora_" in n}
    assert len(adapters) == 2 * len(TARGETS) and trainable == adapters | norms  # the tied table/head frozen
    out = trained_tensors(model, names)
    assert {n.partition("@")[0] for n in out if "@lora_" in n} == {
        n for n in names if parent.family.lora_target(n, parent.task)
    }
    assert set(out) - {n for n in out if "@lora_" in n} == norms
