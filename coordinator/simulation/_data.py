"""The data of a simulation: what devices train on (a shard each) and what the global model is scored on.

A :class:`SimData` is a small, picklable *description* (a data file, or the seed of a synthetic set):
it travels to worker processes (or Ray workers) with each task, and each worker materialises the
device's shard there as a :class:`~edge_sdk.training._runner.BatchSource`, the same kind of object a real
device hands its :class:`~edge_sdk.training._runner.TaskRunner`. Examples are read once per worker process.

- :class:`TsvData`: a file of labelled texts (CSV, TSV, JSON Lines, Parquet: ``edge_sdk.read_rows``),
  the run's label map and the model's tokenizer; a shard is an
  :class:`~edge_sdk.training._runner.TextDataset` of the file's rows, exactly what ``edge-sdk join
  --data`` builds: it maps its labels when a task brings the run's label map.
- :class:`SyntheticData`: random token ids with a learnable label rule (no tokenizer): fast tests.
- :class:`ImageFolderData`: an image folder (one sub-folder per class) for ViT; a shard is an
  :class:`~edge_sdk.ImageDataset`, what ``edge-sdk join --data DIR`` builds.

Evaluators score the global (full) model after every round: :class:`FastValidator` on a file (padding
trimmed per batch of similar lengths: the attention mask makes the result the same as scoring the
padded batch, at a fraction of the cost), :class:`SyntheticEvaluator` on a held-out synthetic set and
:class:`ImageEvaluator` on an image folder.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk import (
    DataFile,
    DataFormat,
    Encoded,
    ImageDataset,
    ImageProcessing,
    LabelMap,
    SubnetSpec,
    encode,
    iter_batches,
    load_tokenizer,
    read_image_folder,
    read_rows,
)
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import ParentModel

if TYPE_CHECKING:
    from edge_sdk import TextDataset

__all__ = [
    "FastValidator",
    "ImageEvaluator",
    "ImageFolderData",
    "SimData",
    "SyntheticData",
    "SyntheticEvaluator",
    "TokenDataset",
    "TsvData",
]


@functools.lru_cache(maxsize=4)
def read_file(path: str, fmt: DataFormat, limit: int | None) -> DataFile:
    """The rows of a data file (read once per process)."""
    return read_rows(path, fmt, limit=limit)


@dataclass(frozen=True)
class TsvData:
    """A file of labelled texts (any format ``format`` reads), tokenized with ``tokenizer`` (a folder
    holding tokenizer.json); ``labels`` is the run's label map."""

    path: Path
    tokenizer: Path
    limit: int | None = None  # read at most this many rows
    format: DataFormat = field(default_factory=DataFormat)
    label_map: LabelMap | None = None  # None: inferred from this file

    def rows(self) -> DataFile:
        return read_file(str(self.path), self.format, self.limit)

    def labels(self) -> np.ndarray:
        rows = self.rows()
        examples = (self.label_map or LabelMap.infer(rows.labels)).examples(rows)
        return np.asarray([e.label for e in examples], dtype=np.int64)

    def source(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The device's shard as a TextDataset of the file's rows (what a real device builds from its
        own file; its labels are mapped when a task brings the run's label map)."""
        from edge_sdk import TextDataset

        return TextDataset(self.rows().subset([int(i) for i in indices]), self.tokenizer)


class TokenDataset:
    """Pre-tokenized examples as a BatchSource (the runner's interface: ``len`` and ``batches``)."""

    def __init__(self, encoded: Encoded, vocab_size: int) -> None:
        self.encoded = encoded
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.encoded)

    def _cut(self, seq_len: int) -> Encoded:
        e = self.encoded
        if seq_len > e.input_ids.shape[1]:
            raise ConfigError(f"the synthetic data has sequences of {e.input_ids.shape[1]}, not {seq_len}")
        return Encoded(e.input_ids[:, :seq_len], e.attention_mask[:, :seq_len], e.token_type_ids[:, :seq_len], e.labels)

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self._cut(seq_len), batch_size, seed=seed, shuffle=True)

    def eval_batches(self, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self._cut(seq_len), batch_size, seed=0, shuffle=False)


