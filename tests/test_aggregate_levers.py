"""Aggregating lever-shaped updates (row-trained embeddings, LoRA factors, frozen tensors), by hand."""

from __future__ import annotations

import pytest
import torch

from coordinator.federation._aggregate import (
    ClientUpdate,
    FedAdam,
    SharedProtection,
    aggregate,
    merge_deltas,
    shared_tensors,
    width_fraction,
)
from coordinator.federation._updates import check_update, weights_from_delta
from edge_sdk import AggregationError, ConfigError
from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import extract
from edge_sdk.scaling._parent import ParentModel

from .models import tiny_parent

EMB = "bert.embeddings.word_embeddings.weight"  # [50, 32]
Q = "bert.encoder.layer.0.attention.self.query.weight"  # [32, 32]: rows are 4 heads x 8 dims
QB = "bert.encoder.layer.0.attention.self.query.bias"
LN = "bert.encoder.layer.0.output.LayerNorm.weight"  # [32], shared by every width
UP = "bert.encoder.layer.0.intermediate.dense.weight"  # [48, 32]


def zero_parent() -> ParentModel:
    parent = tiny_parent("bert")
    return parent.with_state({n: torch.zeros_like(t) if t.is_floating_point() else t for n, t in parent.state.items()})


def dense(parent: ParentModel, spec: SubnetSpec, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(t, value) if t.is_floating_point() else t for k, t in extract(parent, spec).items()}


def lora_factors(parent: ParentModel, spec: SubnetSpec, rank: int) -> dict[str, torch.Tensor]:
    """Zero factors of rank ``rank`` for every LoRA target of ``spec`` (B = 0: a zero delta)."""
    out = {}
    for name, t in extract(parent, spec).items():
        if name.endswith(".weight") and parent.family.lora_target(name, parent.task):
            out[name + "@lora_A"] = torch.zeros(rank, t.shape[1])
            out[name + "@lora_B"] = torch.zeros(t.shape[0], rank)
    return out


def rows_update(parent: ParentModel, spec: SubnetSpec, rows: list[int], value: float) -> dict[str, torch.Tensor]:
    weights = dense(parent, spec, 0.0)
    weights[EMB] = torch.full((len(rows), 32), value)
    weights[EMB + "@rows"] = torch.tensor(rows, dtype=torch.int64)
    return weights


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_deltas_of_two_widths_and_ranks_merge_per_coordinate_with_a_dense_device() -> None:
    parent = zero_parent()
    quarter, half, full = (SubnetSpec.from_ratio(parent.dims, r) for r in (0.25, 0.5, 1.0))
    # a: 1 head (Q rows 0..7), rank 1: B A = 2 everywhere on its rows
    a = lora_factors(parent, quarter, 1)
    a[Q + "@lora_A"] = torch.ones(1, 32)
    a[Q + "@lora_B"] = torch.full((8, 1), 2.0)
    # b: 2 heads (Q rows 0..15), rank 2 (of 4 planned): B A = 4 + [column 0]
    b = lora_factors(parent, half, 2)
    b[Q + "@lora_A"] = torch.stack([torch.ones(32), torch.nn.functional.one_hot(torch.tensor(0), 32).float()])
    b[Q + "@lora_B"] = torch.stack([torch.full((16,), 4.0), torch.ones(16)], dim=1)
    b[LN] = torch.full((32,), 9.0)  # a LoRA device may train a LayerNorm: it travels dense
    # c: the full model, trained densely to 1.0
    updates = [
        ClientUpdate(quarter, a, 1, Levers(lora_rank=1)),
        ClientUpdate(half, b, 3, Levers(lora_rank=4)),
        ClientUpdate(full, dense(parent, full, 1.0), 4),
    ]
    delta, coverage = merge_deltas(parent, updates)
    q = delta[Q]
    assert q[0, 1] == pytest.approx((1 * 2 + 3 * 4 + 4 * 1) / 8)  # 2.25: all three cover rows 0..7
    assert q[0, 0] == pytest.approx((1 * 2 + 3 * 5 + 4 * 1) / 8)  # 2.625
    assert q[8, 1] == pytest.approx((3 * 4 + 4 * 1) / 7)  # 16/7: b and c cover rows 8..15
    assert q[8, 0] == pytest.approx((3 * 5 + 4 * 1) / 7)  # 19/7
    assert q[16, 0] == pytest.approx(1.0) and coverage[Q][16, 0] == 4  # only c covers rows 16..31
    assert (coverage[Q][:8] == 8).all() and (coverage[Q][8:16] == 7).all()
    # LoRA devices froze Q's bias (absent): only c covers it
    assert coverage[QB][0] == 4 and delta[QB][0] == pytest.approx(1.0)
    # the LayerNorm: b (dense, 9) and c (1); a froze it
    assert delta[LN][0] == pytest.approx((3 * 9 + 4 * 1) / 7) and coverage[LN][0] == 7
    merged = aggregate(parent, updates)
    torch.testing.assert_close(merged.state[Q], q)


