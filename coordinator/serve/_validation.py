"""Server-side validation: accuracy and loss of the global model on a held-out data file (any format)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from edge_sdk import (
    DataFormat,
    Encoded,
    LabelMap,
    SubnetSpec,
    encode,
    evaluate,
    iter_batches,
    load_tokenizer,
    read_rows,
)
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import ParentModel, build_model

__all__ = ["Validator", "calibration_batches"]

logger = logging.getLogger(__name__)


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
        model = build_model(SubnetSpec.full(parent.dims), parent.config, parent.state, task=parent.task)
        with torch.inference_mode():
            return evaluate(model, self.batches())


def calibration_batches(validator: Validator, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """A few validation batches as torch tensors (inputs for activation-aware salience)."""
    out = []
    for i, batch in enumerate(validator.batches()):
        if i >= count:
            break
        out.append({k: torch.as_tensor(v) for k, v in batch.items()})
    return out
