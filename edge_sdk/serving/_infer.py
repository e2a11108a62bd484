"""Serve an exported sub-network with ONNX Runtime, without torch.

Only ``onnxruntime``, ``tokenizers`` and ``numpy`` are imported here, so a device with the inference-only
install can run it. A served folder is what :func:`edge_sdk.serving._export.export_onnx` writes:

- ``model.onnx`` (fp32) and/or ``model_quantized.onnx`` (dynamic int8, per-channel weights);
- ``config.json`` (labels from ``id2label``; ``problem_type``);
- ``tokenizer.json`` (a ``tokenizers`` file; the other tokenizer files are not needed here);
- ``edge_manifest.json`` (optional here: the maximum length and the files' sha256, checked on load).

Texts longer than the model's maximum length are truncated, and the result says so: a warning is logged
and :attr:`Prediction.truncated` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge_sdk._errors import ConfigError, ModelLoadError

__all__ = [
    "CONFIG_NAME",
    "MANIFEST_NAME",
    "MODEL_FP32",
    "MODEL_INT8",
    "TOKENIZER_NAME",
    "Encoded",
    "Prediction",
    "Predictor",
    "load",
    "sha256_file",
]

logger = logging.getLogger(__name__)

MODEL_FP32 = "model.onnx"
MODEL_INT8 = "model_quantized.onnx"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
MANIFEST_NAME = "edge_manifest.json"

_SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_FALLBACK_MAX_LENGTH = 512


@dataclass(frozen=True)
class Prediction:
    """One text's result: the top label, its score, every label's score, and whether the text was cut."""

    label: str
    score: float
    scores: dict[str, float]
    label_id: int
    truncated: bool
    n_tokens: int  # tokens given to the model, special tokens included, after truncation


@dataclass(frozen=True)
class Encoded:
    """A tokenized, right-padded batch: the model's inputs plus, per text, truncation and token count."""

    inputs: dict[str, np.ndarray]
    truncated: tuple[bool, ...]
    n_tokens: tuple[int, ...]