def test_lora_alone_leaves_what_it_did_not_train() -> None:
    parent = tiny_parent("bert")
    half = SubnetSpec.from_ratio(parent.dims, 0.5)
    factors = lora_factors(parent, half, 2)
    factors[Q + "@lora_A"] = torch.ones(2, 32)
    factors[Q + "@lora_B"] = torch.full((16, 2), 0.5)  # B A = 1.0 on rows 0..15
    merged = aggregate(parent, [ClientUpdate(half, factors, 5, Levers(lora_rank=2))])
    torch.testing.assert_close(merged.state[Q][:16], parent.state[Q][:16] + 1.0)
    assert torch.equal(merged.state[Q][16:], parent.state[Q][16:])
    for name in (QB, LN, EMB, "classifier.weight"):
        assert torch.equal(merged.state[name], parent.state[name]), name


# ------------------------------------------------------------------------------------ embedding rows


def test_rows_are_averaged_only_over_the_devices_that_changed_them() -> None:
    parent = zero_parent()
    full = SubnetSpec.full(parent.dims)
    rows = Levers(embeddings="rows")
    a = ClientUpdate(full, rows_update(parent, full, [1, 3], 2.0), 1, rows)
    b = ClientUpdate(full, rows_update(parent, full, [3, 7], 6.0), 3, rows)
    delta, coverage = merge_deltas(parent, [a, b])
    assert delta[EMB][1, 0] == pytest.approx(2.0)  # only a changed row 1
    assert delta[EMB][3, 0] == pytest.approx((1 * 2 + 3 * 6) / 4)  # 5.0: both
    assert delta[EMB][7, 0] == pytest.approx(6.0)  # only b
    assert coverage[EMB][[1, 3, 7], 0].tolist() == [1.0, 4.0, 3.0]
    untouched = [r for r in range(50) if r not in (1, 3, 7)]
    assert (coverage[EMB][untouched] == 0).all() and (delta[EMB][untouched] == 0).all()
    # with a device that trained the whole table densely to 1.0 (n = 4)
    c = ClientUpdate(full, dense(parent, full, 1.0), 4)
    delta, _ = merge_deltas(parent, [a, b, c])
    assert delta[EMB][0, 0] == pytest.approx(1.0)
    assert delta[EMB][1, 0] == pytest.approx((2 + 4) / 5)
    assert delta[EMB][3, 0] == pytest.approx((2 + 18 + 4) / 8)
    assert delta[EMB][7, 0] == pytest.approx((18 + 4) / 7)


