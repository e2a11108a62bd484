"""The registry of model families: one folder per family, looked up by the config's ``model_type``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import UnsupportedModelError
from ._family import Family, LayerMap, Region
from .bert import BERT, ROBERTA
from .distilbert import DISTILBERT
from .vit import VIT

__all__ = ["FAMILIES", "Family", "LayerMap", "Region", "default_task", "family_for", "register"]

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (a plug-in point for families kept outside this package)."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _family in (BERT, ROBERTA, DISTILBERT, VIT):
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
