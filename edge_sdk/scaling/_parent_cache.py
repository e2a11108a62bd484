"""A ranked parent, remembered: the reordered weights and their salience, without loading the model.

Loading a model folder goes through transformers (importing its modeling code: 3-4 s on a small
CPU) and ranking it takes a moment more; the result depends only on the folder's files and on the
task, labels, seed and reordering asked for. :func:`load_ranked` reads a ranked parent remembered
by :func:`save_ranked` under ``<cache>/parents/`` (one safetensors file: the state, the salience
scores, and the config as metadata), keyed by a sha256 of those inputs (each file's name, size and
modification time) and of the edge-fm, torch and transformers versions. Data-free salience only
(``weight_l1``): activation salience depends on calibration data. Unreadable or unwritable files
are ignored (the model is then loaded, as without a cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from edge_sdk._version import __version__
from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._salience import Salience
from edge_sdk.scaling.families import family_for

__all__ = ["load_ranked", "ranked_key", "save_ranked"]

logger = logging.getLogger(__name__)

_HEADS, _FFN = "__salience__.heads", "__salience__.ffn"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def ranked_key(model_dir: Path, **asked: Any) -> str:
    """The cache key of ``model_dir`` ranked as ``asked`` (task, num_labels, seed, reordered, salience)."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    facts = {
        "edge_fm": __version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "folder": str(model_dir.resolve()),
        "files": [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in files],
        **asked,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _path(cache: Path, key: str) -> Path:
    return cache / "parents" / f"{key}.safetensors"


def load_ranked(cache: Path, key: str) -> tuple[ParentModel, Salience] | None:
    """The ranked parent remembered under ``key``, or None."""
    from safetensors import safe_open

    path = _path(cache, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safetensors handle)
        config = json.loads(meta["config"])
        if isinstance(config.get("id2label"), dict):  # JSON made its int keys strings: as loaded, they are ints
            config["id2label"] = {int(k): v for k, v in config["id2label"].items()}
        salience = Salience(state.pop(_HEADS), state.pop(_FFN), meta["salience"])
        parent = ParentModel(family_for(config), config, meta["task"], state)
    except Exception as exc:  # a broken or foreign file: load the model instead
        logger.debug("ranked parent cache %s not used: %s", path, exc)
        return None
    logger.info("ranked parent read from the cache (%s)", path)
    return parent, salience


def save_ranked(cache: Path, key: str, parent: ParentModel, salience: Salience) -> None:
    """Remember ``parent`` and ``salience`` under ``key`` (atomically; failures logged at debug level)."""
    from safetensors.torch import save_file

    path = _path(cache, key)
    tensors: dict[str, torch.Tensor] = {n: t.detach().contiguous().clone() for n, t in parent.state.items()}
    tensors[_HEADS], tensors[_FFN] = salience.heads.contiguous(), salience.ffn.contiguous()
    meta = {"config": json.dumps(dict(parent.config), default=str), "task": parent.task, "salience": salience.method}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    except Exception as exc:  # the cache is an optimisation: never a failure of the run
        logger.debug("ranked parent not remembered in %s: %s", path, exc)
        tmp.unlink(missing_ok=True)
