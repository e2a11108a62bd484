"""Levers before widths: the planner cuts width only when no allowed lever set fits the full model."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk import BudgetError, ConfigError, SpecError
from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk._units import parse_size
from edge_sdk.scaling import (
    LEVER_NAMES,
    LeverPolicy,
    ParentModel,
    Salience,
    Workload,
    param_count,
    plan_device,
    plan_training,
    relative_step_time,
    training_estimate,
)
from edge_sdk.scaling._lever_choice import LeverChooser, accuracy_cost
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1

from .models import minilm, tiny_model, tiny_parent

WORK = Workload(batch=16, seq=64, steps=10)
RUNTIME = 400_000_000
POLICIES = [
    LeverPolicy(),
    LeverPolicy(forbid=frozenset({"lora"})),
    LeverPolicy(forbid=frozenset({"lora", "frozen_embeddings"})),
    LeverPolicy(pin=(("checkpointing", True),)),
    LeverPolicy(pin=(("lora_rank", 8),)),
    LeverPolicy(forbid=frozenset({"micro_batches", "checkpointing"})),
]


@functools.cache
def ranked_minilm() -> tuple[ParentModel, Salience]:
    parent, salience, _ = reorder(minilm(), weight_l1(minilm()))
    return parent, salience


def with_vocab(parent: ParentModel, work: Workload) -> Workload:
    table = parent.family.word_embedding(parent.task)
    return dataclasses.replace(work, vocab=int(parent.state[table].shape[0])) if table else work


def allowed(parent: ParentModel, policy: LeverPolicy, work: Workload) -> tuple[Levers, ...]:
    """Every lever set the policy allows, enumerated here independently of the planner."""
    table = parent.family.word_embedding(parent.task) is not None
    choices = policy.choices(batch=work.batch, table=table, lora=bool(parent.family.lora_targets))
    return tuple(Levers(**dict(zip(choices, values, strict=True))) for values in itertools.product(*choices.values()))


def peak(parent: ParentModel, spec: SubnetSpec, levers: Levers, work: Workload = WORK, params: int = 0) -> int:
    params = params or param_count(parent, spec)
    return training_estimate(spec, params, with_vocab(parent, work), RUNTIME, levers=levers).total


@pytest.fixture(scope="module")
def full_range() -> tuple[int, int]:
    """MiniLM's budgets from the least any lever set needs for the smallest sub-network to plain training."""
    parent, _ = ranked_minilm()
    full = SubnetSpec.full(parent.dims)
    smallest = SubnetSpec.uniform(parent.dims, heads=1, ffn=32)
    low = min(peak(parent, smallest, lv) for lv in allowed(parent, LeverPolicy(), WORK))
    return low, peak(parent, full, Levers()) + 50_000_000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_never_a_width_cut_when_a_lever_set_fits_the_full_model(
    full_range: tuple[int, int], data: st.DataObject
) -> None:
    parent, salience = ranked_minilm()
    policy = data.draw(st.sampled_from(POLICIES))
    low, high = full_range
    budget = data.draw(st.one_of(st.integers(low, high), st.integers(low - 30_000_000, low + 80_000_000)))
    full = SubnetSpec.full(parent.dims)
    try:
        plan = plan_training(parent, salience, budget, WORK, runtime=RUNTIME, policy=policy)
    except BudgetError as exc:  # nothing fits: the message names what the smallest would need
        needed = re.search(r"needs ([\d.]+ \w+)", str(exc))
        assert needed is not None and parse_size(needed[1].replace(" ", "")) > budget * 0.99
        return
    # the plan fits, by the memory model's own figure for its levers
    assert plan.estimate.total == peak(parent, plan.spec, plan.levers) <= budget
    assert plan.levers in allowed(parent, policy, WORK)
    full_params = param_count(parent, full)
    fitting_full = [lv for lv in allowed(parent, policy, WORK) if peak(parent, full, lv, params=full_params) <= budget]
    assert plan.spec.is_full == bool(fitting_full)  # never a width cut while some lever set fits
    # at its width, no allowed set costs less accuracy, and none of the same cost is faster
    params = param_count(parent, plan.spec)
    fitting = [lv for lv in allowed(parent, policy, WORK) if peak(parent, plan.spec, lv, params=params) <= budget]
    best = min(accuracy_cost(lv) for lv in fitting)
    assert accuracy_cost(plan.levers) == best
    fastest = min(
        relative_step_time(plan.spec, params, with_vocab(parent, WORK), lv)
        for lv in fitting
        if accuracy_cost(lv) == best
    )
    assert plan.step_time == pytest.approx(fastest)
    assert plan.plain is not None and plan.plain.total == peak(parent, plan.spec, Levers())