@dataclass(frozen=True)
class SyntheticData:
    """``size`` random sequences of token ids; the label says whether the first token is in the upper
    half of the vocabulary (learnable by a tiny model in a few steps). ``seed`` fixes everything."""

    size: int
    vocab_size: int
    seq_len: int
    seed: int = 0

    def encoded(self) -> Encoded:
        rng = np.random.default_rng(self.seed)
        ids = rng.integers(4, self.vocab_size, size=(self.size, self.seq_len), dtype=np.int64)
        labels = (ids[:, 1] >= (self.vocab_size + 4) // 2).astype(np.int64)
        ids[:, 0] = 2  # a [CLS]-like first token
        return Encoded(ids, np.ones_like(ids), np.zeros_like(ids), labels)

    def labels(self) -> np.ndarray:
        return self.encoded().labels

    def source(self, indices: Sequence[int] | np.ndarray) -> TokenDataset:
        e = self.encoded()
        idx = np.asarray(indices, dtype=np.int64)
        part = Encoded(e.input_ids[idx], e.attention_mask[idx], e.token_type_ids[idx], e.labels[idx])
        return TokenDataset(part, self.vocab_size)


@functools.lru_cache(maxsize=4)
def _image_folder(path: str, limit: int | None, check: bool) -> Any:
    return read_image_folder(path, limit=limit, check=check)


@dataclass(frozen=True)
class ImageFolderData:
    """An image folder (one sub-folder per class), preprocessed as ``processor``'s
    ``preprocessor_config.json`` says (a model folder; None: the defaults at the model's size)."""

    path: Path
    processor: Path | None = None
    limit: int | None = None  # use at most this many images (every class kept)

    def check(self) -> None:
        """Open every image once (a corrupt one is a ConfigError naming it): call before the model loads."""
        _image_folder(str(self.path), self.limit, True)

    def labels(self) -> np.ndarray:
        return np.asarray(_image_folder(str(self.path), self.limit, False).labels(), dtype=np.int64)

    def classes(self) -> tuple[str, ...]:
        """The class names (sorted sub-folder names)."""
        return _image_folder(str(self.path), self.limit, False).classes

    def source(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The device's shard as an ImageDataset (what a real device builds from its own folder)."""
        folder = _image_folder(str(self.path), self.limit, False)
        return ImageDataset(folder, ImageProcessing.from_model_dir(self.processor), indices=indices)


SimData = TsvData | SyntheticData | ImageFolderData


def _score(
    parent: ParentModel, batches: Iterator[Mapping[str, np.ndarray]], spec: SubnetSpec | None = None
) -> dict[str, float]:
    import torch

    from edge_sdk import evaluate
    from edge_sdk.scaling import build_model, extract

    if spec is None or spec.is_full:
        model = build_model(SubnetSpec.full(parent.dims), parent.config, parent.state, task=parent.task)
    else:
        model = build_model(spec, parent.config, extract(parent, spec), task=parent.task)
    with torch.inference_mode():
        return dict(evaluate(model, batches))  # accuracy, loss, samples, macro-F1, majority share, recall


class FastValidator:
    """Accuracy and loss of the global model on a data file, batches of similar lengths, padding trimmed."""

    def __init__(
        self,
        data: str | Path,
        tokenizer_dir: str | Path,
        *,
        seq_len: int,
        batch_size: int = 64,
        limit: int | None = None,
        format: DataFormat | None = None,
        labels: LabelMap | None = None,
    ) -> None:
        rows = read_file(str(data), format or DataFormat(), limit)
        if not rows.rows:
            raise ConfigError(f"the validation file {data} has no examples")
        examples = (labels or LabelMap.infer(rows.labels)).examples(rows)
        encoded = encode(load_tokenizer(tokenizer_dir, seq_len), examples)
        lengths = encoded.attention_mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        self.data = Encoded(
            encoded.input_ids[order],
            encoded.attention_mask[order],
            encoded.token_type_ids[order],
            encoded.labels[order],
        )
        self.lengths = lengths[order]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.data)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        d = self.data
        for start in range(0, len(d), self.batch_size):
            stop = start + self.batch_size
            width = max(1, int(self.lengths[start:stop].max()))
            yield {
                "input_ids": d.input_ids[start:stop, :width],
                "attention_mask": d.attention_mask[start:stop, :width],
                "token_type_ids": d.token_type_ids[start:stop, :width],
                "labels": d.labels[start:stop],
            }

    def calibration_batches(self, count: int = 4) -> list[dict[str, object]]:
        """A few batches as torch tensors (inputs for activation-aware salience)."""
        import torch

        out: list[dict[str, object]] = []
        for i, batch in enumerate(self.batches()):
            if i >= count:
                break
            out.append({k: torch.as_tensor(v) for k, v in batch.items()})
        return out

    def __call__(self, parent: ParentModel) -> Mapping[str, float]:
        return _score(parent, self.batches())

    def score(self, parent: ParentModel, spec: SubnetSpec) -> Mapping[str, float]:
        """The same for the sub-network ``spec`` of ``parent`` (what a device of that width would hold)."""
        return _score(parent, self.batches(), spec)


class SyntheticEvaluator:
    """Accuracy and loss of the global model on a held-out synthetic set."""

    def __init__(self, data: SyntheticData, batch_size: int = 64) -> None:
        self.data = data.encoded()
        self.batch_size = batch_size

    def __call__(self, parent: ParentModel) -> Mapping[str, float]:
        return _score(parent, iter_batches(self.data, self.batch_size, seed=0, shuffle=False))

    def score(self, parent: ParentModel, spec: SubnetSpec) -> Mapping[str, float]:
        return _score(parent, iter_batches(self.data, self.batch_size, seed=0, shuffle=False), spec)


class ImageEvaluator:
    """Accuracy and loss of the global model on an image folder (see :class:`ImageFolderData`)."""

    def __init__(self, data: ImageFolderData, batch_size: int = 64) -> None:
        data.check()
        self.data = data.source(np.arange(len(data.labels())))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.data)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        return self.data.eval_batches(self.batch_size)

    def calibration_batches(self, count: int = 4) -> list[dict[str, object]]:
        """A few batches as torch tensors (inputs for activation-aware salience)."""
        import torch

        batches = self.data.eval_batches(self.batch_size)
        return [{k: torch.as_tensor(v) for k, v in b.items()} for _, b in zip(range(count), batches, strict=False)]

    def __call__(self, parent: ParentModel) -> Mapping[str, float]:
        self.data.fit_model(parent.config)
        return _score(parent, self.batches())

    def score(self, parent: ParentModel, spec: SubnetSpec) -> Mapping[str, float]:
        self.data.fit_model(parent.config)
        return _score(parent, self.batches(), spec)