def test_fedadam_moments_move_only_on_covered_rows_and_regions() -> None:
    parent = zero_parent()
    full, quarter = SubnetSpec.full(parent.dims), SubnetSpec.from_ratio(parent.dims, 0.25)
    rows = ClientUpdate(full, rows_update(parent, full, [4], 3.5), 2, Levers(embeddings="rows"))
    factors = lora_factors(parent, quarter, 1)
    factors[Q + "@lora_A"] = torch.ones(1, 32)
    factors[Q + "@lora_B"] = torch.full((8, 1), 3.5)
    lora = ClientUpdate(quarter, factors, 2, Levers(lora_rank=1, embeddings="frozen"))
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    stepped = aggregate(parent, [rows, lora], opt)
    # delta 3.5: m = 0.35, v = 0.1225, step = 0.1 * 0.35 / (0.35 + 1e-3)
    step = 0.1 * 0.35 / (0.35 + 1e-3)
    assert stepped.state[EMB][4, 0] == pytest.approx(step, rel=1e-5)
    assert opt.m[EMB][4, 0] == pytest.approx(0.35) and opt.v[EMB][4, 0] == pytest.approx(0.1225)
    others = torch.ones(50, dtype=torch.bool)
    others[4] = False
    assert opt.m[EMB][others].abs().sum() == 0 and opt.v[EMB][others].abs().sum() == 0
    assert stepped.state[EMB][others].abs().sum() == 0
    # Q rows 0..7: the LoRA device's 3.5 and the rows device's dense 0 (it trained Q too): delta 1.75
    assert stepped.state[Q][0, 0] == pytest.approx(0.1 * 0.175 / (0.175 + 1e-3), rel=1e-5)
    assert opt.v[Q][0, 0] == pytest.approx(0.01 * 1.75**2)
    assert opt.m[Q][8:].abs().sum() == 0 and stepped.state[Q][8:].abs().sum() == 0
    assert opt.m[QB].abs().sum() == 0  # the LoRA device froze the bias; the rows device trained it by 0
    assert stepped.state[QB].abs().sum() == 0


# ------------------------------------------------------------------------------ shared tensors


def test_shared_tensors_are_those_every_width_trains_whole() -> None:
    parent = tiny_parent("bert")
    shared = shared_tensors(parent)
    for name in (
        EMB,
        LN,
        "bert.pooler.dense.weight",
        "classifier.weight",
        "bert.embeddings.LayerNorm.bias",
        "bert.encoder.layer.2.attention.output.dense.bias",
    ):
        assert name in shared, name
    for name in (Q, QB, UP, "bert.encoder.layer.0.output.dense.weight"):
        assert name not in shared, name
    assert width_fraction(parent, SubnetSpec.full(parent.dims)) == 1.0
    assert width_fraction(parent, SubnetSpec.from_ratio(parent.dims, 0.5)) == pytest.approx(0.5)
    one_layer = SubnetSpec.uniform(parent.dims, heads=4, ffn=48, layers=[0])
    assert width_fraction(parent, one_layer) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("protection", "expected"),
    [
        (SharedProtection(), (1 * 2 + 3 * 4) / 4),  # 3.5, today's behaviour
        (SharedProtection("min_width", 0.5), 4.0),  # only the half-width device
        (SharedProtection("width_weighted"), (0.25 * 1 * 2 + 0.5 * 3 * 4) / (0.25 * 1 + 0.5 * 3)),  # 26/7
    ],
)
def test_shared_tensors_may_be_protected_from_narrow_updates(protection: SharedProtection, expected: float) -> None:
    parent = zero_parent()
    quarter, half = SubnetSpec.from_ratio(parent.dims, 0.25), SubnetSpec.from_ratio(parent.dims, 0.5)
    a = ClientUpdate(quarter, dense(parent, quarter, 2.0), 1)
    b = ClientUpdate(half, dense(parent, half, 4.0), 3)
    delta, _ = merge_deltas(parent, [a, b], shared=protection)
    assert delta[LN][0] == pytest.approx(expected)
    assert delta["classifier.weight"][0, 0] == pytest.approx(expected)
    assert delta[Q][0, 0] == pytest.approx(3.5)  # sliced tensors: never protected
    if protection.mode == "min_width":  # no wide enough device: shared tensors keep their value
        narrow_only = aggregate(parent, [a], shared=protection)
        assert torch.equal(narrow_only.state[LN], parent.state[LN])
        assert narrow_only.state[Q][0, 0] == pytest.approx(2.0)


