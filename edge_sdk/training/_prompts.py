"""Causal-LM data: prompt/response records, tokenized so that the loss covers the response only.

The ``causal-lm`` task fine-tunes a decoder (``LlamaForCausalLM``) on records with a prompt and a
response (JSON Lines ``{"prompt": "Review: ...\\nSentiment:", "response": " positive"}``, or any
format :func:`~edge_sdk.training._formats.read_rows` reads; the columns are found by name or named
by ``DataFormat.prompt_column`` / ``response_column``). The response is kept exactly as written:
its leading space is part of the text the model learns to produce.

Tokens. A record is ``p = tokenize(prompt)``, ``r = tokenize(response) + [eos]`` (no special tokens
added by the tokenizer; ``eos`` when the tokenizer folder names one). The row is ``p + r`` and its
labels are ``-100`` on ``p`` and ``r`` on ``r``: Hugging Face's causal-LM loss shifts the labels by
one and ignores ``-100``, so it is the mean negative log-likelihood of the response tokens given
everything before them::

    loss = - (1 / |R|) sum_{t in R} log p(x_t | x_<t)        R: the response positions

A row longer than ``max_length`` loses the start of its prompt (the response is kept; a response
longer than ``max_length`` alone is cut at its end). Rows are padded on the right to the longest
row of their batch (``attention_mask`` 0, labels ``-100`` on padding), as classification batches are
(:func:`~edge_sdk.training._data.trim` cuts every array shaped like the mask, labels included).

Evaluation (:func:`lm_metrics`): the mean response-token loss over a whole data set (every response
token weighs the same, not every batch) and the perplexity ``exp(loss)``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._errors import ConfigError
from edge_sdk.training._data import Encoded, default_max_length, iter_batches
from edge_sdk.training._formats import DataFormat, find_column, read_records

__all__ = [
    "IGNORE_INDEX",
    "PromptFile",
    "PromptRow",
    "PromptTokenizer",
    "encode_prompts",
    "is_prompt_file",
    "lm_metrics",
    "read_prompts",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of a position the loss skips (Hugging Face's convention)
_PROMPTS = ("prompt", "instruction", "input", "question")
_RESPONSES = ("response", "completion", "output", "answer")
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>")
MAX_RECORD_CHARS = 1 << 20  # a prompt or response longer than this is an error, not a silent truncation


@dataclass(frozen=True)
class PromptRow:
    """One record as read: its prompt, its response (as written, spaces kept) and the line it ends on."""

    prompt: str
    response: str
    line: int = 0


@dataclass(frozen=True)
class PromptFile:
    """The prompt/response records of one file (or a subset of them)."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[PromptRow, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Sequence[int]) -> PromptFile:
        return PromptFile(self.path, self.columns, tuple(self.rows[int(i)] for i in indices))


def _column(columns: Sequence[str], named: str | None, candidates: Sequence[str], key: str, path: Path) -> str:
    if named is not None:
        found = find_column(columns, named)
        if found is None:
            raise ConfigError(f"{path}: {key} {named!r} is not a column; the file has {list(columns)}")
        return found
    for name in candidates:
        found = find_column(columns, name)
        if found is not None:
            return found
    raise ConfigError(
        f"{path}: no {key.split('_', maxsplit=1)[0]} column: the file has {list(columns)}; name it with {key}"
        f" (one of {', '.join(candidates)} is found by name)"
    )


def is_prompt_file(path: str | Path, fmt: DataFormat | None = None) -> bool:
    """Whether ``path`` holds prompt/response records: ``fmt`` names a prompt or response column, or
    the file's columns include a prompt and a response name (and no label column is named)."""
    fmt = fmt or DataFormat()
    if fmt.prompt_column is not None or fmt.response_column is not None:
        return True
    if fmt.label_column is not None or Path(path).is_dir():
        return False
    records, _ = read_records(Path(path), fmt)
    try:
        _, header = next(records)
    except StopIteration:
        return False
    finally:
        records.close()  # type: ignore[attr-defined]
    columns = tuple(header)
    has = [any(find_column(columns, n) for n in names) for names in (_PROMPTS, _RESPONSES)]
    return all(has)


