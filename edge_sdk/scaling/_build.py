"""Build a runnable torch module from a spec, the parent's HF config and a sliced state dict.

The module is the Hugging Face task model (forward with ``labels`` returns the loss) with each
kept layer's Linear modules resized to the spec's widths. It is assembled on the ``meta`` device
(nothing allocated: a small device never holds a full-size copy), then the sliced tensors are
assigned as the parameters and the buffers (position ids, ...) are made from their shapes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edge_sdk._errors import SpecError
from edge_sdk._spec import LayerSpec, ParentDims, SubnetSpec
from edge_sdk.scaling.families import Family, default_task, family_for

if TYPE_CHECKING:
    import transformers

__all__ = ["build_model", "hf_config", "model_class", "parent_dims"]


def hf_config(config: Mapping[str, Any], **overrides: Any) -> transformers.PretrainedConfig:
    """An HF config object from a config dict (as found in ``config.json``)."""
    import transformers  # imported when first needed: planning from a parent never is

    data = {k: v for k, v in config.items() if k not in ("transformers_version", "architectures")}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise SpecError("the model config has no 'model_type'")
    data.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **data)


def model_class(config: Mapping[str, Any], task: str | None = None) -> type[nn.Module]:
    """The transformers task class for ``config`` (importing its modeling code, a large part of the
    runtime's footprint: measure the footprint after calling this)."""
    family = family_for(config)
    task = task or default_task(family)
    class_name = family.task_classes.get(task)
    if class_name is None:
        raise SpecError(f"the {family.name} family has no {task!r} head (it has: {sorted(family.task_classes)})")
    import transformers

    cls: type[nn.Module] = getattr(transformers, class_name)
    return cls


def parent_dims(config: Mapping[str, Any]) -> Any:
    """The :class:`ParentDims` of a config dict."""
    return family_for(config).dims(config)


def _fill_buffers(model: nn.Module, family: Family) -> None:
    """Give the model's buffers (built on ``meta``) their values, as the family says how.

    A family's buffers are non-persistent (no state dict holds them) and made from the config in
    ``__init__``; a buffer the family does not describe raises :class:`SpecError` naming it.
    """
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type != "meta":
            continue
        module_name, _, leaf = name.rpartition(".")
        fill = family.buffers.get(leaf)
        if fill is None:
            raise SpecError(f"the {family.name} family does not say how to make the buffer {name}")
        if fill == "rotary":  # the owner's own __init__ computes it (and its non-buffer copies)
            _rebuild_on_cpu(model, module_name)
            continue
        if fill == "positions":  # 0, 1, 2, ... along the last axis
            value = torch.arange(buffer.shape[-1], dtype=buffer.dtype).expand(buffer.shape)
        else:  # "zeros" (a family's fills are checked against BUFFER_FILLS when it is made)
            value = torch.zeros(buffer.shape, dtype=buffer.dtype)
        setattr(model.get_submodule(module_name), leaf, value)  # stays a buffer, same persistence


def _rebuild_on_cpu(model: nn.Module, module_name: str) -> None:
    """Replace the (meta) module ``module_name`` by a new one made on the CPU from the model's config:
    a rotary embedding has no parameters, so nothing is lost, and its ``inv_freq`` (and the
    ``original_inv_freq`` attribute, the ``attention_scaling`` factor) come out as transformers makes them."""
    owner = model.get_submodule(module_name)
    with torch.device("cpu"):
        fresh = type(owner)(config=owner.config)
    model.set_submodule(module_name, fresh)


def _resized(linear: nn.Module, *, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    assert isinstance(linear, nn.Linear)
    return nn.Linear(
        in_features if in_features is not None else linear.in_features,
        out_features if out_features is not None else linear.out_features,
        bias=linear.bias is not None,
        device="meta",
    )


def _resize_layer(layer: nn.Module, family: Family, spec: LayerSpec, dims: ParentDims) -> None:
    """Shrink one layer in place to ``spec.heads`` query heads (their whole KV groups) and ``spec.ffn``
    FFN neurons (prefixes)."""
    heads, head_dim, ffn = spec.heads, dims.head_dim, spec.ffn
    kv_heads = dims.kv_kept(heads)
    lm = family.layer
    attn, kv = heads * head_dim, kv_heads * head_dim
    for path, rows in ((lm.query, attn), (lm.key, kv), (lm.value, kv)):  # [attn or kv, hidden]
        layer.set_submodule(path, _resized(layer.get_submodule(path), out_features=rows))
    layer.set_submodule(lm.output, _resized(layer.get_submodule(lm.output), in_features=attn))  # [hidden, attn]
    for path in (lm.up, lm.gate) if lm.gate else (lm.up,):  # [ffn, hidden]
        layer.set_submodule(path, _resized(layer.get_submodule(path), out_features=ffn))
    layer.set_submodule(lm.down, _resized(layer.get_submodule(lm.down), in_features=ffn))  # [hidden, ffn]
    family.set_heads(layer.get_submodule(lm.attention), heads, head_dim)


def build_model(
    spec: SubnetSpec,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    task: str | None = None,
    attn_implementation: str = "eager",
) -> nn.Module:
    """The sub-network ``spec`` of the parent described by ``config``, holding ``state_dict``.

    ``state_dict`` must have exactly the sub-network's parameters (what extraction produces);
    a missing, extra or wrongly shaped tensor raises :class:`SpecError` naming it.
    """
    family = family_for(config)
    spec.check_parent(family.dims(config))
    task = task or default_task(family)
    cls = model_class(config, task)
    cfg = hf_config(config, **{family.config_keys["num_layers"]: len(spec.layers)})
    cfg._attn_implementation = attn_implementation
    with torch.device("meta"):  # this thread only: a device may train while it builds
        model = cls(copy.deepcopy(cfg))
    layers = model.get_submodule(family.layers_of(task))
    assert isinstance(layers, nn.ModuleList)
    for position, layer_spec in enumerate(spec.layers):
        _resize_layer(layers[position], family, layer_spec, spec.parent)
    tied = family.tied_aliases(config, task)  # e.g. lm_head.weight: made the embedding's Parameter below
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
    _check_state_dict(expected, state_dict)
    model.load_state_dict(dict(state_dict), strict=not tied, assign=True)
    if tied:
        model.tie_weights()  # type: ignore[operator]  # one Parameter: trained and counted once
    _fill_buffers(model, family)
    model.eval()
    return model


def _check_state_dict(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]) -> None:
    problems = [f"missing {name} {list(shape)}" for name, shape in expected.items() if name not in state_dict]
    problems += [f"unexpected {name}" for name in state_dict if name not in expected]
    problems += [
        f"{name}: shape {list(t.shape)} != {list(expected[name])}"
        for name, t in state_dict.items()
        if name in expected and tuple(t.shape) != expected[name]
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise SpecError(f"the weights do not match the sub-network: {shown}")
