"""Build a runnable torch module from a spec, the parent's HF config and a sliced state dict.

The module is the Hugging Face task model (forward with ``labels`` returns the loss) with each
kept layer's Linear modules resized to the spec's widths. It is assembled with parameters on the
``meta`` device (no full-size allocation on a small device), then the sliced tensors are assigned.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from edge_sdk._errors import SpecError
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling.families import Family, default_task, family_for

__all__ = ["build_model", "hf_config", "model_class", "parent_dims"]


def hf_config(config: Mapping[str, Any], **overrides: Any) -> transformers.PretrainedConfig:
    """An HF config object from a config dict (as found in ``config.json``)."""
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
        raise SpecError(
            f"the {family.name} family has no {task!r} head (it has: {sorted(family.task_classes)})"
        )
    cls: type[nn.Module] = getattr(transformers, class_name)
    return cls


def parent_dims(config: Mapping[str, Any]) -> Any:
    """The :class:`ParentDims` of a config dict."""
    return family_for(config).dims(config)


_ORIGINAL_REGISTER = nn.Module.register_parameter
_META = threading.local()  # depth > 0: this thread is building a model, its new parameters go to meta
_PATCH_LOCK = threading.Lock()
_patch_users = [0]  # builds in progress, all threads


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _ORIGINAL_REGISTER(module, name, param)
    if param is not None and getattr(_META, "depth", 0) > 0:
        p = module._parameters[name]
        assert p is not None
        module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create this thread's new parameters on the meta device, buffers on the CPU (small, often not saved).

    ``nn.Module.register_parameter`` is patched while any thread builds, and only the building threads'
    parameters move: other threads (a device trains while it deploys) are not affected, and concurrent
    builds do not leave the patch behind.
    """
    with _PATCH_LOCK:
        if _patch_users[0] == 0:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign,assignment]
        _patch_users[0] += 1
    _META.depth = getattr(_META, "depth", 0) + 1
    try:
        yield
    finally:
        _META.depth -= 1
        with _PATCH_LOCK:
            _patch_users[0] -= 1
            if _patch_users[0] == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER  # type: ignore[method-assign]


def _resized(
    linear: nn.Module, *, out_features: int | None = None, in_features: int | None = None
) -> nn.Linear:
    assert isinstance(linear, nn.Linear)
    return nn.Linear(
        in_features if in_features is not None else linear.in_features,
        out_features if out_features is not None else linear.out_features,
        bias=linear.bias is not None,
        device="meta",
    )


def _resize_layer(layer: nn.Module, family: Family, heads: int, head_dim: int, ffn: int) -> None:
    """Shrink one layer in place to ``heads`` heads and ``ffn`` FFN neurons (prefixes)."""
    lm = family.layer
    attn = heads * head_dim
    for path in (lm.query, lm.key, lm.value):  # [attn, hidden]
        layer.set_submodule(path, _resized(layer.get_submodule(path), out_features=attn))
    layer.set_submodule(
        lm.output, _resized(layer.get_submodule(lm.output), in_features=attn)
    )  # [hidden, attn]
    layer.set_submodule(lm.up, _resized(layer.get_submodule(lm.up), out_features=ffn))  # [ffn, hidden]
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
    with _parameters_on_meta():
        model = cls(copy.deepcopy(cfg))
    layers = model.get_submodule(family.layers_of(task))
    assert isinstance(layers, nn.ModuleList)
    for position, layer_spec in enumerate(spec.layers):
        _resize_layer(layers[position], family, layer_spec.heads, spec.parent.head_dim, layer_spec.ffn)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    _check_state_dict(expected, state_dict)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    model.eval()
    return model


def _check_state_dict(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]
) -> None:
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
