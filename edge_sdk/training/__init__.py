"""Training on the device: data, the local training loop, and the task runner.

The coordinator's simulator runs virtual devices through this same face (the device's own trainer,
not a copy), and its validator reads and evaluates data with the same pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_face

_NAMES: dict[str, str] = {
    "DataFile": "edge_sdk.training._formats",
    "DataFormat": "edge_sdk.training._formats",
    "FORMATS": "edge_sdk.training._formats",
    "LabelMap": "edge_sdk.training._labels",
    "PromptDataset": "edge_sdk.training._prompts",
    "PromptTokenizer": "edge_sdk.training._prompts",
    "encode_prompts": "edge_sdk.training._prompts",
    "evaluate_lm": "edge_sdk.training._train",
    "is_prompt_file": "edge_sdk.training._prompts",
    "model_task": "edge_sdk.training._runner",
    "read_prompts": "edge_sdk.training._prompts",
    "read_rows": "edge_sdk.training._formats",
    "Encoded": "edge_sdk.training._data",
    "ImageDataset": "edge_sdk.training._images",
    "ImageFolder": "edge_sdk.training._images",
    "ImageProcessing": "edge_sdk.training._images",
    "RUNTIME_MODULES": "edge_sdk.training._runtime",
    "TaskCancelledError": "edge_sdk.training._runner",
    "TaskRunner": "edge_sdk.training._runner",
    "TextDataset": "edge_sdk.training._runner",
    "TextExample": "edge_sdk.training._data",
    "TrainConfig": "edge_sdk.training._train",
    "TrainResult": "edge_sdk.training._train",
    "default_max_length": "edge_sdk.training._data",
    "encode": "edge_sdk.training._data",
    "evaluate": "edge_sdk.training._train",
    "image_seq_len": "edge_sdk.training._images",
    "iter_batches": "edge_sdk.training._data",
    "load_tokenizer": "edge_sdk.training._data",
    "peak_rss_bytes": "edge_sdk.training._train",
    "prepare_runtime": "edge_sdk.training._runtime",
    "proximal_term": "edge_sdk.training._train",
    "read_image_folder": "edge_sdk.training._images",
    "read_tsv": "edge_sdk.training._data",
    "split_batch": "edge_sdk.training._data",
    "train_local": "edge_sdk.training._train",
    "trained_tensors": "edge_sdk.training._levers",
    "trim": "edge_sdk.training._data",
    "warm_up": "edge_sdk.training._runner",
}

__all__ = [
    "FORMATS",
    "RUNTIME_MODULES",
    "DataFile",
    "DataFormat",
    "Encoded",
    "ImageDataset",
    "ImageFolder",
    "ImageProcessing",
    "LabelMap",
    "PromptDataset",
    "PromptTokenizer",
    "TaskCancelledError",
    "TaskRunner",
    "TextDataset",
    "TextExample",
    "TrainConfig",
    "TrainResult",
    "default_max_length",
    "encode",
    "encode_prompts",
    "evaluate",
    "evaluate_lm",
    "image_seq_len",
    "is_prompt_file",
    "iter_batches",
    "load_tokenizer",
    "model_task",
    "peak_rss_bytes",
    "prepare_runtime",
    "proximal_term",
    "read_image_folder",
    "read_prompts",
    "read_rows",
    "read_tsv",
    "split_batch",
    "train_local",
    "trained_tensors",
    "trim",
    "warm_up",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk.training._data import (
        Encoded,
        TextExample,
        default_max_length,
        encode,
        iter_batches,
        load_tokenizer,
        read_tsv,
        split_batch,
        trim,
    )
    from edge_sdk.training._formats import FORMATS, DataFile, DataFormat, read_rows
    from edge_sdk.training._images import ImageDataset, ImageFolder, ImageProcessing, image_seq_len, read_image_folder
    from edge_sdk.training._labels import LabelMap
    from edge_sdk.training._levers import trained_tensors
    from edge_sdk.training._prompts import PromptDataset, PromptTokenizer, encode_prompts, is_prompt_file, read_prompts
    from edge_sdk.training._runner import TaskCancelledError, TaskRunner, TextDataset, model_task, warm_up
    from edge_sdk.training._runtime import RUNTIME_MODULES, prepare_runtime
    from edge_sdk.training._train import (
        TrainConfig,
        TrainResult,
        evaluate,
        evaluate_lm,
        peak_rss_bytes,
        proximal_term,
        train_local,
    )
