"""Checkpoints of a federated run: safetensors for tensors, JSON for the rest, written atomically.

Layout under the run directory::

    checkpoints/round-000003/weights.safetensors   the global (reordered) model after round 3
    checkpoints/round-000003/server.safetensors    salience scores and the server optimizer's moments
    checkpoints/round-000003/state.json            round, run id, strategy, device registry, metrics
                                                   history, and the sha256 of both tensor files
    checkpoints/LATEST                             the name of the newest complete checkpoint

A checkpoint is written into a temporary folder (``checkpoints/.tmp-...``), each file flushed and
fsynced, then the folder is renamed into place with ``os.replace``, and only then is ``LATEST``
replaced (again temp file + ``os.replace``). A crash at any point leaves ``LATEST`` naming the previous
complete checkpoint; leftovers of an interrupted write are removed by the next save. Old checkpoints
are pruned the same way: each folder is renamed to ``.tmp-pruned-...`` before it is deleted, so no
``round-*`` folder is ever left half-deleted. Should ``LATEST`` itself be lost, the newest complete
folder stands in for it (:func:`latest_checkpoint`). Loading checks both files' sha256 against
``state.json``. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from edge_sdk._errors import ConfigError
from edge_sdk.scaling import Salience

__all__ = [
    "CHECKPOINT_VERSION",
    "EngineState",
    "checkpoint_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "state_digest",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_LATEST = "LATEST"
_WEIGHTS = "weights.safetensors"
_SERVER = "server.safetensors"
_STATE = "state.json"
_ROUND_NAME = re.compile(r"round-[0-9]{6,}")


@dataclasses.dataclass(frozen=True)
class EngineState:
    """Everything a run needs to continue: what the federation engine snapshots and restores."""

    run_id: str
    round: int  # rounds completed
    task: str
    model_config: Mapping[str, Any]  # the HF config (JSON)
    weights: Mapping[str, torch.Tensor]  # the global model, in salience order
    salience: Salience  # sorted scores of the reordered model (planning needs them)
    strategy: str
    optimizer_state: Mapping[str, torch.Tensor]  # e.g. FedAdam's m/... and v/... moments
    devices: Mapping[str, Mapping[str, Any]]  # the device registry (JSON)
    history: tuple[Mapping[str, Any], ...]  # one JSON summary per completed round
    model_name: str = ""


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` in name order (a model's identity)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def checkpoint_dir(run_dir: str | Path, round_index: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{round_index:06d}"


def _remove_leftovers(root: Path) -> None:
    for leftover in root.glob(".tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | Path, state: EngineState, *, keep: int = 3) -> Path:
    """Write ``state`` as the newest checkpoint of ``run_dir`` (atomically); keep the ``keep`` newest."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = checkpoint_dir(run_dir, state.round)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        weights_blob = safetensors.torch.save(_contiguous(state.weights))
        server_tensors = {
            "salience/heads": state.salience.heads,
            "salience/ffn": state.salience.ffn,
            **{f"optimizer/{name}": t for name, t in state.optimizer_state.items()},
        }
        server_blob = safetensors.torch.save(_contiguous(server_tensors))
        _write_file(tmp / _WEIGHTS, weights_blob)
        _write_file(tmp / _SERVER, server_blob)
        meta = {
            "version": CHECKPOINT_VERSION,
            "run_id": state.run_id,
            "round": state.round,
            "task": state.task,
            "model_name": state.model_name,
            "model_config": state.model_config,
            "salience_method": state.salience.method,
            "strategy": state.strategy,
            "devices": state.devices,
            "history": list(state.history),
            "files": {
                _WEIGHTS: hashlib.sha256(weights_blob).hexdigest(),
                _SERVER: hashlib.sha256(server_blob).hexdigest(),
            },
            "weights_digest": state_digest(state.weights),
        }
        del weights_blob, server_blob
        _write_file(tmp / _STATE, json.dumps(meta, indent=1, allow_nan=False).encode("utf-8"))
        _fsync_dir(tmp)
        if final.exists():  # the same round written again (a resumed run redoing it): swap it out
            old = root / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / f".tmp-{_LATEST}-{os.getpid()}"
        _write_file(latest_tmp, final.name.encode("ascii") + b"\n")
        os.replace(latest_tmp, root / _LATEST)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    logger.info("checkpoint written: %s", final)
    return final


def _prune(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints, each renamed out of the way before it is deleted.

    Deleting a folder file by file is not atomic: a process killed halfway would leave a
    ``round-*`` folder without its ``state.json``. Renamed first (atomic), a folder is either a whole
    checkpoint or a ``.tmp-*`` leftover that the next save removes.
    """
    rounds = sorted(p for p in root.glob("round-*") if p.is_dir())
    for old in rounds[:-keep] if keep > 0 else []:
        doomed = root / f".tmp-pruned-{old.name}"
        shutil.rmtree(doomed, ignore_errors=True)  # a leftover of the same name would refuse the rename
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _complete(root: Path, name: str) -> bool:
    return _ROUND_NAME.fullmatch(name) is not None and (root / name / _STATE).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``LATEST`` names, or None when the run directory has no complete checkpoint.

    When ``LATEST`` is missing, unreadable or names no complete folder (a file deleted by hand, a
    damaged disk, a crash before a new run's first ``LATEST``) while complete ``round-*`` folders
    exist, the newest of them is the answer, with a warning: a folder only ever appears whole (it is
    renamed into place), so it is a checkpoint the run reached, and a run directory holding one must
    never look empty (a new run would write over it).
    """
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / _LATEST).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _complete(root, name):
        return root / name
    found = sorted(p.name for p in root.glob("round-*") if _complete(root, p.name)) if root.is_dir() else []
    if not found:
        return None
    logger.warning(
        "%s: %s names no complete checkpoint (%r); taking the newest complete folder, %s",
        root,
        _LATEST,
        name,
        found[-1],
    )
    return root / found[-1]


def load_checkpoint(path: str | Path) -> EngineState:
    """Read one checkpoint folder, verifying both tensor files against the sha256 in ``state.json``."""
    path = Path(path)
    try:
        meta = json.loads((path / _STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {path}: cannot read {_STATE}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"checkpoint {path}: unsupported checkpoint version {meta.get('version')!r}")
    files = meta.get("files", {})
    for name in (_WEIGHTS, _SERVER):
        actual = _file_sha256(path / name) if (path / name).is_file() else "missing"
        if actual != files.get(name):
            raise ConfigError(f"checkpoint {path}: {name} is corrupt or missing (sha256 {actual})")
    weights = safetensors.torch.load_file(str(path / _WEIGHTS))
    server = safetensors.torch.load_file(str(path / _SERVER))
    salience = Salience(server["salience/heads"], server["salience/ffn"], str(meta.get("salience_method", "")))
    optimizer = {k[len("optimizer/") :]: t for k, t in server.items() if k.startswith("optimizer/")}
    return EngineState(
        run_id=str(meta["run_id"]),
        round=int(meta["round"]),
        task=str(meta["task"]),
        model_config=meta["model_config"],
        weights=weights,
        salience=salience,
        strategy=str(meta["strategy"]),
        optimizer_state=optimizer,
        devices=meta.get("devices", {}),
        history=tuple(meta.get("history", ())),
        model_name=str(meta.get("model_name", "")),
    )