def test_tiers_in_order_as_the_budget_shrinks() -> None:
    """No-cost levers, then frozen embeddings, then LoRA (largest rank first), then width."""
    parent, salience = ranked_minilm()
    full = SubnetSpec.full(parent.dims)
    plain_full = peak(parent, full, Levers())
    seen: list[tuple[int, ...]] = []
    widths = []
    full_params = param_count(parent, full)
    for budget in range(plain_full + 10_000_000, 500_000_000, -5_000_000):
        plan = plan_training(parent, salience, budget, WORK, runtime=RUNTIME, policy=LeverPolicy())
        seen.append(accuracy_cost(plan.levers))
        widths.append(plan.params)
        if widths.count(full_params) < len(widths) - 3:
            break  # three width cuts: enough
    assert seen[0] == (0,) and (1,) in seen and any(cost[0] == 2 for cost in seen)
    cut = next(i for i, p in enumerate(widths) if p < full_params)
    assert all(p == full_params for p in widths[:cut]) and all(p < full_params for p in widths[cut:])
    ranks = [-cost[1] for cost in seen[:cut] if cost[0] == 2]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) > 1  # the largest rank that fits


def test_without_a_policy_training_is_plain_and_matches_the_plain_policy() -> None:
    parent, salience = ranked_minilm()
    for budget in (1_000_000_000, 1_300_000_000):
        plain = plan_training(parent, salience, budget, WORK, runtime=RUNTIME)
        forbidden = plan_training(parent, salience, budget, WORK, runtime=RUNTIME, policy=LeverPolicy.plain())
        assert plain.levers == forbidden.levers == Levers()
        assert plain.spec == forbidden.spec and plain.estimate == forbidden.estimate
        assert plain.plain == plain.estimate and plain.step_time == 1.0


def test_plan_device_passes_the_policy_and_serves_at_least_what_it_trains() -> None:
    parent, salience = ranked_minilm()
    plans = plan_device(
        parent,
        salience,
        usable=700_000_000,
        train=WORK,
        infer=Workload(1, 128),
        runtime_footprint=RUNTIME,
        policy=LeverPolicy(),
    )
    assert plans.training.spec.is_full and not plans.training.levers.is_plain
    assert plans.inference.spec.covers(plans.training.spec)


def test_pinned_and_forbidden_levers_are_obeyed() -> None:
    parent, salience = tiny_ranked()
    work = Workload(batch=8, seq=16, steps=2)
    budget = 10**10
    pinned = plan_training(
        parent,
        salience,
        budget,
        work,
        runtime=0,
        policy=LeverPolicy(pin=(("checkpointing", True), ("micro_batches", 4))),
    )
    assert pinned.levers.checkpointing and pinned.levers.micro_batches == 4
    every = frozenset(LEVER_NAMES)
    for name in LEVER_NAMES:
        policy = LeverPolicy(forbid=every - {name})
        tight = min(peak(parent, SubnetSpec.full(parent.dims), lv, work) for lv in allowed(parent, policy, work))
        plan = plan_training(parent, salience, tight + RUNTIME, work, runtime=RUNTIME, policy=policy)
        others = Levers()
        for field, value in dataclasses.asdict(plan.levers).items():
            if getattr(others, field) != value:
                assert {
                    "micro_batches": "micro_batches",
                    "checkpointing": "checkpointing",
                    "lora_rank": "lora",
                    "attention": "sdpa",
                    "embeddings": "embedding_rows" if value == "rows" else "frozen_embeddings",
                }[field] == name


def tiny_ranked() -> tuple[ParentModel, Salience]:
    parent = tiny_parent("bert")
    reordered, salience, _ = reorder(parent, weight_l1(parent))
    return reordered, salience


# ------------------------------------------------------------------------------------ bad input


def test_lora_for_a_family_without_a_target_map_is_a_clear_error() -> None:
    parent, salience = tiny_ranked()
    bare = dataclasses.replace(parent, family=dataclasses.replace(parent.family, lora_targets=()))
    with pytest.raises(SpecError, match="LoRA does not apply to the bert family: it has no LoRA target map"):
        plan_training(bare, salience, 10**10, WORK, policy=LeverPolicy(pin=(("lora_rank", 8),)))
    plan = plan_training(bare, salience, 10**10, WORK, policy=LeverPolicy())  # merely allowed: not used
    assert plan.levers.lora_rank == 0


def test_embedding_levers_need_a_token_table() -> None:
    vit = tiny_parent("vit")
    with pytest.raises(SpecError, match="has no token-embedding table"):
        plan_training(vit, weight_l1(vit), 10**10, WORK, policy=LeverPolicy(pin=(("embeddings", "frozen"),)))
    chooser = LeverChooser(vit, WORK, 0, LeverPolicy())
    assert {lv.embeddings for lv in chooser.candidates} == {"train"}
    assert max(lv.lora_rank for lv in chooser.candidates) == 64  # ViT has linears for LoRA


