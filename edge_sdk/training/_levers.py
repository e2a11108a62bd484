"""Training levers applied to a torch model: which parameters train, how, and what a device returns.

A :class:`~edge_sdk._levers.Levers` value is applied in place by :func:`prepare` (the training loop
calls it; the loop itself does the micro-batches):

* ``dropout``: every dropout probability of the model (``nn.Dropout`` modules, and the ``dropout_prob``
  attributes fused attention reads) is set to the given value; ``None`` keeps the model's.
* ``checkpointing``: Hugging Face's per-layer activation checkpointing, non-reentrant
  (``torch.utils.checkpoint``): a layer keeps only its input and recomputes its activations in
  backward. Dropout draws the same masks in the recomputation (the RNG state is restored).
* ``embeddings``: the word-embedding table trains (``"train"``), does not (``"frozen"``), or trains
  on the rows the task's batches touch only (``"rows"``, :class:`RowEmbedding`).
* ``lora_rank=r``: LoRA adapters (``peft``) on the family's LoRA targets in every layer (an
  encoder's six linear layers: query, key, value, attention output, FFN up and down; Llama's seven:
  ``q/k/v/o_proj`` and ``gate/up/down_proj``). The layer's output is
  ``W x + b + s B A x`` with ``A [r, in]``, ``B [out, r]`` (zero at the start) and ``s = alpha / r``;
  the linear weights and biases, position and token-type embeddings are frozen; norms (LayerNorm,
  RMSNorm) and the task head (everything outside the embeddings and the layers: pooler, classifier,
  Llama's ``score``; a language-model head tied to the token table follows the table) train;
  the word-embedding table follows ``embeddings``.
* ``attention``: fixed when the model is built (``build_model(..., attn_implementation=...)``);
  :func:`prepare` checks the model was built with the requested kind.

:func:`trained_tensors` reads back what a device returns for each parameter it received:
the trained tensor (dense), ``NAME`` + ``NAME@rows`` (row-trained table: the rows' values and their
sorted indices), ``NAME@lora_A`` + ``NAME@lora_B`` (LoRA, the scaling ``s`` folded into ``B``, so the
weight's change is ``B @ A``), or nothing (frozen).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge_sdk._errors import ConfigError, SpecError
from edge_sdk._levers import Levers

__all__ = [
    "LORA_ALPHA_PER_RANK",
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "ROWS_SUFFIX",
    "RowEmbedding",
    "install_rows",
    "lora_targets",
    "prepare",
    "touched_rows",
    "trained_tensors",
]

logger = logging.getLogger(__name__)

LORA_ALPHA_PER_RANK = 2  # alpha = 2r: the adapters' output is scaled by s = alpha / r = 2
ROWS_SUFFIX = "@rows"
LORA_A_SUFFIX = "@lora_A"
LORA_B_SUFFIX = "@lora_B"


class RowEmbedding(nn.Module):
    """A word-embedding table of which only some rows train.

    Holds the full table frozen (``weight``, ``[V, h]``), a trainable compact copy of the chosen rows
    (``rows_weight``, ``[n, h]``) and an index map ``V -> position in rows_weight`` (-1 elsewhere).
    A lookup of a chosen row reads the compact copy, any other row the frozen table. AdamW on
    ``rows_weight`` is AdamW on those rows of the dense table, update for update (a dense table's
    other rows get no gradient; only AdamW's weight decay would move them), with optimizer state for
    ``n`` rows instead of ``V``. The padding row, when chosen, gets no gradient, as in ``nn.Embedding``.
    """

    rows: torch.Tensor  # sorted unique row indices, int64 [n]
    remap: torch.Tensor  # row index -> position in rows_weight, -1 for rows not trained, int64 [V]

    def __init__(self, table: nn.Embedding, rows: torch.Tensor) -> None:
        super().__init__()
        rows = torch.unique(torch.as_tensor(rows, dtype=torch.int64))
        vocab = table.num_embeddings
        if rows.numel() == 0 or int(rows[0]) < 0 or int(rows[-1]) >= vocab:
            raise ConfigError(f"embedding rows must be 1 or more indices in 0..{vocab - 1}")
        self.num_embeddings, self.embedding_dim = vocab, table.embedding_dim
        self.weight = table.weight
        self.weight.requires_grad_(False)
        self.rows_weight = nn.Parameter(table.weight.detach()[rows].clone())
        remap = torch.full((vocab,), -1, dtype=torch.int64)
        remap[rows] = torch.arange(rows.numel())
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("remap", remap, persistent=False)
        pad = table.padding_idx
        self.compact_padding_idx = int(remap[pad]) if pad is not None and remap[pad] >= 0 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.remap[ids]
        known = pos >= 0
        out = F.embedding(pos.clamp(min=0), self.rows_weight, padding_idx=self.compact_padding_idx)
        if not bool(known.all()):
            out = torch.where(known.unsqueeze(-1), out, F.embedding(ids, self.weight))
        return out


def touched_rows(batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """Sorted unique token ids of ``batches`` (their ``input_ids``, padding included)."""
    ids = [np.unique(np.asarray(b["input_ids"])) for b in batches]
    if not ids:
        raise ConfigError("no batches to take embedding rows from")
    return np.unique(np.concatenate(ids)).astype(np.int64)


def _table(model: nn.Module) -> nn.Embedding:
    table = model.get_input_embeddings()  # type: ignore[operator]
    if isinstance(table, RowEmbedding):
        raise ConfigError("the embedding rows are already installed")
    if not isinstance(table, nn.Embedding):
        raise SpecError(
            f"the embedding levers need a token-embedding table; {type(model).__name__}'s input embedding"
            f" is a {type(table).__name__}"
        )
    return table


def install_rows(model: nn.Module, rows: np.ndarray | torch.Tensor) -> RowEmbedding:
    """Replace ``model``'s word-embedding table with a :class:`RowEmbedding` training ``rows`` only."""
    module = RowEmbedding(_table(model), torch.as_tensor(np.asarray(rows), dtype=torch.int64))
    model.set_input_embeddings(module)  # type: ignore[operator]
    return module


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _family_paths(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """(dotted path of the model's layer list, its family's LoRA target paths inside a layer)."""
    from edge_sdk.scaling import family_for

    family = family_for({"model_type": getattr(model.config, "model_type", None)})
    task = next((t for t, cls in family.task_classes.items() if cls == type(model).__name__), None)
    if task is None:
        raise SpecError(f"{type(model).__name__} is not a task class of the {family.name} family")
    family.require_lora()
    return family.layers_of(task), family.lora_targets


def lora_targets(model: nn.Module) -> list[str]:
    """Full module names of the family's LoRA targets in every layer of ``model`` (the six linear
    layers of an encoder layer; Llama's seven: q, k, v, o and the gated FFN's gate, up, down)."""
    layers_path, paths = _family_paths(model)
    layers = model.get_submodule(layers_path)
    assert isinstance(layers, nn.ModuleList)
    return [f"{layers_path}.{i}.{path}" for i in range(len(layers)) for path in paths]


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer (LayerNorm, or an RMSNorm such as Llama's): it trains under LoRA."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _apply_lora(model: nn.Module, rank: int) -> None:
    """Inject LoRA adapters of ``rank`` (frozen base weights); norms and the task head train."""
    from peft import LoraConfig, inject_adapter_in_model

    layers_path, _ = _family_paths(model)
    embeddings = _module_name(model, model.get_input_embeddings()).rpartition(".")[0]  # type: ignore[operator]
    targets = lora_targets(model)
    config = LoraConfig(
        r=rank, lora_alpha=LORA_ALPHA_PER_RANK * rank, lora_dropout=0.0, target_modules=targets, bias="none"
    )
    inject_adapter_in_model(config, model)  # freezes everything but the adapters
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        in_backbone = name.startswith((layers_path + ".", embeddings + "."))
        if "lora_" not in name and (_is_norm(modules[owner]) or not in_backbone):
            param.requires_grad_(True)


def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        fused: Any = module
        if isinstance(getattr(fused, "dropout_prob", None), float):
            fused.dropout_prob = p  # fused attention's probability (SDPA modules)


def prepare(
    model: nn.Module, levers: Levers, *, rows: np.ndarray | torch.Tensor | None = None, dropout: float | None = None
) -> None:
    """Apply ``levers`` (but micro-batches: the loop's) and ``dropout`` to ``model`` in place.

    ``rows``: the embedding rows to train when ``levers.embeddings == "rows"`` and the model's table
    is not a :class:`RowEmbedding` yet.
    """
    built = getattr(model.config, "_attn_implementation", "eager") or "eager"
    if built != levers.attention:
        raise ConfigError(
            f"the model was built with {built} attention, the levers ask for {levers.attention}"
            " (build it with attn_implementation=levers.attention)"
        )
    if dropout is not None:
        _set_dropout(model, dropout)
    if levers.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    table = model.get_input_embeddings()  # type: ignore[operator]
    if levers.embeddings == "rows" and not isinstance(table, RowEmbedding):
        if rows is None:
            raise ConfigError("embeddings='rows' needs the rows the task's batches touch")
        table = install_rows(model, rows)
    if levers.lora_rank:
        _apply_lora(model, levers.lora_rank)
    if levers.embeddings == "rows":
        assert isinstance(table, RowEmbedding)
        table.rows_weight.requires_grad_(True)
    elif levers.embeddings == "frozen":
        _table(model).weight.requires_grad_(False)
    elif levers.lora_rank:  # the input embedding trains densely (a ViT's patch projection too)
        model.get_input_embeddings().requires_grad_(True)  # type: ignore[operator]


def trained_tensors(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """What a device returns for the parameters ``names`` it received, after training ``model``.

    Dense-trained: ``NAME``; row-trained table: ``NAME`` (``[n, h]``) and ``NAME@rows`` (int64 ``[n]``);
    LoRA: ``NAME@lora_A`` (``[r, in]``) and ``NAME@lora_B`` (``[out, r]``, scaling folded in); frozen:
    absent. Buffers (never trained) are returned as they are.
    """
    special: dict[str, dict[str, torch.Tensor]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, RowEmbedding):
            special[f"{module_name}.weight"] = {
                f"{module_name}.weight": module.rows_weight.detach().clone(),
                f"{module_name}.weight{ROWS_SUFFIX}": module.rows.clone(),
            }
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(module.lora_A):
            lora: Any = module  # a peft LoRA layer: lora_A / lora_B / scaling per adapter
            (adapter,) = tuple(lora.lora_A.keys())
            name = f"{module_name}.weight"
            special[name] = {
                name + LORA_A_SUFFIX: lora.lora_A[adapter].weight.detach().clone(),
                name + LORA_B_SUFFIX: lora.lora_B[adapter].weight.detach() * lora.scaling[adapter],
            }
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name in special:
            out.update(special[name])
        elif name in params:
            if params[name].requires_grad:
                out[name] = params[name].detach()
        elif name in buffers:
            out[name] = buffers[name]
    return out
