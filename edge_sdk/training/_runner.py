"""Running one task on the device: build the received sub-network, train (or evaluate) it, return weights.

Synchronous and free of I/O: the SDK's client calls it in a worker thread so that its event loop keeps
answering keepalive pings. Cancellation (the connection dropped) goes through the batches: the next
batch the training function asks for raises, so any training function that pulls batches stops
within one step.

Data: anything with ``len()`` (the samples held, the weight of this device's update) and
``batches(batch_size, seq_len, seed)`` (endless shuffled batches of numpy arrays with ``labels``,
rows truncated at ``seq_len`` tokens, each batch padded to its longest row) is a
:class:`BatchSource`; ``eval_batches(batch_size, seq_len)`` (one pass) is needed for evaluation
tasks. :class:`TextDataset` is one for text classification: (label, sentence) examples tokenized with
the model's ``tokenizer.json``; :class:`~edge_sdk.training._images.ImageDataset` one for image
classification (``pixel_values``; ``seq_len`` ignored), whose ``fit_model(config)`` the runner calls
with each task's model config before building it. ``batches`` must be deterministic for a seed: row-only embedding
training draws the task's batches once more to learn which rows they touch.

Levers (:class:`~edge_sdk._levers.Levers`): the model is built with the levers' attention kind, the
training function applies the others, and the update holds what the levers trained
(:func:`edge_sdk.training._levers.trained_tensors`): dense tensors, ``NAME`` + ``NAME@rows`` for a
row-trained embedding table, ``NAME@lora_A`` + ``NAME@lora_B`` for LoRA, nothing for frozen ones.

Tokenizer: the coordinator sends the model's config, not its tokenizer. A device names the folder
holding ``tokenizer.json`` (``--tokenizer DIR``), or a packaged model name; by default the packaged
all-MiniLM-L6-v2 when installed. A tokenizer whose vocabulary does not match the model's
``vocab_size`` fails the task with a clear message rather than training on wrong token ids.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edge_sdk._errors import ConfigError, EdgeFMError, SpecError
from edge_sdk._spec import SubnetSpec
from edge_sdk.protocol import (
    DeviceConnection,
    EvaluateTask,
    TrainTask,
    delta_from_weights,
    numpy_to_torch,
    thaw_json,
    torch_to_numpy,
)
from edge_sdk.scaling._models import packaged_model_dir
from edge_sdk.scaling.families import model_task
from edge_sdk.training._data import (
    Encoded,
    TextExample,
    default_max_length,
    encode,
    iter_batches,
    load_tokenizer,
)
from edge_sdk.training._formats import DataFile
from edge_sdk.training._labels import LabelMap, bind_labels
from edge_sdk.training._privacy import local_dp

__all__ = [
    "BatchSource",
    "TaskCancelledError",
    "TaskRunner",
    "TextDataset",
    "TrainFn",
    "TrainOutput",
    "model_task",
    "resolve_tokenizer_dir",
    "warm_up",
]

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "all-MiniLM-L6-v2"

TrainFn = Callable[..., Any]  # (model, batches, TrainConfig) -> TrainResult, like edge_sdk.training._train.train_local


class TaskCancelledError(EdgeFMError):
    """The task was abandoned (its connection closed) before it finished."""


@runtime_checkable
class BatchSource(Protocol):
    """A device's local data as the runner consumes it."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[Mapping[str, np.ndarray]]: ...


def resolve_tokenizer_dir(name_or_dir: str | Path | None) -> Path:
    """The folder holding ``tokenizer.json``: a path, a packaged model name, or (None) the default."""
    key = DEFAULT_TOKENIZER if name_or_dir is None else str(name_or_dir)
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"tokenizer folder {path} has no tokenizer.json")
        return path
    hint = "" if name_or_dir is not None else " (the default); or pass --tokenizer DIR with the model's tokenizer.json"
    packaged = packaged_model_dir(key, hint=hint)
    if packaged is not None:
        return packaged
    raise ConfigError(f"tokenizer {key!r} is neither a folder with tokenizer.json nor a packaged model name")