def test_bad_protection_is_named() -> None:
    with pytest.raises(ConfigError, match="must be one of"):
        SharedProtection("sometimes")
    with pytest.raises(ConfigError, match="min_width must be in"):
        SharedProtection("min_width", 1.5)


# ------------------------------------------------------------------------------------ the checker


def _refused(update: ClientUpdate, fragment: str, parent: ParentModel | None = None, **kwargs: float) -> None:
    parent = parent or tiny_parent("bert")
    before = {n: t.clone() for n, t in parent.state.items()}
    with pytest.raises(AggregationError) as info:
        aggregate(parent, [update], **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value), str(info.value)
    assert all(torch.equal(before[n], parent.state[n]) for n in before)


def test_row_updates_are_checked() -> None:
    parent = tiny_parent("bert")
    full = SubnetSpec.full(parent.dims)
    rows = Levers(embeddings="rows")

    def bad(index: list[int], dtype: torch.dtype = torch.int64) -> ClientUpdate:
        weights = rows_update(parent, full, [0] * len(index), 1.0)
        weights[EMB + "@rows"] = torch.tensor(index, dtype=dtype)
        return ClientUpdate(full, weights, 1, rows)

    _refused(bad([3, 1]), "row indices must be sorted and unique")
    _refused(bad([1, 1]), "row indices must be sorted and unique")
    _refused(bad([1, 50]), "row indices outside 0..49")
    _refused(bad([-1, 2]), "row indices outside 0..49")
    _refused(bad([1, 2], torch.int32), "expected int64 [n]")
    short = rows_update(parent, full, [1, 2], 1.0)
    short[EMB] = short[EMB][:1]
    _refused(ClientUpdate(full, short, 1, rows), "row values [1, 32], expected [2, 32] floats")
    _refused(ClientUpdate(full, rows_update(parent, full, [1], 1.0), 1), "with embeddings='rows'")
    no_index = rows_update(parent, full, [1], 1.0)
    del no_index[EMB + "@rows"]
    _refused(ClientUpdate(full, no_index, 1, rows), f"missing {EMB} and {EMB}@rows")
    ln_rows = dense(parent, full, 0.0)
    ln_rows[LN + "@rows"] = torch.tensor([0])
    _refused(ClientUpdate(full, ln_rows, 1, rows), "row updates are for the embedding table")
    nan = rows_update(parent, full, [1], float("nan"))
    _refused(ClientUpdate(full, nan, 1, rows), f"{EMB}: non-finite values")