@dataclass(frozen=True)
class _Scored:
    logits: np.ndarray
    truncated: tuple[bool, ...]
    n_tokens: tuple[int, ...]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Predictor:
    """A loaded model: tokenizer + ONNX Runtime session + labels. Build it with :func:`load`."""

    def __init__(
        self,
        *,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        labels: tuple[str, ...],
        max_length: int,
        model_path: Path,
        threads: int | None,
        multi_label: bool = False,
    ) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length
        self.model_path = model_path
        self.threads = threads
        self.multi_label = multi_label
        self.input_names = tuple(i.name for i in session.get_inputs())
        outputs = [o.name for o in session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]

    @property
    def quantized(self) -> bool:
        return self.model_path.name == MODEL_INT8

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Tokenize ``texts`` (truncated to :attr:`max_length`, padded to the longest) into model inputs."""
        texts = _check_texts(texts)
        encodings = self._tokenizer.encode_batch(texts)
        arrays = {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }
        inputs = {name: arrays[name] for name in self.input_names}
        truncated = tuple(len(e.overflowing) > 0 for e in encodings)
        n_tokens = tuple(int(sum(e.attention_mask)) for e in encodings)
        return Encoded(inputs=inputs, truncated=truncated, n_tokens=n_tokens)

    def forward(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Run the session on tokenized arrays (``token_type_ids`` defaults to zeros); returns logits."""
        if "input_ids" not in inputs:
            raise ConfigError("model inputs need 'input_ids'")
        ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        if ids.ndim != 2:
            raise ConfigError(f"input_ids must be 2-D (batch, sequence), got shape {ids.shape}")
        feed: dict[str, np.ndarray] = {}
        for name in self.input_names:
            if name in inputs:
                feed[name] = np.asarray(inputs[name], dtype=np.int64)
            elif name == "attention_mask":
                feed[name] = np.ones_like(ids)
            else:  # token_type_ids
                feed[name] = np.zeros_like(ids)
            if feed[name].shape != ids.shape:
                raise ConfigError(f"{name} has shape {feed[name].shape}, input_ids {ids.shape}")
        logits = self._session.run([self.output_name], feed)[0]
        return np.asarray(logits, dtype=np.float32)

    def logits(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Logits of ``texts`` (rows in input order), computed in batches of similar lengths."""
        return self._run(_check_texts(texts), batch_size).logits

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]:
        """Classify ``texts``; a text longer than :attr:`max_length` is truncated and flagged."""
        run = self._run(_check_texts(texts), batch_size)
        probs = _scores(run.logits, multi_label=self.multi_label)
        results: list[Prediction] = []
        for row, cut, n in zip(probs, run.truncated, run.n_tokens, strict=True):
            best = int(np.argmax(row))
            results.append(
                Prediction(
                    label=self.labels[best],
                    score=float(row[best]),
                    scores={lab: float(p) for lab, p in zip(self.labels, row, strict=True)},
                    label_id=best,
                    truncated=cut,
                    n_tokens=n,
                )
            )
        n_cut = sum(p.truncated for p in results)
        if n_cut:
            logger.warning(
                "%d of %d text(s) longer than %d tokens were truncated", n_cut, len(results), self.max_length
            )
        return results

    def _run(self, texts: list[str], batch_size: int) -> _Scored:
        """Logits, truncation flags and token counts of ``texts``, in input order.

        Texts are batched by length (characters as a proxy) so little compute goes to padding.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        n_out = len(self.labels)
        logits = np.zeros((len(texts), n_out), dtype=np.float32)
        truncated = [False] * len(texts)
        n_tokens = [0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self.encode([texts[i] for i in idx])
            out = self.forward(enc.inputs)
            for row, i in enumerate(idx):
                logits[i] = out[row]
                truncated[i] = enc.truncated[row]
                n_tokens[i] = enc.n_tokens[row]
        return _Scored(logits=logits, truncated=tuple(truncated), n_tokens=tuple(n_tokens))

    def __repr__(self) -> str:
        return (
            f"Predictor(model={str(self.model_path)!r}, labels={self.labels}, "
            f"max_length={self.max_length}, threads={self.threads})"
        )


def load(
    model_dir: str | Path,
    *,
    threads: int | None = None,
    prefer_quantized: bool = True,
    max_length: int | None = None,
    verify: bool = True,
) -> Predictor:
    """Load a served folder.

    ``threads``: ONNX Runtime intra-op threads (None: its default, one per physical core).
    ``prefer_quantized``: use ``model_quantized.onnx`` when present, else ``model.onnx`` (and the other way
    round when False; either falls back to the file that exists).
    ``max_length``: truncation length; default the manifest's, else the tokenizer's/config's limit.
    ``verify``: check the files against the manifest's sha256 (when there is a manifest).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"model folder {str(root)!r} does not exist or is not a directory")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")

    model_path, config_path, tokenizer_path = _served_files(root, prefer_quantized)
    config = _read_json(config_path)
    manifest = _read_json(root / MANIFEST_NAME) if (root / MANIFEST_NAME).is_file() else None
    if verify and manifest is not None:
        _verify(manifest, (model_path, config_path, tokenizer_path))
    described = manifest.get("model") if manifest is not None else None
    if isinstance(described, dict) and described.get("task") == "causal-lm":
        raise ConfigError(f"{str(root)!r} holds a causal LM, not a classifier: generate text with `edge-sdk generate`")

    labels = _labels(config)
    limit = _max_length(root, config, manifest, max_length)
    tokenizer = _load_tokenizer(tokenizer_path, limit)
    session = _session(model_path, threads)

    predictor = Predictor(
        session=session,
        tokenizer=tokenizer,
        labels=labels,
        max_length=limit,
        model_path=model_path,
        threads=threads,
        multi_label=config.get("problem_type") == "multi_label_classification",
    )
    _check_signature(predictor, session, len(labels))
    logger.debug("loaded %r", predictor)
    return predictor


def _served_files(root: Path, prefer_quantized: bool) -> tuple[Path, Path, Path]:
    """(ONNX model, config, tokenizer) of a served folder: the preferred model file, falling back to
    the other one; a clear error naming the missing file."""
    order = (MODEL_INT8, MODEL_FP32) if prefer_quantized else (MODEL_FP32, MODEL_INT8)
    model_path = next((root / n for n in order if (root / n).is_file()), None)
    if model_path is None:
        raise ConfigError(f"{str(root)!r} holds no ONNX model (expected {MODEL_FP32} or {MODEL_INT8})")
    if model_path.name != order[0]:
        logger.info("%s not found in %s; using %s", order[0], root, model_path.name)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise ConfigError(f"{str(root)!r} has no {CONFIG_NAME} (labels and limits are read from it)")
    tokenizer_path = root / TOKENIZER_NAME
    if not tokenizer_path.is_file():
        raise ConfigError(f"{str(root)!r} has no {TOKENIZER_NAME}: the tokenizer is missing")
    return model_path, config_path, tokenizer_path


def _check_signature(predictor: Predictor, session: ort.InferenceSession, n_labels: int) -> None:
    """The graph's inputs must be ones this runtime builds, and its logits one per label."""
    model_path = predictor.model_path
    unknown = [n for n in predictor.input_names if n not in _SUPPORTED_INPUTS]
    if unknown:
        raise ModelLoadError(f"{model_path} needs inputs this runtime cannot build: {unknown}")
    out_shape = next(o.shape for o in session.get_outputs() if o.name == predictor.output_name)
    width = out_shape[-1] if out_shape else None
    if isinstance(width, int) and width != n_labels:
        raise ModelLoadError(f"{model_path} outputs {width} logits but {CONFIG_NAME} names {n_labels} labels")


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ConfigError("texts must be a sequence of strings, not one string")
    out = list(texts)
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise ConfigError(f"texts must be strings; got {sorted(set(bad))}")
    return out


def _scores(logits: np.ndarray, *, multi_label: bool) -> np.ndarray:
    if multi_label:
        return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float64)
    if logits.shape[-1] == 1:  # regression: the raw value is the score
        return logits.astype(np.float64)
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _verify(manifest: Mapping[str, Any], paths: Sequence[Path]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict):
        return
    for path in paths:
        entry = files.get(path.name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ModelLoadError(
                f"{path} is corrupt: sha256 {actual[:12]}... differs from the manifest's "
                f"{str(entry['sha256'])[:12]}... (re-export or re-download the model)"
            )


def _labels(config: Mapping[str, Any]) -> tuple[str, ...]:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            pairs = sorted((int(k), str(v)) for k, v in id2label.items())
        except ValueError as exc:
            raise ConfigError(f"{CONFIG_NAME}: id2label keys must be integers: {exc}") from exc
        if [k for k, _ in pairs] != list(range(len(pairs))):
            raise ConfigError(f"{CONFIG_NAME}: id2label ids must be 0..{len(pairs) - 1}")
        labels = tuple(v for _, v in pairs)
    else:
        n = int(config.get("num_labels", 2))
        labels = tuple(f"LABEL_{i}" for i in range(n))
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{CONFIG_NAME}: id2label has duplicate names: {labels}")
    return labels


def _max_length(
    root: Path, config: Mapping[str, Any], manifest: Mapping[str, Any] | None, requested: int | None
) -> int:
    positions = config.get("max_position_embeddings")
    ceiling = positions if isinstance(positions, int) and positions > 0 else None
    tok_cfg_path = root / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_max = _read_json(tok_cfg_path).get("model_max_length")
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            ceiling = tok_max if ceiling is None else min(ceiling, tok_max)
    if requested is not None:
        value = requested
    elif manifest is not None and isinstance(manifest.get("max_length"), int):
        value = int(manifest["max_length"])
    else:
        value = ceiling if ceiling is not None else _FALLBACK_MAX_LENGTH
    if value < 2:
        raise ConfigError(f"max_length must be >= 2, got {value}")
    if ceiling is not None and value > ceiling:
        raise ConfigError(f"max_length {value} exceeds the model's limit of {ceiling} positions")
    return value


def _load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"cannot load the tokenizer {path}: {exc}") from exc
    padding = tokenizer.padding or {}
    pad_id = int(padding.get("pad_id", 0))
    pad_token = str(padding.get("pad_token", ""))
    if not padding:
        for candidate in ("[PAD]", "<pad>", "<|pad|>"):
            found = tokenizer.token_to_id(candidate)
            if found is not None:
                pad_id, pad_token = int(found), candidate
                break
    # Our own limits, whatever the file says (sentence-transformers files pad to a fixed 128).
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token or "[PAD]", direction="right")
    return tokenizer


def _session(model_path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not to our loggers
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail...)
        raise ModelLoadError(f"cannot load ONNX model {model_path} (corrupt or unsupported): {exc}") from exc
