"""Greedy text generation from an exported decoder LLM, with ONNX Runtime, tokenizers and numpy only.

A *generation folder* is what :func:`edge_sdk.serving._export_lm.export_causal_lm` writes (and what
``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained`` loads): ``model.onnx`` (fp32) and/or
``model_quantized.onnx`` (int8), ``config.json``, ``generation_config.json``, ``tokenizer.json`` and
``edge_manifest.json`` (checksums, checked on load). The graph takes ``input_ids``, ``attention_mask``,
``position_ids`` and one ``past_key_values.<layer>.key|value`` per layer (batch, KV heads, past length,
head dim), and returns ``logits`` and the ``present.<layer>.key|value`` caches, past and new positions
together.

Decoding (batch 1): the prompt's tokens ``x_1..x_n`` run once (*prefill*, empty caches) and the next token
is ``argmax`` of the last position's logits; every later step feeds only the token just chosen, at
position ``n + k``, with the caches the previous step returned (fed back as ONNX Runtime values, never
copied to numpy). It stops at an end-of-sequence token (``generation_config.json``'s ``eos_token_id``,
else ``config.json``'s; the eos token is not part of the text), after ``max_new_tokens``, or when the
sequence reaches the model's ``max_position_embeddings``.

Text is streamed with ``tokenizers``' ``DecodeStream``: a piece is yielded as soon as its bytes form
whole characters, so the concatenated pieces are exactly the decoded text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edge_sdk._errors import ConfigError, ModelLoadError
from edge_sdk.serving._infer import (
    CONFIG_NAME,
    MANIFEST_NAME,
    MODEL_FP32,
    MODEL_INT8,
    TOKENIZER_NAME,
    _read_json,
    _session,
    _verify,
)

__all__ = [
    "GENERATION_CONFIG_NAME",
    "MAX_NEW_TOKENS",
    "Generation",
    "GenerationStream",
    "Generator",
    "Token",
    "is_generation_folder",
    "load_generator",
]

logger = logging.getLogger(__name__)

GENERATION_CONFIG_NAME = "generation_config.json"
MAX_NEW_TOKENS = 1 << 16  # a hard ceiling on one call's new tokens, whatever the caller asks
_PAST = "past_key_values."
_PRESENT = "present."
StopReason = Literal["eos", "max_new_tokens", "max_length"]


@dataclass(frozen=True)
class Token:
    """One generated token: its id, the text it completes (may be empty until a character is whole)."""

    id: int
    text: str
    index: int  # 0 for the token the prefill produced


@dataclass(frozen=True)
class Generation:
    """A finished greedy generation and its timings.

    ``prefill_ms``: the prompt's forward pass (and the first token's choice); ``decode_ms``: the cached
    steps after it (model and argmax only: the time a consumer of the stream spends between tokens is not
    counted). ``tokens_per_s``: tokens chosen (the eos token that stopped it included) per second of
    both; ``decode_tokens_per_s``: tokens chosen by the cached steps per second of those steps.
    """

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # new tokens, the eos token excluded
    text: str
    stop: StopReason
    prefill_ms: float
    decode_ms: float
    model: str

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_ms + self.decode_ms
        return 1e3 * self.steps / total if total > 0 else 0.0

    @property
    def steps(self) -> int:
        """Forward passes run: new tokens plus the eos token when it stopped the generation."""
        return len(self.token_ids) + (1 if self.stop == "eos" else 0)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1e3 * (self.steps - 1) / self.decode_ms if self.decode_ms > 0 and self.steps > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "text": self.text,
            "prompt_tokens": len(self.prompt_ids),
            "token_ids": list(self.token_ids),
            "stop": self.stop,
            "prefill_ms": self.prefill_ms,
            "decode_ms": self.decode_ms,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


class GenerationStream:
    """An iterator of :class:`Token` as they are produced; :attr:`result` once it is exhausted.

    The tokens' texts hold back bytes that do not yet form a whole character; once the stream is
    exhausted, :attr:`remainder` is what the full decode adds after them (usually "", else the
    replacement characters of a cut multi-byte character), so pieces + remainder = ``result.text``.
    """

    def __init__(self, steps: Iterator[Token], finish: Callable[[], Generation]) -> None:
        self._steps = steps
        self._finish = finish
        self._result: Generation | None = None
        self._emitted: list[str] = []

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Token:
        try:
            token = next(self._steps)
        except StopIteration:
            self._result = self._finish()
            raise
        self._emitted.append(token.text)
        return token

    @property
    def remainder(self) -> str:
        text, emitted = self.result.text, "".join(self._emitted)
        return text[len(emitted) :] if text.startswith(emitted) else ""

    @property
    def result(self) -> Generation:
        if self._result is None:
            for _ in self:
                pass
        assert self._result is not None
        return self._result


@dataclass(frozen=True)
class _Cache:
    """The graph's cache inputs: names in layer order, each (KV heads, head dim) and element type."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    dtype: type[np.generic]


