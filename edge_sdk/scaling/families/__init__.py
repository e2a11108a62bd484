"""The registry of model families: one folder per family, looked up by the config's ``model_type``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge_sdk._errors import UnsupportedModelError
from edge_sdk.scaling.families._family import Family, LayerMap, Region
from edge_sdk.scaling.families.bert import BERT, ROBERTA
from edge_sdk.scaling.families.distilbert import DISTILBERT
from edge_sdk.scaling.families.llama import LLAMA
from edge_sdk.scaling.families.vit import VIT

__all__ = [
    "FAMILIES",
    "Family",
    "LayerMap",
    "Region",
    "default_task",
    "family_for",
    "model_task",
    "modeling_modules",
    "register",
]

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (a plug-in point for families kept outside this package)."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _family in (BERT, ROBERTA, DISTILBERT, VIT, LLAMA):
    register(_family)


def family_for(config: Mapping[str, Any]) -> Family:
    """The family of an HF config dict, by its ``model_type``; a clear error when unsupported."""
    model_type = config.get("model_type")
    try:
        return FAMILIES[str(model_type)]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        ) from None


def default_task(family: Family) -> str:
    """The family's first task (text-classification for text encoders, image-classification for ViT)."""
    return next(iter(family.task_classes))


def model_task(config: Mapping[str, Any], data_task: str | None = None) -> str | None:
    """The task whose head a received model ``config`` is built with: the one whose class its
    ``architectures`` names (the coordinator sends the run's), else ``data_task`` (the data's kind,
    e.g. ``"causal-lm"`` for prompt/response records) when the family has it, else None (the
    family's first task). Used by training (``edge_sdk.training._runner``) and deploys
    (``edge_sdk.serving._install``) alike."""
    tasks = family_for(config).task_classes
    names = config.get("architectures")
    for name in names if isinstance(names, list) else ():
        found = next((task for task, cls in tasks.items() if cls == name), None)
        if found is not None:
            return found
    return data_task if data_task in tasks else None


def modeling_modules() -> tuple[str, ...]:
    """The transformers modules of every registered family (a device imports them before it measures
    its runtime footprint: transformers imports them lazily, BERT's alone is ~120 MB resident)."""
    return tuple(dict.fromkeys(family.modeling_module for family in FAMILIES.values()))
