"""Local text-classification data: read a TSV, tokenize with the model's tokenizer, batch.

Sequences are padded to a fixed length so a batch costs what the memory model predicts.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk._errors import ConfigError

__all__ = ["Encoded", "TextExample", "encode", "iter_batches", "load_tokenizer", "read_tsv"]


@dataclass(frozen=True)
class TextExample:
    text: str
    label: int
    text_pair: str | None = None


def read_tsv(path: str | Path, *, limit: int | None = None) -> list[TextExample]:
    """SST-2 style (``label``, ``sentence``) or RTE style (``sentence1``, ``sentence2``, ``label``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    out: list[TextExample] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        fields = set(reader.fieldnames or ())
        if "label" not in fields or not ({"sentence"} <= fields or {"sentence1", "sentence2"} <= fields):
            raise ConfigError(
                f"{path}: expected columns label+sentence or sentence1+sentence2+label, got {fields}"
            )
        for row in reader:
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{path}: line {reader.line_num}: label {row['label']!r} is not an integer"
                ) from None
            if "sentence" in row:
                out.append(TextExample(row["sentence"], label))
            else:
                out.append(TextExample(row["sentence1"], label, row["sentence2"]))
            if limit is not None and len(out) >= limit:
                break
    return out


def load_tokenizer(model_dir: str | Path, max_length: int):  # type: ignore[no-untyped-def]
    """The fast tokenizer of a model folder (``tokenizer.json``), padding and truncating to ``max_length``."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    pad_id = tok.token_to_id("[PAD]")
    pad_id = 0 if pad_id is None else pad_id
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id)
    return tok


@dataclass(frozen=True)
class Encoded:
    """A tokenized dataset: int64 arrays [n, seq] and labels [n]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(tokenizer, examples: Sequence[TextExample]) -> Encoded:  # type: ignore[no-untyped-def]
    if not examples:
        raise ConfigError("no examples to encode")
    if examples[0].text_pair is None:
        encs = tokenizer.encode_batch([e.text for e in examples])
    else:
        encs = tokenizer.encode_batch([(e.text, e.text_pair or "") for e in examples])
    return Encoded(
        np.asarray([e.ids for e in encs], dtype=np.int64),
        np.asarray([e.attention_mask for e in encs], dtype=np.int64),
        np.asarray([e.type_ids for e in encs], dtype=np.int64),
        np.asarray([e.label for e in examples], dtype=np.int64),
    )


def iter_batches(
    data: Encoded, batch_size: int, *, seed: int, shuffle: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of exactly ``batch_size`` rows (reshuffled each pass) when ``shuffle``;
    else one pass in order."""
    n = len(data)
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        if shuffle:
            rng.shuffle(order)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if shuffle and len(idx) < batch_size:
                idx = idx + order[: batch_size - len(idx)]
            yield {
                "input_ids": data.input_ids[idx],
                "attention_mask": data.attention_mask[idx],
                "token_type_ids": data.token_type_ids[idx],
                "labels": data.labels[idx],
            }
        if not shuffle:
            return