class TextDataset:
    """Text-classification examples, tokenized on demand for the sequence length a task asks for.

    ``holdout``: the last ``holdout`` examples are held back: never trained on (nor counted in ``len``),
    kept in :attr:`held_out` for checks such as a deployed int8 model's accuracy drift.
    """

    def __init__(
        self,
        examples: Sequence[TextExample] | DataFile,
        tokenizer_dir: str | Path | None = None,
        *,
        holdout: int = 0,
    ) -> None:
        if holdout < 0:
            raise ConfigError(f"holdout must be >= 0, got {holdout}")
        if len(examples) <= holdout:
            raise ConfigError(
                f"the local data set has {len(examples)} example(s): nothing left to train on"
                + (f" after holding back {holdout}" if holdout else "")
            )
        self.holdout = holdout
        # a file's labels are mapped once the run's label map arrives (use_labels: the first task)
        self.file = examples if isinstance(examples, DataFile) else None
        self.labels: LabelMap | None = None
        self._size = len(examples) - holdout
        self.examples: list[TextExample] = []
        self.held_out: list[TextExample] = []
        if self.file is None:
            self._split(list(examples))  # type: ignore[arg-type]
        self.tokenizer_dir = resolve_tokenizer_dir(tokenizer_dir)
        self._tokenizer = load_tokenizer(self.tokenizer_dir, 128)  # loaded now: part of the runtime
        self._cache: tuple[int, Encoded] | None = None
        self._lock = threading.Lock()

    def _split(self, examples: list[TextExample]) -> None:
        self.examples, self.held_out = examples[: self._size], examples[self._size :]

    def use_labels(self, labels: LabelMap) -> None:
        """Map the file's labels through the run's ``labels`` (a ConfigError naming the file, line and
        label for one outside the map); examples given as class indices are checked against it."""
        with self._lock:
            if labels == self.labels:
                return
            if self.file is None:
                labels.check(e.label for e in (*self.examples, *self.held_out))
            else:
                self._split(labels.examples(self.file))
                self._cache = None
            self.labels = labels

    def __len__(self) -> int:
        return self._size

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def default_max_length(self, cap: int | None = None) -> int:
        """The 99.9th percentile of the examples' token lengths, at most ``cap`` (max positions)."""
        limit = cap or 1 << 20
        return default_max_length(self.encoded(limit).lengths, cap=cap)

    def encoded(self, seq_len: int) -> Encoded:
        """The examples tokenized, truncated at ``seq_len`` tokens, padded to the longest row (int64
        ids, mask, types: 24 bytes per token)."""
        with self._lock:
            if self.file is not None and self.labels is None:
                raise ConfigError(f"{self.file.path}: its labels are mapped once the run's label map arrives")
            if self._cache is None or self._cache[0] != seq_len:
                self._cache = (seq_len, encode(load_tokenizer(self.tokenizer_dir, seq_len), self.examples))
            return self._cache[1]

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self.encoded(seq_len), batch_size, seed=seed, shuffle=True)

    def eval_batches(self, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(self.encoded(seq_len), batch_size, seed=0, shuffle=False)


def _cancellable(
    batches: Iterator[Mapping[str, np.ndarray]], cancel: threading.Event
) -> Iterator[Mapping[str, np.ndarray]]:
    for batch in batches:
        if cancel.is_set():
            raise TaskCancelledError("the task was cancelled: its connection closed")
        yield batch


def warm_up() -> None:
    """Two training steps of a tiny BERT: what torch initializes lazily on a first training step
    (autograd, kernel workspaces) is then part of the runtime footprint measured afterwards."""
    import torch
    import transformers

    from edge_sdk.training._train import TrainConfig, train_local

    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
        num_labels=2,
    )
    config._attn_implementation = "eager"
    model = transformers.BertForSequenceClassification(config)
    rng = np.random.default_rng(0)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        while True:
            ids = rng.integers(0, 64, size=(2, 16), dtype=np.int64)
            yield {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "labels": np.zeros(2, dtype=np.int64),
            }

    with torch.random.fork_rng():
        train_local(model, batches(), TrainConfig(steps=2))


@dataclass(frozen=True)
class TrainOutput:
    """What a training task produced: the trained weights (same names, shapes, dtypes as received)."""

    tensors: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]
    peak_rss_bytes: int
    step_time_s: float
    train_time_s: float
    # A copy of the float tensors received (``TaskRunner.train(keep_received=True)``): the update can
    # then travel as deltas, packed with the encoding the coordinator granted.
    received: Mapping[str, np.ndarray] | None = None

    def send(self, conn: DeviceConnection, task_id: str) -> None:
        """Queue this output as the task's Update on ``conn``: deltas against what was received when the
        coordinator granted an update encoding and the received tensors were kept, else the weights."""
        delta = conn.update_encoding is not None and self.received is not None
        conn.send_update(
            task_id=task_id,
            tensors=delta_from_weights(self.tensors, self.received or {}) if delta else self.tensors,
            num_samples=self.num_samples,
            metrics=self.metrics,
            peak_rss_bytes=self.peak_rss_bytes,
            step_time_s=self.step_time_s,
            train_time_s=self.train_time_s,
            encoding="delta" if delta else "weights",
        )


