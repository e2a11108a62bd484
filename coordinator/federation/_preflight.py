"""Checks that come before the model loads: a run's data files and its model folder.

Loading a model and ranking it takes seconds; a typo in a data path or a file without the needed
columns should not wait for them. The daemon (``serve``) and the simulator call these first, then
load the model. Every data file is read through :func:`read_data`, the one place that names the
SDK's readers (the same one the validator and the simulator's data use), so a new reader or format
changes one line here.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_sdk import DataFormat, read_image_folder, read_prompts, read_rows
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import resolve_model_dir

__all__ = ["check_data_file", "check_model_folder", "read_data"]


def read_data(
    path: str | Path, data_format: DataFormat | None = None, *, limit: int | None = None, task: str | None = None
) -> int:
    """How many examples a data file (any format ``data_format`` names) or an image folder (one sub-folder
    per class, every image opened) holds, read with the SDK's readers; ConfigError on any problem: missing,
    unreadable, not UTF-8, without the needed columns, a corrupt image. ``task="causal-lm"``: the file holds
    prompt/response records (``read_prompts``), not labelled texts."""
    try:
        if Path(path).is_dir():
            return len(read_image_folder(path, limit=limit).files)
        if task == "causal-lm":
            return len(read_prompts(path, data_format, limit=limit))
        return len(read_rows(path, data_format, limit=limit).rows)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def check_data_file(
    path: str | Path,
    what: str,
    *,
    limit: int | None = None,
    data_format: DataFormat | None = None,
    task: str | None = None,
) -> int:
    """Read ``path`` (up to ``limit`` examples) as a run of ``task`` would; the number of examples.

    ``what`` names the file in errors (``"[validation] data"``). A file with no example is an error.
    """
    try:
        count = read_data(path, data_format, limit=limit, task=task)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if count == 0:
        raise ConfigError(f"{what}: {path} has no examples")
    return count


def check_model_folder(name: str | Path, *, tokenizer: bool = False) -> Path:
    """The model folder ``name`` resolves to, if it holds a readable ``config.json`` and safetensors
    weights (and ``tokenizer.json`` when ``tokenizer``); the weights are not read."""
    folder = resolve_model_dir(name)
    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder} is not a model folder: it has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config}: cannot be read as JSON: {exc}") from None
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{folder} has no .safetensors weights (pickled weights are not loaded)")
    if tokenizer and not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder} has no tokenizer.json")
    return folder
