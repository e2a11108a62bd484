"""Extraction slices prefixes; the builder turns them into runnable models that train."""

import dataclasses

import pytest
import torch

from edge_sdk import SpecError, UnsupportedModelError
from edge_sdk._spec import LayerSpec, ParentDims, SubnetSpec
from edge_sdk.scaling._build import _fill_buffers, build_model, hf_config, model_class
from edge_sdk.scaling._extract import extract, param_count
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1
from edge_sdk.scaling.families import family_for
from edge_sdk.training._train import TrainConfig, train_local

from .models import minilm, tiny_inputs, tiny_model, tiny_parent

FAMILIES = ["bert", "roberta", "distilbert", "vit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_extraction_reproduces_the_parent(family: str) -> None:
    module = tiny_model(family)
    parent = tiny_parent(family)
    parent, _, _ = reorder(parent, weight_l1(parent))  # full width after reordering too
    spec = SubnetSpec.full(parent.dims)
    sub = build_model(spec, parent.config, extract(parent, spec))
    inputs = tiny_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(sub(**inputs).logits, module(**inputs).logits, atol=1e-5, rtol=0)
    assert param_count(parent, spec) == sum(p.numel() for p in module.parameters())


def _labels(family: str, n: int) -> torch.Tensor:
    return torch.arange(n) % 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "layers",
    [
        (LayerSpec(0, 2, 24), LayerSpec(1, 1, 48), LayerSpec(2, 4, 1)),  # per-layer widths
        (LayerSpec(0, 4, 48), LayerSpec(2, 3, 10)),  # depth: layer 1 dropped
        (LayerSpec(1, 1, 1),),  # the smallest
    ],
)
def test_subnetworks_build_with_their_shapes_and_train_a_step(family: str, layers: tuple[LayerSpec, ...]) -> None:
    parent = tiny_parent(family)
    spec = SubnetSpec(parent.dims, layers)
    weights = extract(parent, spec)
    model = build_model(spec, parent.config, weights)
    assert (
        sum(p.numel() for p in model.parameters())
        == param_count(parent, spec)
        < param_count(parent, SubnetSpec.full(parent.dims))
    )
    inputs = tiny_inputs(family, batch=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {**inputs, "labels": _labels(family, 4)}
    result = train_local(model, iter([batch, batch]), TrainConfig(steps=2, lr=1e-2))
    assert result.steps == 2 and result.samples == 8 and torch.isfinite(torch.tensor(result.loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)  # every parameter received a gradient and moved


def test_subnetwork_matches_parent_when_dropped_parts_are_zeroed() -> None:
    """Slicing a prefix == zeroing the rest of the parent (exact semantics of a sub-network)."""
    parent = tiny_parent("bert")
    spec = SubnetSpec(parent.dims, tuple(LayerSpec(i, 2, 20) for i in range(3)))
    sub = build_model(spec, parent.config, extract(parent, spec))
    masked = dict(parent.state)
    lm, d = parent.family.layer, parent.dims.head_dim
    for i in range(3):
        pre = f"bert.encoder.layer.{i}."
        masked[pre + lm.output + ".weight"] = masked[pre + lm.output + ".weight"].clone()
        masked[pre + lm.output + ".weight"][:, 2 * d :] = 0  # heads 2.. contribute nothing
        masked[pre + lm.down + ".weight"] = masked[pre + lm.down + ".weight"].clone()
        masked[pre + lm.down + ".weight"][:, 20:] = 0  # neurons 20.. contribute nothing
    full = build_model(SubnetSpec.full(parent.dims), parent.config, masked)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(sub(**inputs).logits, full(**inputs).logits, atol=1e-5, rtol=0)


def test_spec_for_another_model_is_refused() -> None:
    parent = tiny_parent("bert")
    other = ParentDims("bert", num_layers=3, num_heads=4, head_dim=8, ffn=64, hidden=32)
    with pytest.raises(SpecError, match="ffn: spec 64 != model 48"):
        extract(parent, SubnetSpec.full(other))
    with pytest.raises(SpecError, match="does not match the model"):
        build_model(SubnetSpec.full(other), parent.config, {})


def test_weights_that_do_not_fit_the_spec_are_named() -> None:
    parent = tiny_parent("bert")
    spec = SubnetSpec(parent.dims, tuple(LayerSpec(i, 2, 20) for i in range(3)))
    weights = extract(parent, spec)
    bad = dict(weights)
    bad["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(24, 32)
    del bad["classifier.bias"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(SpecError) as info:
        build_model(spec, parent.config, bad)
    text = str(info.value)
    assert "query.weight: shape [24, 32] != [16, 32]" in text
    assert "missing classifier.bias" in text and "unexpected extra.weight" in text


def test_unsupported_architecture() -> None:
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        family_for({"model_type": "gpt2"})


@pytest.mark.slow
def test_real_minilm_full_extraction_and_half_width_step() -> None:
    parent = minilm()
    reordered, _, _ = reorder(parent, weight_l1(parent))
    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full = SubnetSpec.full(parent.dims)
    original = build_model(full, parent.config, parent.state)
    sliced = build_model(full, parent.config, extract(reordered, full))
    with torch.no_grad():
        torch.testing.assert_close(sliced(**inputs).logits, original(**inputs).logits, atol=1e-5, rtol=0)
    half = SubnetSpec.from_ratio(parent.dims, 0.5)
    model = build_model(half, parent.config, extract(reordered, half))
    result = train_local(model, iter([{**inputs, "labels": torch.tensor([0, 1])}]), TrainConfig(steps=1))
    assert result.samples == 2 and torch.isfinite(torch.tensor(result.loss))


@pytest.mark.parametrize("family", FAMILIES)
def test_built_models_have_the_buffers_transformers_makes(family: str) -> None:
    """Buffers are not in state dicts: the builder makes them (on the CPU) equal to the library's own."""
    module = tiny_model(family)
    parent = tiny_parent(family)
    spec = SubnetSpec.uniform(parent.dims, heads=2, ffn=16)
    model = build_model(spec, parent.config, extract(parent, spec))
    built = dict(model.named_buffers())
    assert built.keys() == dict(module.named_buffers()).keys()
    for name, buffer in module.named_buffers():
        assert built[name].device.type == "cpu" and built[name].dtype == buffer.dtype
        assert torch.equal(built[name], buffer), name
    assert set(model.state_dict()) == set(module.state_dict())  # still non-persistent


def test_a_buffer_the_family_does_not_describe_is_named() -> None:
    parent = tiny_parent("bert")
    with torch.device("meta"):
        model = model_class(parent.config)(hf_config(parent.config))
    family = dataclasses.replace(parent.family, buffers={"position_ids": "positions"})
    with pytest.raises(SpecError, match=r"how to make the buffer bert\.embeddings\.token_type_ids"):
        _fill_buffers(model, family)
    with pytest.raises(ValueError, match="unknown buffer fills"):
        dataclasses.replace(parent.family, buffers={"position_ids": "ones"})


def test_concurrent_builds_keep_every_parameter_real() -> None:
    """Three threads building at once (a device deploys while another build runs): every tensor each
    gets is real, and other threads' new modules are not put on ``meta``."""
    import threading

    parent = tiny_parent("bert")
    spec = SubnetSpec.uniform(parent.dims, heads=2, ffn=16)
    weights = extract(parent, spec)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            for _ in range(10):
                model = build_model(spec, parent.config, weights)
                assert all(p.device.type == "cpu" for p in model.parameters())
                assert all(b.device.type == "cpu" for b in model.buffers())
                assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # nothing left behind
    assert torch.nn.Module.register_parameter.__name__ == "register_parameter"
