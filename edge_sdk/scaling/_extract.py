"""Extraction: the sub-network a spec asks for is a prefix slice of the (reordered) parent."""

from __future__ import annotations

import math

import torch

from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling.families import Region

__all__ = ["extract", "param_count", "regions"]


def regions(parent: ParentModel, spec: SubnetSpec) -> dict[str, tuple[str, Region]]:
    """parent name -> (sub-network name, kept region), after checking the spec fits the parent."""
    spec.check_parent(parent.dims)
    return parent.family.param_regions(spec, parent.shapes(), parent.task)


def extract(parent: ParentModel, spec: SubnetSpec) -> dict[str, torch.Tensor]:
    """The sub-network's state dict: contiguous copies of the kept prefixes (safe to ship or train)."""
    return {child: parent.state[name][region].clone() for name, (child, region) in regions(parent, spec).items()}


def _numel(shape: tuple[int, ...], region: Region) -> int:
    return math.prod(len(range(*s.indices(n))) for s, n in zip(region, shape, strict=True))


def param_count(parent: ParentModel, spec: SubnetSpec) -> int:
    """Number of floating-point parameters the sub-network holds (buffers excluded)."""
    shapes = parent.shapes()
    return sum(
        _numel(shapes[name], region)
        for name, (_child, region) in regions(parent, spec).items()
        if parent.state[name].is_floating_point()
    )