class TaskRunner:
    """Builds, trains and evaluates received sub-networks on local data (call from one worker thread)."""

    def __init__(
        self,
        data: BatchSource,
        *,
        train_fn: TrainFn | None = None,
        eval_data: BatchSource | None = None,
        threads: int | None = None,
    ) -> None:
        self.data = data
        self.eval_data = eval_data if eval_data is not None else data
        self.train_fn = train_fn
        self.threads = threads

    def _build(
        self, task: TrainTask | EvaluateTask, tensors: Mapping[str, np.ndarray], attention: str = "eager"
    ) -> tuple[SubnetSpec, Any]:
        import torch

        from edge_sdk.scaling import family_for
        from edge_sdk.scaling._build import build_model

        if self.threads:
            torch.set_num_threads(self.threads)  # per thread under OpenMP: set it in the worker too
        spec = SubnetSpec.from_dict(thaw_json(task.spec))
        config = thaw_json(task.model_config)
        for data in {id(self.data): self.data, id(self.eval_data): self.eval_data}.values():
            bind_labels(data, config)  # the run's label map: a label outside it fails the task, untrained
        vocab = getattr(self.data, "vocab_size", None)
        if isinstance(vocab, int) and isinstance(config.get("vocab_size"), int) and vocab > config["vocab_size"]:
            raise SpecError(
                f"the tokenizer has {vocab} tokens but the model's vocabulary has {config['vocab_size']}:"
                " this is not the model's tokenizer (pass --tokenizer DIR)"
            )
        for source in {id(self.data): self.data, id(self.eval_data): self.eval_data}.values():
            fit = getattr(source, "fit_model", None)  # image data: its preprocessing checked against the model
            if callable(fit):
                fit(config)
        head = model_task(config, getattr(self.data, "task", None))
        _check_data_kind(getattr(self.data, "task", None), head or next(iter(family_for(config).task_classes)))
        return spec, build_model(spec, config, numpy_to_torch(dict(tensors)), task=head, attn_implementation=attention)

    def train(
        self,
        task: TrainTask,
        tensors: Mapping[str, np.ndarray],
        cancel: threading.Event | None = None,
        on_step: Callable[[int, int], None] | None = None,
        *,
        keep_received: bool = False,
    ) -> TrainOutput:
        """Train the task's sub-network on local data; TaskCancelledError once ``cancel`` is set;
        ``on_step(done, total)`` after each step, in this thread (a progress display).

        The task's settings say how: its ``levers``, ``dropout`` (None: the model's), ``max_grad_norm``
        (None: no clipping) and ``dp_clip_norm`` (local DP, ``_privacy``); rows are truncated at the
        task's ``seq_len``, at most the model's max positions, and each batch is padded to its longest row.
        ``keep_received``: keep a copy of the received float tensors (training updates them in place)
        so the output can be sent as deltas (one more copy of the float weights in memory).
        """
        from edge_sdk.training._levers import install_rows, touched_rows, trained_tensors
        from edge_sdk.training._train import TrainConfig, train_local

        cancel = cancel or threading.Event()
        settings = task.settings
        if settings.optimizer != "adamw":
            raise ConfigError(f"optimizer {settings.optimizer!r} is not supported on this device (adamw only)")
        levers = settings.levers
        # training updates the received arrays in place: deltas (and local DP) need them as received
        keep = keep_received or settings.dp_clip_norm is not None
        received = self._as_received(task, tensors, levers) if keep else None
        spec, model = self._build(task, tensors, attention=levers.attention)
        steps = settings.local_steps or max(1, math.ceil(len(self.data) / settings.batch_size)) * (
            settings.local_epochs or 1
        )
        max_length = _max_length(settings.seq_len, thaw_json(task.model_config))
        what = f"{spec.describe()} for {steps} steps (batch {settings.batch_size}"
        logger.info(
            "task %s: training %s, rows truncated at %d tokens; %s)", task.task_id, what, max_length, levers.describe()
        )
        if levers.embeddings == "rows":  # the same batches, drawn once more for their tokens
            drawn = islice(self.data.batches(settings.batch_size, max_length, settings.seed), steps)
            install_rows(model, touched_rows(drawn))
        batches = _cancellable(self.data.batches(settings.batch_size, max_length, settings.seed), cancel)
        config = TrainConfig(
            steps=steps,
            lr=settings.lr,
            prox_mu=settings.prox_mu,
            seed=settings.seed,
            levers=levers,
            dropout=settings.dropout,
            max_grad_norm=settings.max_grad_norm,
            on_step=on_step,
        )
        result = (self.train_fn or train_local)(model, batches, config)
        trained = _as_received(torch_to_numpy(trained_tensors(model, tensors)), tensors)
        out = local_dp(trained, received if received is not None else tensors, settings)
        return _train_output(result, out, len(self.data), received)

    def _as_received(self, task: TrainTask, tensors: Mapping[str, np.ndarray], levers: Any) -> dict[str, np.ndarray]:
        """The float tensors as received, for deltas: a copy of each one training may change in place,
        the received array itself for the others (no copy): LoRA targets (frozen; they come back as
        factors) and a frozen or row-trained token table (its rows train in a compact copy). A LoRA
        device of SmolLM2-135M copied all 538 MB of its weights here, and trained 0.5 GB over its plan."""
        from edge_sdk.scaling import family_for

        config = thaw_json(task.model_config)
        family = family_for(config)
        head = model_task(config, getattr(self.data, "task", None)) or next(iter(family.task_classes))
        table = family.word_embedding(head)
        out = {}
        for name, array in tensors.items():
            if array.dtype.kind != "f":
                continue
            frozen = (levers.lora_rank and family.lora_target(name, head)) or (
                name == table and levers.embeddings != "train"
            )
            out[name] = array if frozen else array.copy()
        return out

    def evaluate(
        self, task: EvaluateTask, tensors: Mapping[str, np.ndarray], cancel: threading.Event | None = None
    ) -> tuple[int, dict[str, float]]:
        """Accuracy and loss of the task's sub-network on the local evaluation data."""
        from edge_sdk.training._train import evaluate

        cancel = cancel or threading.Event()
        source = getattr(self.eval_data, "eval_batches", None)
        if source is None:
            raise ConfigError("this device's data has no eval_batches(): it cannot run evaluation tasks")
        _, model = self._build(task, tensors)
        metrics = evaluate(model, _cancellable(source(task.settings.batch_size, task.settings.seq_len), cancel))
        samples = int(metrics.pop("samples", 0))
        return samples, {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def _check_data_kind(data_task: str | None, head: str) -> None:
    """SpecError when prompt/response records meet a classifier, or labelled rows a causal LM."""
    records = data_task == "causal-lm"
    if records != (head == "causal-lm"):
        have = "prompt/response records" if records else "labelled examples"
        raise SpecError(
            f"the run trains a {head} model but this device's data holds {have}: join with data of the run's kind"
        )


def _train_output(
    result: Any, tensors: dict[str, np.ndarray], num_samples: int, received: Mapping[str, np.ndarray] | None
) -> TrainOutput:
    """The TrainOutput of a local training ``result`` (a ``TrainResult``)."""
    metrics = {"steps": float(result.steps), "samples_seen": float(result.samples)}
    if math.isfinite(result.loss):
        metrics["loss"] = float(result.loss)
    return TrainOutput(
        tensors=tensors,
        num_samples=num_samples,
        metrics=metrics,
        peak_rss_bytes=int(result.peak_rss_bytes),
        step_time_s=max(0.0, float(result.step_time_s)),
        train_time_s=max(0.0, float(result.train_time_s)),
        received=received,
    )


def _max_length(seq_len: int, config: Mapping[str, Any]) -> int:
    """The task's max length, at most the model's max positions."""
    positions = config.get("max_position_embeddings")
    return min(seq_len, positions) if isinstance(positions, int) and positions > 0 else seq_len


def _as_received(arrays: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float arrays in the dtype their parameter was received in (row indices stay int64)."""
    out = {}
    for name, array in arrays.items():
        base = received.get(name.partition("@")[0])
        cast = base is not None and np.issubdtype(array.dtype, np.floating) and array.dtype != base.dtype
        out[name] = array.astype(base.dtype) if cast and base is not None else array
    return out