def _text(place: str, column: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{place}: column {column!r} holds {value!r}, not text")
    if len(value) > MAX_RECORD_CHARS:
        raise ConfigError(f"{place}: column {column!r} holds {len(value)} characters (at most {MAX_RECORD_CHARS})")
    return value


def read_prompts(path: str | Path, fmt: DataFormat | None = None, *, limit: int | None = None) -> PromptFile:
    """The prompt/response records of ``path`` (at most ``limit``); a ConfigError names the file and
    line of a record without a prompt, or with an empty response."""
    path, fmt = Path(path), fmt or DataFormat()
    records, where = read_records(path, fmt)
    try:
        _, header = next(records)
    except StopIteration:
        raise ConfigError(f"{path} is empty: expected records with a prompt and a response") from None
    columns = tuple(header)
    prompt = _column(columns, fmt.prompt_column, _PROMPTS, "prompt_column", path)
    response = _column(columns, fmt.response_column, _RESPONSES, "response_column", path)
    if prompt == response:
        raise ConfigError(f"{path}: the prompt and the response are the same column {prompt!r}")
    rows: list[PromptRow] = []
    for line, record in records:
        if limit is not None and len(rows) >= limit:
            break
        place = f"{path}: {where} {line}"
        missing = [c for c in (prompt, response) if c not in record]
        if missing:
            raise ConfigError(f"{place}: no value for column(s) {missing} (the row has {sorted(record)})")
        answer = _text(place, response, record[response])
        if not answer.strip():
            raise ConfigError(f"{place}: the response is empty: nothing to learn from this record")
        rows.append(PromptRow(_text(place, prompt, record[prompt]), answer, line))
    return PromptFile(path, columns, tuple(rows))


class PromptTokenizer:
    """A folder's ``tokenizer.json`` with its end-of-sequence and padding ids.

    ``eos``: ``tokenizer_config.json``'s ``eos_token``, else the folder's ``config.json``
    ``eos_token_id``, else a usual end token the vocabulary holds (``<|endoftext|>``, ``</s>``, ...),
    else none (no end token is appended). ``pad``: ``pad_token``, else ``eos``, else 0 (padding is
    masked and never scored, so its id only needs to exist).
    """

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{folder} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        settings = _json(folder / "tokenizer_config.json")
        self.eos = self._token_id(settings.get("eos_token"))
        if self.eos is None and isinstance(_json(folder / "config.json").get("eos_token_id"), int):
            self.eos = int(_json(folder / "config.json")["eos_token_id"])
        if self.eos is None:
            self.eos = next((i for i in map(self.tokenizer.token_to_id, _EOS_NAMES) if i is not None), None)
        pad = self._token_id(settings.get("pad_token"))
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, Mapping):
            token = token.get("content")
        return self.tokenizer.token_to_id(token) if isinstance(token, str) else None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def encode_prompts(tokenizer: PromptTokenizer, rows: Sequence[PromptRow], max_length: int) -> Encoded:
    """``rows`` as token ids ``prompt + response + eos`` with labels ``-100`` on the prompt and the
    padding; rows over ``max_length`` lose the start of their prompt; padded on the right to the
    longest row. ``labels`` is ``[n, seq]`` like ``input_ids``."""
    if not rows:
        raise ConfigError("no records to encode")
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 for causal-LM records, got {max_length}")
    prompts = tokenizer.ids([r.prompt for r in rows])
    end = [tokenizer.eos] if tokenizer.eos is not None else []
    answers = [ids + end for ids in tokenizer.ids([r.response for r in rows])]
    pairs = []
    for prompt, answer in zip(prompts, answers, strict=True):
        kept = answer[:max_length]
        room = max_length - len(kept)
        pairs.append((prompt[len(prompt) - room :] if room else [], kept))
    width = max(len(p) + len(r) for p, r in pairs)
    n = len(rows)
    ids = np.full((n, width), tokenizer.pad, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = p + r
        mask[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = r
    return Encoded(ids, mask, np.zeros_like(ids), labels)


def lm_metrics(loss_sum: float, tokens: int, samples: int) -> dict[str, float]:
    """``loss`` (the mean response-token loss: ``loss_sum / tokens``), ``perplexity`` (``exp(loss)``),
    ``tokens`` and ``samples``; NaN loss and perplexity without a scored token."""
    if tokens <= 0:
        return {"loss": math.nan, "perplexity": math.nan, "tokens": 0.0, "samples": float(samples)}
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": float(tokens),
        "samples": float(samples),
    }


class PromptDataset:
    """Prompt/response records as a device's data (the runner's ``BatchSource``), tokenized on demand
    for the sequence length a task asks for. ``holdout``: the last records are held back (never
    trained on), kept in :attr:`held_out`. No label map: the labels are the response's tokens."""

    task = "causal-lm"

    def __init__(self, records: PromptFile | Sequence[PromptRow], tokenizer_dir: str | Path, *, holdout: int = 0):
        rows = list(records.rows if isinstance(records, PromptFile) else records)
        if holdout < 0:
            raise ConfigError(f"holdout must be >= 0, got {holdout}")
        if len(rows) <= holdout:
            raise ConfigError(
                f"the local data set has {len(rows)} record(s): nothing left to train on"
                + (f" after holding back {holdout}" if holdout else "")
            )
        self.records, self.held_out = rows[: len(rows) - holdout], rows[len(rows) - holdout :]
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = PromptTokenizer(self.tokenizer_dir)  # loaded now: part of the runtime
        self._cache: tuple[int, Encoded] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encoded(self, seq_len: int) -> Encoded:
        with self._lock:
            if self._cache is None or self._cache[0] != seq_len:
                self._cache = (seq_len, encode_prompts(self.tokenizer, self.records, seq_len))
            return self._cache[1]

    def default_max_length(self, cap: int | None = None) -> int:
        """The 99.9th percentile of the records' token lengths, at most ``cap`` (max positions)."""
        return default_max_length(self.encoded(cap or 1 << 20).lengths, cap=cap)

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self.encoded(seq_len), batch_size, seed=seed, shuffle=True)

    def eval_batches(self, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self.encoded(seq_len), batch_size, seed=0, shuffle=False)
