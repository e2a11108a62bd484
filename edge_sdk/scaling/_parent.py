"""The parent model the coordinator holds: its family, HF config, task and full state dict."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sdk._errors import ConfigError, SpecError
from edge_sdk._spec import ParentDims
from edge_sdk.scaling.families import Family, default_task, family_for

__all__ = ["ParentModel", "load_parent", "parent_from_module"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParentModel:
    """A pre-trained model as the coordinator sees it: plain tensors plus what describes them."""

    family: Family
    config: Mapping[str, Any]  # the HF config as a JSON-safe dict
    task: str
    state: dict[str, torch.Tensor]  # the full task model's state dict (parameters and buffers)

    @property
    def dims(self) -> ParentDims:
        return self.family.dims(self.config)

    @property
    def layers_path(self) -> str:
        return self.family.layers_of(self.task)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.state.items()}

    def layer_tensor(self, index: int, module: str, kind: str = "weight") -> torch.Tensor:
        return self.state[f"{self.layers_path}.{index}.{module}.{kind}"]

    def with_state(self, state: dict[str, torch.Tensor]) -> ParentModel:
        return ParentModel(self.family, self.config, self.task, state)


def parent_from_module(model: nn.Module, task: str | None = None) -> ParentModel:
    """Wrap an in-memory HF task model (tests build tiny random ones this way)."""
    config: dict[str, Any] = model.config.to_dict()  # type: ignore[union-attr,operator]
    family = family_for(config)
    task = task or default_task(family)
    family.layers_of(task)  # raises when the family has no such head
    tied = family.tied_aliases(config, task)  # a tied lm_head is the embedding: held once, under its name
    state = {name: t.detach().clone() for name, t in model.state_dict().items() if name not in tied}
    return ParentModel(family, config, task, state)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_parent(model_dir: str | Path, *, task: str | None = None, num_labels: int = 2, seed: int = 0) -> ParentModel:
    """Load a pre-trained model folder (``config.json`` + safetensors weights, never pickle).

    The task head (e.g. a classifier on a sentence encoder) is initialised from ``seed`` when the
    folder does not have one, so every run that names the same seed starts from the same weights.
    """
    path = Path(model_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} is not a model folder: it has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{path} has no .safetensors weights (pickled weights are not loaded)")
    config = json.loads(config_path.read_text())
    family = family_for(config)
    task = task or default_task(family)
    class_name = family.task_classes.get(task)
    if class_name is None:
        tasks = ", ".join(repr(t) for t in family.task_classes)
        raise SpecError(f"the {family.name} family has no {task!r} head (its tasks: {tasks}; [model] task)")
    import transformers  # here, not at the top: a parent built from a checkpoint never needs it

    torch.manual_seed(seed)
    with _quiet("transformers.modeling_utils", "transformers.integrations.tensor_parallel"):
        # (a new classifier head is expected here, not news; nor is the tensor-parallel plan)
        model = getattr(transformers, class_name).from_pretrained(
            path, num_labels=num_labels, use_safetensors=True, local_files_only=True
        )
    logger.info("loaded %s (%s, %d parameters)", path, class_name, sum(p.numel() for p in model.parameters()))
    return parent_from_module(model, task)
