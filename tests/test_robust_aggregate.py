"""Robust aggregation (clip, weight cap, trimmed mean, median), coverage-aware, with numbers worked by hand."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from coordinator.federation import AggregationRule, parse_config
from coordinator.federation._aggregate import ClientUpdate, aggregate, merge_deltas, merge_round
from coordinator.federation._robust import capped_weights, clip_scales, trim_counts
from coordinator.simulation._config import parse_simulation_config
from edge_sdk import ConfigError
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import extract
from edge_sdk.scaling._parent import ParentModel

from .models import tiny_parent
from .test_aggregate import filled, zero_parent
from .test_run_config import BASE, with_value

Q = "bert.encoder.layer.0.attention.self.query.weight"  # [32, 32]: rows are 4 heads x 8 dims
OFF = AggregationRule(rule="mean", trim=0.0, clip="off", weight_cap=0.0)


def covered_count(parent: ParentModel, spec: SubnetSpec) -> int:
    return sum(t.numel() for t in extract(parent, spec).values() if t.is_floating_point())


def test_clip_bound_is_clip_factor_times_the_median_norm() -> None:
    rule = AggregationRule(rule="mean", clip="median", clip_factor=2.0)
    # median 3, bound 6: only the last is scaled, to 6 / 100
    assert clip_scales([1.0, 2.0, 3.0, 4.0, 100.0], rule) == pytest.approx([1, 1, 1, 1, 0.06])
    assert clip_scales([5.0], rule) == [1.0]  # a lone device is its own median
    assert clip_scales([1.0, 100.0], rule) == [1.0, 1.0]  # two: the bound 2 x 50.5 is above both
    assert clip_scales([1.0, 2.0, 100.0], AggregationRule(clip="off")) == [1.0, 1.0, 1.0]


def test_norms_are_over_what_each_device_covered_and_the_outlier_is_scaled_down() -> None:
    parent = zero_parent()
    full, half = SubnetSpec.full(parent.dims), SubnetSpec.from_ratio(parent.dims, 0.5)
    updates = [filled(parent, full, 1.0, 1), filled(parent, half, 1.0, 1), filled(parent, full, 10.0, 1)]
    merged = merge_round(parent, updates, rule=AggregationRule(rule="mean", clip="median", weight_cap=0.0))
    n_full, n_half = covered_count(parent, full), covered_count(parent, half)
    assert n_half < n_full
    assert merged.norms == pytest.approx([math.sqrt(n_full), math.sqrt(n_half), 10 * math.sqrt(n_full)])
    # median norm sqrt(n_full), bound 2 sqrt(n_full): the third is scaled by 0.2, to values of 2
    assert merged.scales == pytest.approx([1.0, 1.0, 0.2])
    # head 0 of Q is covered by all three: (1 + 1 + 2) / 3; head 3 by the two full ones: (1 + 2) / 2
    assert merged.delta[Q][0, 0] == pytest.approx(4 / 3)
    assert merged.delta[Q][31, 0] == pytest.approx(1.5)


def test_sample_weights_are_capped_at_weight_cap_times_the_median() -> None:
    assert capped_weights([1, 1, 100], AggregationRule(weight_cap=2.0)) == [1.0, 1.0, 2.0]
    assert capped_weights([10, 20, 30, 40], AggregationRule(weight_cap=2.0)) == [10.0, 20.0, 30.0, 40.0]
    assert capped_weights([1, 1, 100], AggregationRule(weight_cap=0.0)) == [1.0, 1.0, 100.0]
    parent = zero_parent()
    full = SubnetSpec.full(parent.dims)
    updates = [filled(parent, full, 0.0, 1), filled(parent, full, 0.0, 1), filled(parent, full, 4.0, 100)]
    capped = AggregationRule(rule="mean", clip="off", weight_cap=2.0)
    delta, coverage = merge_deltas(parent, updates, rule=capped)
    assert delta[Q][0, 0] == pytest.approx(2.0)  # (1*0 + 1*0 + 2*4) / (1 + 1 + 2)
    assert coverage[Q][0, 0] == pytest.approx(4.0)
    assert merge_deltas(parent, updates, rule=OFF)[0][Q][0, 0] == pytest.approx(400 / 102)


@pytest.mark.parametrize(
    ("trim", "expected"), [(0.2, [0, 0, 0, 1, 1, 1, 2]), (0.0, [0] * 7), (0.4, [0, 0, 0, 1, 1, 2, 4])]
)
def test_trim_counts_drop_at_least_one_from_each_end_when_three_cover(trim: float, expected: list[int]) -> None:
    covering = torch.tensor([0, 1, 2, 3, 4, 5, 10])
    assert trim_counts(covering, trim).tolist() == expected


def three_widths(parent: ParentModel, samples: tuple[int, int, int] = (1, 1, 1)) -> list[ClientUpdate]:
    """A full (value 1), a half (2) and a quarter (9) device: Q's head 0 is covered by 3 of them,
    head 1 by 2 (full, half), heads 2-3 by 1 (full)."""
    dims = parent.dims
    return [
        filled(parent, SubnetSpec.full(dims), 1.0, samples[0]),
        filled(parent, SubnetSpec.from_ratio(dims, 0.5), 2.0, samples[1]),
        filled(parent, SubnetSpec.from_ratio(dims, 0.25), 9.0, samples[2]),
    ]


@pytest.mark.parametrize(
    ("rule", "samples", "heads"),
    [
        # head 0: drop 1 and 9, keep 2; head 1: (1 + 2) / 2; heads 2-3: the full device alone
        ("trimmed_mean", (1, 1, 1), (2.0, 1.5, 1.0)),
        ("trimmed_mean", (3, 1, 1), (2.0, 1.25, 1.0)),  # weighted: (3*1 + 1*2) / 4
        ("median", (1, 1, 1), (2.0, 1.5, 1.0)),
        ("median", (3, 1, 1), (2.0, 1.5, 1.0)),  # unweighted: the mean of the two middle values
        ("mean", (1, 1, 1), (4.0, 1.5, 1.0)),  # (1 + 2 + 9) / 3
    ],
)
def test_rules_per_coordinate_with_partial_coverage(rule: str, samples: tuple[int, int, int], heads: tuple) -> None:  # type: ignore[type-arg]
    parent = zero_parent()
    robust = AggregationRule(rule=rule, trim=0.2 if rule == "trimmed_mean" else 0.0, clip="off", weight_cap=0.0)
    delta, coverage = merge_deltas(parent, three_widths(parent, samples), rule=robust)
    for head, value in zip((0, 1, 2, 3), (*heads, heads[2]), strict=True):
        block = delta[Q][8 * head : 8 * head + 8]
        torch.testing.assert_close(block, torch.full_like(block, value), msg=f"{rule} head {head}")
    assert coverage[Q][0, 0] == sum(samples) and coverage[Q][16, 0] == samples[0]


def test_median_of_five_and_uncovered_coordinates_stay() -> None:
    parent = tiny_parent("bert")
    half = SubnetSpec.from_ratio(parent.dims, 0.5)
    values = (5.0, -1.0, 2.0, 100.0, 3.0)
    updates = [
        ClientUpdate(half, {k: t + v if t.is_floating_point() else t for k, t in extract(parent, half).items()}, 1)
        for v in values
    ]
    merged = aggregate(parent, updates, rule=AggregationRule(rule="median", clip="off"))
    torch.testing.assert_close(merged.state[Q][:16], parent.state[Q][:16] + 3.0)
    assert torch.equal(merged.state[Q][16:], parent.state[Q][16:])
    # trimmed mean of five at 0.2: drop -1 and 100, mean of 2, 3, 5
    trimmed = aggregate(parent, updates, rule=AggregationRule(rule="trimmed_mean", trim=0.2, clip="off"))
    torch.testing.assert_close(trimmed.state[Q][:16], parent.state[Q][:16] + 10 / 3)


def test_trimmed_mean_with_trim_0_is_the_weighted_mean() -> None:
    parent = tiny_parent("bert")
    torch.manual_seed(1)
    specs = [SubnetSpec.full(parent.dims), SubnetSpec.from_ratio(parent.dims, 0.5)] * 2
    updates = [
        ClientUpdate(
            s, {k: t + torch.randn_like(t) if t.is_floating_point() else t for k, t in extract(parent, s).items()}, n
        )
        for s, n in zip(specs, (3, 1, 4, 1), strict=True)
    ]
    trimmed = merge_deltas(
        parent, updates, rule=AggregationRule(rule="trimmed_mean", trim=0.0, clip="off", weight_cap=0)
    )
    mean = merge_deltas(parent, updates)
    for name in mean[0]:
        torch.testing.assert_close(trimmed[0][name], mean[0][name], msg=name)


def honest_and_attacker(parent: ParentModel, attack: str) -> tuple[list[ClientUpdate], dict[str, torch.Tensor]]:
    """Four honest devices (a shared direction h plus noise) and one attacker; the honest mean delta."""
    full = SubnetSpec.full(parent.dims)
    base = {k: t for k, t in extract(parent, full).items() if t.is_floating_point()}
    gen = torch.Generator().manual_seed(7)
    h = {k: torch.randn(t.shape, generator=gen) * 0.01 for k, t in base.items()}
    honest = [{k: h[k] + 0.5 * torch.randn(t.shape, generator=gen) * 0.01 for k, t in base.items()} for _ in range(4)]
    mean = {k: sum(d[k] for d in honest) / 4 for k in base}
    attacker, samples = {k: -h[k] for k in base}, 100
    if attack in ("negated", "both"):
        attacker = {k: -10.0 * h[k] for k in base}
    if attack in ("samples", "both"):
        samples = 1_000_000

    def update(delta: dict[str, torch.Tensor], n: int) -> ClientUpdate:
        weights = {k: (t + delta[k] if k in delta else t) for k, t in extract(parent, full).items()}
        return ClientUpdate(full, weights, n)

    return [update(d, 100) for d in honest] + [update(attacker, samples)], mean


def distance(delta: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((delta[k] - mean[k]).pow(2).sum()) for k in mean))
    return diff / math.sqrt(sum(float(m.pow(2).sum()) for m in mean.values()))


@pytest.mark.parametrize("attack", ["negated", "samples", "both"])
def test_one_attacker_of_five_default_rule_stays_close_to_the_honest_mean(attack: str) -> None:
    parent = tiny_parent("bert")
    updates, honest_mean = honest_and_attacker(parent, attack)
    plain = distance(merge_deltas(parent, updates, rule=AggregationRule.plain())[0], honest_mean)
    robust = distance(merge_deltas(parent, updates, rule=AggregationRule())[0], honest_mean)
    assert plain > 1.0  # the attacker drags the plain mean past the honest update's own size
    assert robust < 0.35, (plain, robust)


def test_a_rule_is_checked() -> None:
    with pytest.raises(ConfigError, match="rule must be one of"):
        AggregationRule(rule="krum")
    with pytest.raises(ConfigError, match="trim must be in"):
        AggregationRule(trim=0.5)
    with pytest.raises(ConfigError, match="weight_cap must be 0"):
        AggregationRule(weight_cap=0.5)


def test_the_aggregation_table_in_a_run_config() -> None:
    assert parse_config(BASE).federation.aggregation == AggregationRule()
    data = copy.deepcopy(BASE)
    data["aggregation"] = {"rule": "median", "clip": "off", "clip_factor": 3.0, "weight_cap": 0}
    assert parse_config(data).federation.aggregation == AggregationRule("median", 0.2, "off", 3.0, 0.0)
    for key, value, message in [
        ("rule", "krum", r"\[aggregation\] rule: must be one of"),
        ("trim", 0.6, r"\[aggregation\] trim: must be <= 0.49"),
        ("clip_factor", 0.5, r"\[aggregation\] clip_factor: must be >= 1"),
        ("weight_cap", 0.5, r"\[aggregation\] weight_cap: must be 0 \(no cap\) or >= 1"),
        ("typo", 1, r"\[aggregation\]: unknown key\(s\) typo"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(with_value("aggregation", key, value))
    with pytest.raises(ConfigError, match=r"\[aggregation\] trim: only applies to rule = 'trimmed_mean'"):
        parse_config({**BASE, "aggregation": {"rule": "median", "trim": 0.1}})


def test_the_aggregation_table_in_a_simulation_config(tmp_path: Path) -> None:
    from .test_simulation import tiny_config

    cfg = parse_simulation_config(tiny_config(tmp_path, aggregation={"rule": "mean", "weight_cap": 3}), base=tmp_path)
    assert cfg.federation.aggregation == AggregationRule(rule="mean", weight_cap=3.0)
    with pytest.raises(ConfigError, match=r"\[aggregation\]: unknown key"):
        parse_simulation_config(tiny_config(tmp_path, aggregation={"rulez": "mean"}), base=tmp_path)
