"""Per-coordinate, sample-weighted aggregation of sub-networks, with numbers worked by hand."""

import pytest
import torch

from coordinator.federation._aggregate import ClientUpdate, FedAdam, FedAvg, aggregate, merge_deltas
from edge_sdk import AggregationError
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import extract
from edge_sdk.scaling._parent import ParentModel

from .models import tiny_parent

Q = "bert.encoder.layer.0.attention.self.query.weight"  # [32, 32]: rows are 4 heads x 8 dims
UP = "bert.encoder.layer.0.intermediate.dense.weight"  # [48, 32]: rows are neurons


def zero_parent() -> ParentModel:
    parent = tiny_parent("bert")
    return parent.with_state({n: torch.zeros_like(t) if t.is_floating_point() else t for n, t in parent.state.items()})


def filled(parent: ParentModel, spec: SubnetSpec, value: float, n: int) -> ClientUpdate:
    weights = {k: torch.full_like(t, value) if t.is_floating_point() else t for k, t in extract(parent, spec).items()}
    return ClientUpdate(spec, weights, n)


def floats(parent: ParentModel) -> dict[str, torch.Tensor]:
    return {n: t for n, t in parent.state.items() if t.is_floating_point()}


def test_full_coverage_with_equal_samples_is_plain_fedavg() -> None:
    parent = tiny_parent("bert")
    full = SubnetSpec.full(parent.dims)
    clients = []
    for k in range(3):
        w = {
            n: t + (k + 1) * torch.randn_like(t) if t.is_floating_point() else t
            for n, t in extract(parent, full).items()
        }
        clients.append(ClientUpdate(full, w, 10))
    merged = aggregate(parent, clients)
    for name in floats(parent):
        plain = torch.stack([c.weights[name] for c in clients]).mean(0)
        torch.testing.assert_close(merged.state[name], plain, atol=1e-6, rtol=1e-6)


def test_one_full_and_three_half_clients_all_returning_1_1_give_1_1() -> None:
    # The method's released code divides by the number of clients and gets 0.275 here.
    parent = zero_parent()
    full, half = SubnetSpec.full(parent.dims), SubnetSpec.from_ratio(parent.dims, 0.5)
    updates = [filled(parent, full, 1.1, 5)] + [filled(parent, half, 1.1, 5) for _ in range(3)]
    merged = aggregate(parent, updates)
    for name, tensor in floats(merged).items():
        torch.testing.assert_close(tensor, torch.full_like(tensor, 1.1), msg=name)


def test_uncovered_coordinates_keep_their_value() -> None:
    parent = tiny_parent("bert")
    half = SubnetSpec.from_ratio(parent.dims, 0.5)  # 2 of 4 heads, 24 of 48 neurons
    merged = aggregate(parent, [filled(parent, half, 3.0, 2), filled(parent, half, 5.0, 6)])
    assert torch.equal(merged.state[Q][16:], parent.state[Q][16:])  # heads 2, 3: nobody trained them
    assert torch.equal(merged.state[UP][24:], parent.state[UP][24:])
    torch.testing.assert_close(merged.state[Q][:16], torch.full((16, 32), 4.5))  # (2*3 + 6*5) / 8


def test_weighting_by_samples_per_coordinate() -> None:
    parent = zero_parent()
    a = filled(parent, SubnetSpec.from_ratio(parent.dims, 0.25), 2.0, 1)  # 1 head, 12 neurons
    b = filled(parent, SubnetSpec.from_ratio(parent.dims, 0.5), 4.0, 3)  # 2 heads, 24 neurons
    delta, coverage = merge_deltas(parent, [a, b])
    assert delta[Q][0, 0] == pytest.approx(3.5)  # (1*2 + 3*4) / (1 + 3)
    assert delta[Q][8, 0] == pytest.approx(4.0)  # only b covers head 1
    assert delta[Q][16, 0] == 0.0 and coverage[Q][16, 0] == 0.0
    assert coverage[Q][0, 0] == 4.0 and coverage[Q][8, 0] == 3.0
    stepped = aggregate(parent, [a, b], FedAvg(server_lr=0.5))
    assert stepped.state[Q][0, 0] == pytest.approx(1.75)


def test_fedadam_moves_only_where_covered() -> None:
    parent = zero_parent()
    a = filled(parent, SubnetSpec.from_ratio(parent.dims, 0.25), 2.0, 1)
    b = filled(parent, SubnetSpec.from_ratio(parent.dims, 0.5), 4.0, 3)
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    stepped = aggregate(parent, [a, b], opt)
    # delta 3.5: m = 0.1 * 3.5 = 0.35, v = 0.01 * 3.5^2 = 0.1225, step = 0.1 * 0.35 / (0.35 + 1e-3)
    assert stepped.state[Q][0, 0] == pytest.approx(0.1 * 0.35 / (0.35 + 1e-3), rel=1e-5)
    assert opt.m[Q][0, 0] == pytest.approx(0.35) and opt.v[Q][0, 0] == pytest.approx(0.1225)
    assert opt.m[Q][16:].abs().sum() == 0 and opt.v[Q][16:].abs().sum() == 0
    assert stepped.state[Q][16:].abs().sum() == 0
    # state survives a checkpoint round trip
    restored = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    restored.load_state_dict(opt.state_dict())
    assert all(torch.equal(restored.m[n], opt.m[n]) for n in opt.m)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda w: w.__setitem__(Q, torch.zeros(3, 3)), "shape \\[3, 3\\] != \\[16, 32\\]"),
        (lambda w: w[Q].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda w: w.pop("classifier.bias"), "missing classifier.bias"),
        (lambda w: w.__setitem__("evil.weight", torch.zeros(1)), "unexpected evil.weight"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(corrupt, message) -> None:  # type: ignore[no-untyped-def]
    parent = tiny_parent("bert")
    half = SubnetSpec.from_ratio(parent.dims, 0.5)
    good = filled(parent, half, 1.0, 1)
    weights = dict(good.weights)
    weights[Q] = weights[Q].clone()
    corrupt(weights)
    before = {n: t.clone() for n, t in parent.state.items()}
    with pytest.raises(AggregationError, match=message):
        aggregate(parent, [good, ClientUpdate(half, weights, 1)])
    assert all(torch.equal(before[n], parent.state[n]) for n in before)


def test_zero_samples_refused() -> None:
    parent = tiny_parent("bert")
    with pytest.raises(AggregationError, match="num_samples must be positive"):
        aggregate(parent, [filled(parent, SubnetSpec.full(parent.dims), 1.0, 0)])