def test_a_budget_no_lever_meets_names_what_it_would_need() -> None:
    parent, salience = tiny_ranked()
    with pytest.raises(BudgetError) as info:
        plan_training(parent, salience, RUNTIME, WORK, runtime=RUNTIME, policy=LeverPolicy())
    message = str(info.value)
    assert "not even with every lever the policy allows" in message
    # the least memory any allowed lever set needs at the smallest width, named
    assert re.search(r"the smallest sub-network \(1 head, 1 FFN block a layer\) with [A-Za-z0-9 ,-]+ needs", message)
    assert re.search(r"needs \d", message)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"forbid": frozenset({"lora", "dropout"})}, "cannot forbid unknown lever(s) ['dropout']"),
        ({"pin": (("rank", 8),)}, "cannot pin unknown field(s) ['rank']"),
        ({"pin": (("lora_rank", -1),)}, "bad pinned value: levers: lora_rank must be an integer"),
        ({"pin": (("lora_rank", 8),), "forbid": frozenset({"lora"})}, "['lora'] both pinned and forbidden"),
        ({"lora_ranks": (0,)}, "lora_ranks must be integers in 1..4096"),
        ({"max_micro_batches": 0}, "max_micro_batches must be an integer in 1..1024"),
    ],
)
def test_bad_policies_are_named(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        LeverPolicy(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_policy_round_trips_and_parses_command_line_pins() -> None:
    policy = LeverPolicy.from_dict({"forbid": ["lora"], "pin": {"checkpointing": True}, "lora_ranks": [8, 16]})
    assert policy.lora_ranks == (16, 8) and policy.pinned == {"checkpointing": True}
    assert LeverPolicy.from_dict(policy.to_dict()) == policy
    assert LeverPolicy.from_cli(["lora"], ["checkpointing=on"]) == LeverPolicy.from_dict(
        {"forbid": ["lora"], "pin": {"checkpointing": True}}
    )
    assert LeverPolicy.from_cli(pins=["micro_batches=4", "embeddings=rows"]).pinned == {
        "micro_batches": 4,
        "embeddings": "rows",
    }
    for bad, fragment in (
        ("lora_rank=x", "is an integer"),
        ("checkpointing=maybe", "true or false"),
        ("x", "FIELD=VALUE"),
    ):
        with pytest.raises(ConfigError, match=fragment):
            LeverPolicy.from_cli(pins=[bad])
    with pytest.raises(ConfigError, match="unknown key"):
        LeverPolicy.from_dict({"forbidden": []})
    with pytest.raises(SpecError, match="8 micro-batches cannot split a batch of 4"):
        LeverChooser(tiny_parent("bert"), Workload(4, 8), 0, LeverPolicy(pin=(("micro_batches", 8),)))


# ------------------------------------------------------------------------------- families, time


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "vit"])
def test_family_lora_targets_are_linears_and_tables_are_embeddings(family: str) -> None:
    import torch

    model, parent = tiny_model(family), tiny_parent(family)
    modules = dict(model.named_modules())
    targets = [n for n in parent.state if parent.family.lora_target(n, parent.task)]
    assert len(targets) == 6 * 3  # six linears in each of 3 layers
    assert all(isinstance(modules[n.removesuffix(".weight")], torch.nn.Linear) for n in targets)
    table = parent.family.word_embedding(parent.task)
    if table is None:
        assert family == "vit"
    else:
        assert isinstance(modules[table.removesuffix(".weight")], torch.nn.Embedding)


def test_step_time_model() -> None:
    parent = minilm()
    full = SubnetSpec.full(parent.dims)
    params, work = param_count(parent, full), with_vocab(parent, WORK)
    checkpointed = relative_step_time(full, params, work, Levers(checkpointing=True))
    assert 1.3 < checkpointed < 1.36  # about one more forward of three passes
    assert 1.0 < relative_step_time(full, params, work, Levers(micro_batches=4)) < 1.1
    assert relative_step_time(full, params, work, Levers(lora_rank=8)) < 0.8  # no weight gradients
    assert relative_step_time(full, params, work, Levers(embeddings="rows")) < 1.0  # smaller optimizer step


@given(
    micro=st.sampled_from([1, 2, 16]),
    ckpt=st.booleans(),
    embeddings=st.sampled_from(["train", "rows", "frozen"]),
    rank=st.sampled_from([0, 4, 64]),
    attention=st.sampled_from(["eager", "sdpa"]),
)
@settings(max_examples=40, deadline=None)
def test_a_lever_description_reads_back_as_the_same_levers(
    micro: int, ckpt: bool, embeddings: str, rank: int, attention: str
) -> None:
    levers = Levers(micro_batches=micro, checkpointing=ckpt, embeddings=embeddings, lora_rank=rank, attention=attention)
    assert Levers.parse(levers.describe()) == levers
    with pytest.raises(SpecError, match="cannot read"):
        Levers.parse("checkpointing, warp drive")