class Generator:
    """A loaded generation folder: tokenizer + ONNX Runtime session. Build it with :func:`load_generator`."""

    def __init__(
        self,
        *,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        eos_ids: frozenset[int],
        max_positions: int,
        model_path: Path,
        threads: int | None,
    ) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_positions = max_positions
        self.model_path = model_path
        self.threads = threads
        self._cache = _cache_inputs(session, model_path)
        self._outputs = ("logits", *(_PRESENT + n[len(_PAST) :] for n in self._cache.names))

    @property
    def quantized(self) -> bool:
        return self.model_path.name == MODEL_INT8

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, with the special tokens the tokenizer adds (as ``tokenizer(prompt)``)."""
        if not isinstance(prompt, str):
            raise ConfigError(f"the prompt must be a string, got {type(prompt).__name__}")
        return list(self._tokenizer.encode(prompt).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64) -> GenerationStream:
        """Greedy tokens after ``prompt`` (a text, or token ids), one at a time as they are produced."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        self._check(ids, max_new_tokens)
        state: dict[str, Any] = {"new": [], "stop": "max_new_tokens", "prefill_ms": 0.0, "decode_ms": 0.0}

        def finish() -> Generation:
            return Generation(
                prompt_ids=tuple(ids), token_ids=tuple(state["new"]), text=self.decode(state["new"]),
                stop=state["stop"], prefill_ms=state["prefill_ms"], decode_ms=state["decode_ms"],
                model=str(self.model_path),
            )  # fmt: skip

        return GenerationStream(self._steps(ids, max_new_tokens, state), finish)

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64) -> Generation:
        """Greedy generation after ``prompt``, run to its end."""
        return self.stream(prompt, max_new_tokens=max_new_tokens).result

    def _check(self, ids: Sequence[int], max_new_tokens: int) -> None:
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        if not ids:
            raise ConfigError("the prompt has no tokens")
        if len(ids) > self.max_positions:
            raise ConfigError(f"the prompt has {len(ids)} tokens; the model takes at most {self.max_positions}")
        vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"prompt token ids must be in 0..{vocab - 1}")

    def _steps(self, ids: list[int], max_new_tokens: int, state: dict[str, Any]) -> Iterator[Token]:
        """Prefill, then one cached step per token; fills ``state`` (new ids, stop reason, timings)."""
        past = self._empty_cache()
        decoder = DecodeStream(skip_special_tokens=True)
        current, length = ids, 0
        for index in range(max_new_tokens):
            started = time.perf_counter()
            logits, past = self._forward(current, length, past)
            token = int(np.argmax(logits))
            state["prefill_ms" if index == 0 else "decode_ms"] += (time.perf_counter() - started) * 1e3
            if token in self.eos_ids:
                state["stop"] = "eos"
                return
            state["new"].append(token)
            yield Token(id=token, text=decoder.step(self._tokenizer, token) or "", index=index)
            length += len(current)
            current = [token]
            if length >= self.max_positions:
                state["stop"] = "max_length"
                return

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """The logits at every position of ``ids`` (shape ``(len(ids), vocab)``), in one pass from empty
        caches: what the export's parity and drift checks compare."""
        ids = [int(i) for i in ids]
        self._check(ids, 1)
        feed = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None, :],
        }
        past = {
            n: np.zeros((1, h, 0, d), dtype=self._cache.dtype)
            for n, (h, d) in zip(self._cache.names, self._cache.shapes, strict=True)
        }
        return np.asarray(self._session.run(["logits"], {**feed, **past})[0][0], dtype=np.float32)

    def greedy_logits(self, ids: Sequence[int], n: int) -> tuple[list[int], np.ndarray]:
        """``n`` greedy tokens after ``ids`` (eos not stopping them) and the logits each was chosen from
        (shape ``(n, vocab)``): the cached path the export's parity check compares with torch."""
        ids = [int(i) for i in ids]
        self._check(ids, n)
        past = self._empty_cache()
        current, length, tokens, rows = ids, 0, [], []
        for _ in range(n):
            logits, past = self._forward(current, length, past)
            tokens.append(int(np.argmax(logits)))
            rows.append(logits)
            length += len(current)
            current = tokens[-1:]
        return tokens, np.stack(rows)

    def _forward(self, tokens: list[int], past_length: int, past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """The last position's logits after ``tokens`` (at positions ``past_length...``), and the new caches."""
        n = len(tokens)
        feed: dict[str, Any] = {
            "input_ids": _value(np.asarray([tokens], dtype=np.int64)),
            "attention_mask": _value(np.ones((1, past_length + n), dtype=np.int64)),
            "position_ids": _value(np.arange(past_length, past_length + n, dtype=np.int64)[None, :]),
            **past,
        }
        outputs = self._session.run_with_ort_values(list(self._outputs), feed)
        logits = outputs[0].numpy()
        new_past = dict(zip(self._cache.names, outputs[1:], strict=True))
        return np.asarray(logits[0, -1], dtype=np.float32), new_past

    def _empty_cache(self) -> dict[str, Any]:
        return {
            name: _value(np.zeros((1, heads, 0, dim), dtype=self._cache.dtype))
            for name, (heads, dim) in zip(self._cache.names, self._cache.shapes, strict=True)
        }

    def __repr__(self) -> str:
        return f"Generator(model={str(self.model_path)!r}, max_positions={self.max_positions}, threads={self.threads})"


def _value(array: np.ndarray) -> Any:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _cache_inputs(session: ort.InferenceSession, model_path: Path) -> _Cache:
    """The graph's cache inputs (per layer, static KV heads and head dim: layers may differ)."""
    inputs = {i.name: i for i in session.get_inputs()}
    missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in inputs]
    if missing:
        raise ModelLoadError(f"{model_path} is not a decoder with a KV cache: it has no input(s) {missing}")
    names = tuple(n for n in inputs if n.startswith(_PAST))
    if not names or len(names) % 2:
        raise ModelLoadError(f"{model_path} has no key/value cache inputs ({_PAST}<layer>.key|value)")
    unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "position_ids", *names})
    if unknown:
        raise ModelLoadError(f"{model_path} needs inputs this runtime cannot build: {unknown}")
    shapes = []
    for name in names:
        shape = inputs[name].shape
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ModelLoadError(
                f"{model_path}: cache input {name} has shape {shape}, expected (batch, heads, past, dim)"
            )
        shapes.append((int(shape[1]), int(shape[3])))
    elem = inputs[names[0]].type
    types: dict[str, type[np.generic]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    dtype = types.get(elem)
    if dtype is None:
        raise ModelLoadError(f"{model_path}: cache element type {elem} is not supported")
    outputs = {o.name for o in session.get_outputs()}
    absent = [n for n in ("logits", *(_PRESENT + n[len(_PAST) :] for n in names)) if n not in outputs]
    if absent:
        raise ModelLoadError(f"{model_path} lacks the output(s) {absent[:4]}")
    return _Cache(names=names, shapes=tuple(shapes), dtype=dtype)


def is_generation_folder(model_dir: str | Path) -> bool:
    """Whether ``model_dir``'s manifest (or config) says it holds a causal LM."""
    root = Path(model_dir)
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        try:
            model = _read_json(manifest).get("model")
        except ConfigError:
            return False
        return isinstance(model, dict) and model.get("task") == "causal-lm"
    config = root / CONFIG_NAME
    try:
        names = _read_json(config).get("architectures") if config.is_file() else None
    except ConfigError:
        return False
    return isinstance(names, list) and any(str(n).endswith("ForCausalLM") for n in names)


def load_generator(
    model_dir: str | Path,
    *,
    threads: int | None = None,
    prefer_quantized: bool = False,
    verify: bool = True,
    model_file: str | None = None,
) -> Generator:
    """Load a generation folder.

    ``threads``: ONNX Runtime intra-op threads (None: its default). ``prefer_quantized``: serve
    ``model_quantized.onnx`` when present (default: the fp32 ``model.onnx``, whose tokens match torch;
    either falls back to the file that exists). ``verify``: check the files against the manifest's sha256.
    ``model_file``: load this file of the folder instead (the export's checks: its skeleton of
    ``model.onnx``).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"model folder {str(root)!r} does not exist or is not a directory")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    order: tuple[str, ...] = (MODEL_INT8, MODEL_FP32) if prefer_quantized else (MODEL_FP32, MODEL_INT8)
    order = (model_file,) if model_file is not None else order
    model_path = next((root / n for n in order if (root / n).is_file()), None)
    if model_path is None:
        raise ConfigError(f"{str(root)!r} holds no ONNX model (expected {MODEL_FP32} or {MODEL_INT8})")
    for name in (CONFIG_NAME, TOKENIZER_NAME):
        if not (root / name).is_file():
            raise ConfigError(f"{str(root)!r} has no {name}")
    config = _read_json(root / CONFIG_NAME)
    if verify and (root / MANIFEST_NAME).is_file():
        _verify(_read_json(root / MANIFEST_NAME), (model_path, root / CONFIG_NAME, root / TOKENIZER_NAME))
    try:
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_NAME))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"cannot load the tokenizer {root / TOKENIZER_NAME}: {exc}") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    generation = _read_json(root / GENERATION_CONFIG_NAME) if (root / GENERATION_CONFIG_NAME).is_file() else {}
    positions = config.get("max_position_embeddings")
    return Generator(
        session=_session(model_path, threads),
        tokenizer=tokenizer,
        eos_ids=_eos_ids(generation.get("eos_token_id", config.get("eos_token_id"))),
        max_positions=int(positions) if isinstance(positions, int) and positions > 1 else 1 << 30,
        model_path=model_path,
        threads=threads,
    )


def _eos_ids(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"eos_token_id must be a token id or a list of them, got {value!r}")
    return frozenset(int(v) for v in values)
