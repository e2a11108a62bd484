"""Server-side validation of the global model on a held-out data file (any format) or image folder: accuracy,
loss, macro-F1, majority share, recall; for a causal LM (:class:`PromptValidator`), the mean response-token
loss and the perplexity ``exp(loss)`` on held-out prompt/response records."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from edge_sdk import (
    DataFormat,
    Encoded,
    ImageDataset,
    ImageProcessing,
    LabelMap,
    PromptDataset,
    SubnetSpec,
    encode,
    evaluate,
    iter_batches,
    load_tokenizer,
    read_image_folder,
    read_prompts,
    read_rows,
)
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import ParentModel, build_model

__all__ = ["ImageValidator", "PromptValidator", "Validator", "calibration_batches"]

logger = logging.getLogger(__name__)


def _score(parent: ParentModel, batches: Iterator[dict[str, np.ndarray]]) -> Mapping[str, float]:
    """The whole parent, built as a device builds its model, evaluated on ``batches``."""
    model = build_model(SubnetSpec.full(parent.dims), parent.config, parent.state, task=parent.task)
    with torch.inference_mode():
        return evaluate(model, batches)


class Validator:
    """Evaluates a parent model on a fixed, tokenized validation set (callable as an engine evaluator)."""

    def __init__(
        self,
        data: str | Path,
        tokenizer_dir: str | Path,
        *,
        seq_len: int,
        batch_size: int = 32,
        limit: int | None = None,
        format: DataFormat | None = None,
        labels: LabelMap | None = None,
    ) -> None:
        rows = read_rows(data, format, limit=limit)
        if not rows.rows:
            raise ConfigError(f"the validation file {data} has no examples")
        examples = (labels or LabelMap.infer(rows.labels)).examples(rows)
        self.data: Encoded = encode(load_tokenizer(tokenizer_dir, seq_len), examples)
        self.batch_size = batch_size
        logger.info("validation set: %d examples from %s", len(self.data), data)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self.data, self.batch_size, seed=0, shuffle=False)

    def __call__(self, parent: ParentModel) -> Mapping[str, float]:
        return _score(parent, self.batches())


class PromptValidator:
    """Evaluates a causal LM on held-out prompt/response records: ``loss`` (mean negative log-likelihood
    of the response tokens, every token weighing the same), ``perplexity`` (``exp(loss)``), ``tokens``.
    The records are tokenized as devices tokenize theirs (``PromptDataset``)."""

    def __init__(
        self,
        data: str | Path,
        tokenizer_dir: str | Path,
        *,
        seq_len: int,
        batch_size: int = 32,
        limit: int | None = None,
        format: DataFormat | None = None,
    ) -> None:
        records = PromptDataset(read_prompts(data, format, limit=limit), tokenizer_dir)
        self.data: Encoded = records.encoded(seq_len)
        self.batch_size = batch_size
        logger.info("validation set: %d prompt/response records from %s", len(self.data), data)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self.data, self.batch_size, seed=0, shuffle=False)

    def __call__(self, parent: ParentModel) -> Mapping[str, float]:
        return _score(parent, self.batches())


class ImageValidator:
    """Evaluates a parent model on an image folder (one sub-folder per class, labels = sorted names),
    preprocessed as the model folder's ``preprocessor_config.json`` says (its size checked against the
    model's ``image_size`` at the first evaluation)."""

    def __init__(
        self,
        data: str | Path,
        processor_dir: str | Path | None,
        *,
        batch_size: int = 32,
        limit: int | None = None,
    ) -> None:
        folder = read_image_folder(data, limit=limit)
        self.data = ImageDataset(folder, ImageProcessing.from_model_dir(processor_dir))
        self.batch_size = batch_size
        logger.info("validation set: %d images of %d classes from %s", len(self.data), len(folder.classes), data)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        return self.data.eval_batches(self.batch_size)

    def __call__(self, parent: ParentModel) -> Mapping[str, float]:
        self.data.fit_model(parent.config)
        return _score(parent, self.batches())


def calibration_batches(
    validator: Validator | PromptValidator | ImageValidator, count: int = 4
) -> list[dict[str, torch.Tensor]]:
    """A few validation batches as torch tensors (inputs for activation-aware salience)."""
    out = []
    for i, batch in enumerate(validator.batches()):
        if i >= count:
            break
        out.append({k: torch.as_tensor(v) for k, v in batch.items()})
    return out