def test_lora_updates_are_checked() -> None:
    parent = tiny_parent("bert")
    half = SubnetSpec.from_ratio(parent.dims, 0.5)
    lora = Levers(lora_rank=2)
    too_high = lora_factors(parent, half, 3)
    _refused(ClientUpdate(half, too_high, 1, lora), f"{Q}@lora_A: rank 3 is outside 1..2 (the planned rank)")
    wrong = lora_factors(parent, half, 2)
    wrong[Q + "@lora_B"] = torch.zeros(32, 2)  # the full width's rows, not the sub-network's 16
    expected = f"{Q}: LoRA factors A [2, 32] and B [32, 2], expected [2, 32] and [16, 2]"
    _refused(ClientUpdate(half, wrong, 1, lora), expected)
    missing = lora_factors(parent, half, 2)
    del missing[UP + "@lora_B"]
    _refused(ClientUpdate(half, missing, 1, lora), f"missing {UP}@lora_A and {UP}@lora_B")
    both = {**lora_factors(parent, half, 2), Q: extract(parent, half)[Q]}
    _refused(ClientUpdate(half, both, 1, lora), "a LoRA target came back dense")
    _refused(ClientUpdate(half, lora_factors(parent, half, 2), 1), "LoRA factors, but the task trains without LoRA")
    on_ln = {**lora_factors(parent, half, 2), LN + "@lora_A": torch.zeros(1, 1), LN + "@lora_B": torch.zeros(1, 1)}
    _refused(ClientUpdate(half, on_ln, 1, lora), "it is not a LoRA target")
    huge = lora_factors(parent, half, 2)
    huge[Q + "@lora_A"] = torch.full((2, 32), 1e30)
    huge[Q + "@lora_B"] = torch.full((16, 2), 1e30)  # finite factors, infinite product
    _refused(ClientUpdate(half, huge, 1, lora), f"{Q}: non-finite values")
    big = lora_factors(parent, half, 2)
    big[Q + "@lora_A"] = torch.ones(2, 32)
    big[Q + "@lora_B"] = torch.full((16, 2), 3.0)
    _refused(ClientUpdate(half, big, 1, lora), f"{Q}: a delta of 6 exceeds 5", max_abs=5.0)
    assert check_update(parent, ClientUpdate(half, big, 1, lora), max_abs=6.0)


def test_frozen_tables_and_tables_that_do_not_exist() -> None:
    parent = tiny_parent("bert")
    full = SubnetSpec.full(parent.dims)
    frozen = Levers(embeddings="frozen")
    _refused(ClientUpdate(full, dense(parent, full, 0.0), 1, frozen), "the embedding table is frozen")
    without = {n: t for n, t in dense(parent, full, 0.0).items() if n != EMB}
    assert {c.name for c in check_update(parent, ClientUpdate(full, without, 1, frozen))} >= {LN, Q}
    _refused(ClientUpdate(full, without, 1), f"missing {EMB}")
    vit = tiny_parent("vit")
    vit_full = SubnetSpec.full(vit.dims)
    _refused(ClientUpdate(vit_full, dense(vit, vit_full, 0.0), 1, frozen), "has no token-embedding table", parent=vit)


def test_weights_from_delta_handles_rows_and_factors() -> None:
    sent = {EMB: torch.arange(6.0).reshape(3, 2), LN: torch.ones(2), "ids": torch.arange(3)}
    received = {
        EMB: torch.full((1, 2), 10.0),
        EMB + "@rows": torch.tensor([2]),
        LN: torch.full((2,), 0.5),
        "ids": torch.arange(3),
        Q + "@lora_A": torch.ones(1, 2),
        Q + "@lora_B": torch.ones(2, 1),
    }
    out = weights_from_delta(sent, received)
    assert out[EMB].tolist() == [[14.0, 15.0]] and out[LN].tolist() == [1.5, 1.5]
    assert out[EMB + "@rows"] is received[EMB + "@rows"] and out[Q + "@lora_A"] is received[Q + "@lora_A"]
    assert torch.equal(out["ids"], sent["ids"])


def test_width_fraction_counts_kv_groups_and_a_gated_ffn_by_their_elements() -> None:
    """Tiny Llama: hidden 32, 4 query heads of 8 in 2 KV groups, gated FFN 48. Per layer q and o hold
    32*32 each, k and v 32*16 each, gate/up/down 32*48 each: 7680. One KV group (2 heads) with the
    whole FFN keeps q, o 512 each, k, v 256 each, and 4608: 6144 / 7680 = 0.8 (counting K/V as wide as
    Q and a two-matrix FFN would say 5120 / 7168)."""
    parent = tiny_parent("llama")
    assert width_fraction(parent, SubnetSpec.uniform(parent.dims, heads=2, ffn=48)) == pytest.approx(0.8)
    assert width_fraction(parent, SubnetSpec.full(parent.dims)) == 1.0
