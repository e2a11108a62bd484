import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_sdk import SpecError
from edge_sdk._spec import SPEC_VERSION, LayerSpec, ParentDims, SubnetSpec

PARENT = ParentDims("bert", num_layers=6, num_heads=12, head_dim=32, ffn=1536, hidden=384)


@st.composite
def specs(draw: st.DrawFn) -> SubnetSpec:
    indices = sorted(draw(st.sets(st.integers(0, 5), min_size=1)))
    layers = tuple(LayerSpec(i, draw(st.integers(1, 12)), draw(st.integers(1, 1536))) for i in indices)
    return SubnetSpec(PARENT, layers)


@given(specs())
def test_json_round_trip(spec: SubnetSpec) -> None:
    assert SubnetSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["version"] == SPEC_VERSION


def test_full_and_ratio() -> None:
    assert SubnetSpec.full(PARENT).is_full
    half = SubnetSpec.from_ratio(PARENT, 0.5)
    assert not half.is_full
    assert {(ly.heads, ly.ffn) for ly in half.layers} == {(6, 768)}
    assert SubnetSpec.full(PARENT).covers(half) and not half.covers(SubnetSpec.full(PARENT))


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ((), "at least one layer"),
        ((LayerSpec(6, 1, 1),), "outside the parent's 6 layers"),
        ((LayerSpec(2, 1, 1), LayerSpec(1, 1, 1)), "strictly increasing"),
        ((LayerSpec(0, 0, 5),), "heads=0"),
        ((LayerSpec(0, 13, 5),), "heads=13"),
        ((LayerSpec(0, 1, 1537),), "ffn=1537"),
    ],
)
def test_invalid_specs_say_why(layers: tuple[LayerSpec, ...], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        SubnetSpec(PARENT, layers)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"version": 1, "parent": {}}', "missing the field 'layers'"),
        ('{"version": 2, "parent": {}, "layers": []}', "version 2 is not supported"),
        ('{"version": 1, "parent": {}, "layers": [], "x": 1}', "unknown spec fields"),
        ('{"version": 1, "parent": {"family": "bert"}, "layers": []}', "'parent' is malformed"),
    ],
)
def test_malformed_json(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        SubnetSpec.from_json(text)


def test_bad_layer_entry() -> None:
    data = SubnetSpec.full(PARENT).to_dict()
    data["layers"][0] = [0, 1, "wide"]
    with pytest.raises(SpecError, match=r"\[index, heads, ffn\]"):
        SubnetSpec.from_dict(data)


def test_check_parent_names_every_difference() -> None:
    other = ParentDims("bert", num_layers=12, num_heads=12, head_dim=64, ffn=3072, hidden=768)
    with pytest.raises(SpecError) as info:
        SubnetSpec.full(PARENT).check_parent(other)
    for name in ("num_layers", "head_dim", "ffn", "hidden"):
        assert name in str(info.value)
