"""One builder for a run's parent: load the model, rank its heads and neurons, reorder it once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_sdk._cache import cache_dir
from edge_sdk._errors import ConfigError
from edge_sdk.scaling._parent import ParentModel, load_parent
from edge_sdk.scaling._parent_cache import load_ranked, ranked_key, save_ranked
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import Salience, activation_aware, weight_l1

__all__ = ["SALIENCE_KINDS", "ranked_parent"]

SALIENCE_KINDS = ("weight_l1", "activation")


def ranked_parent(
    model: str | Path | ParentModel,
    *,
    salience: str = "weight_l1",
    calibration: Callable[[], Sequence[Any]] | None = None,
    reordered: bool = True,
    task: str | None = None,
    num_labels: int = 2,
    seed: int = 0,
    cache: Path | bool = False,
) -> tuple[ParentModel, Salience]:
    """The parent a run plans from, and its salience in the parent's (new) order.

    ``model``: a model folder or name (resolved with the packaged models), or a loaded parent.
    ``salience``: ``"weight_l1"`` (data-free, the method's) or ``"activation"`` (needs
    ``calibration``, a callable returning a few input batches: it is only called then).
    ``reordered=False`` keeps index order (the ablation): sub-networks are then index prefixes.
    Reordering is function-preserving: the reordered parent computes what the loaded one did.
    ``cache``: a folder (True: edge-fm's cache folder) where a model folder ranked with
    ``weight_l1`` is remembered, and read back instead of loading the model (:mod:`._parent_cache`).
    """
    if salience not in SALIENCE_KINDS:
        raise ConfigError(f"salience must be one of {SALIENCE_KINDS}, got {salience!r}")
    folder, key = None, None
    if not isinstance(model, ParentModel):
        from edge_sdk.scaling._models import resolve_model_dir

        folder = resolve_model_dir(str(model))
    where = cache_dir() if cache is True else cache if isinstance(cache, Path) else None
    if folder is not None and where is not None and salience == "weight_l1":
        asked = {"task": task, "num_labels": num_labels, "seed": seed, "reordered": reordered, "salience": salience}
        key = ranked_key(folder, **asked)
        found = load_ranked(where, key)
        if found is not None:
            return found
    if isinstance(model, ParentModel):
        parent = model
    else:
        assert folder is not None
        parent = load_parent(folder, task=task, num_labels=num_labels, seed=seed)
    if salience == "activation":
        if calibration is None:
            raise ConfigError("salience 'activation' needs calibration data (a validation set) to rank on")
        ranking = activation_aware(parent, list(calibration()))
    else:
        ranking = weight_l1(parent)
    if reordered:
        parent, ranking, _ = reorder(parent, ranking)
    if key is not None and where is not None:
        save_ranked(where, key, parent, ranking)
    return parent, ranking
