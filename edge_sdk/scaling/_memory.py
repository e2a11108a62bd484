"""The memory model: predicted peak bytes of training, or serving, a sub-network.

Training (fp32, AdamW). Every parameter is held as 4 bytes of weights; a *trainable* one also has a
gradient (4 B) and two AdamW moments (8 B). With T trainable and F frozen parameters the state
between steps is ``S = 4(T + F) + 8T`` and a step's peak is the larger of two moments::

    forward / backward:  S + alpha*A + R + [k > 1: 4T + H] + c_step
    optimizer step:      S + 4T + 2*4*T_max + [k > 1: H] + c_update

* A: what autograd saves for backward in one micro-batch's forward pass (below); alpha > 1 covers
  the gradients of activations that backward allocates while it frees them.
* R: with checkpointing, the activations one layer rebuilds in backward (the largest layer).
* 4T: the gradients. With one micro-batch they are freed between steps (``zero_grad(set_to_none=
  True)``) and built while the activations are released; with k > 1 the gradients accumulated so
  far stay resident while the next micro-batch runs forward.
* ``2*4*T_max``: AdamW on CPU updates one tensor at a time; its temporaries (``sqrt(v)``, the
  step) are those of the largest trainable tensor (T_max elements: the word-embedding table when
  it is trained densely, 11.7M elements for MiniLM).
* H: micro-batches whose activations are small tensors (a ``b_k x s x h`` fp32 tensor under the
  allocator's 1 MiB mmap threshold) come from the C heap, interleaved with the accumulated
  gradients; the heap keeps a fragmented working set even though the trainer trims it every step.
* alpha, c_step, c_update, H: fitted on fresh processes training MiniLM (full, half and quarter
  width; batch 4-32, sequence 32-128; every lever; ``bench/levers_memory.py``) so that every
  measured peak is at or under the prediction and within 15 % of it.

Levers (:class:`~edge_sdk._levers.Levers`) change T, F, A and R:

* ``embeddings="frozen"``: the word-embedding table (V x h, ``Workload.vocab`` rows) moves from T
  to F. ``"rows"``: it moves to F, and a compact copy of the n rows a task can touch becomes
  trainable, ``n = min(V, batch x seq x steps)`` (every token of every step distinct, the bound).
* ``lora_rank=r``: the six linear layers of every encoder layer (query, key, value, attention
  output, FFN up and down: weights and biases) move to F and their adapters (``r (in + out)`` per
  linear) are trainable, as are the LayerNorms, the task head (pooler and classifier; counted as a
  2-label one) and the embedding table per its lever; the rest (position and token-type
  embeddings) is frozen. Each adapter saves a ``b x s x r`` intermediate.
* ``micro_batches=k``: A is that of ``ceil(b / k)`` rows; the gradients stay whole (above).
* ``checkpointing``: a layer keeps only its input ``beta s b h``; R as above.
* ``attention="sdpa"`` without dropout (``Workload.dropout`` False): the fused kernel saves no
  ``a x s^2`` attention probabilities. With dropout, SDPA on CPU falls back to the same tensors as
  eager attention.

Activations per post-LN encoder layer (batch b, sequence s, element bytes beta, kept attention width
d_a = heads x head_dim, kept FFN width d_ff, heads a, LoRA rank r; dropout masks of m bytes an
element)::

    with dropout:     beta*s*b*(4h + 4 d_a + 2 d_ff + 6r) + m*2*s*b*h + (2 beta + m)*a*s^2*b
    without dropout:  beta*s*b*(4h + 4 d_a + 2 d_ff + 6r) + beta*a*s^2*b

(the last term, the attention probabilities, is absent with SDPA and no dropout) plus the
embeddings and task head: ``3*beta*s*b*h`` (sum, LayerNorm and dropout) and a few values per token
and per sequence. Checked against what autograd saves (``tests/test_memory.py``): within 1.3 %.

Decoders (Llama: ``Workload.arch``, which :func:`workload_for` fills from a parent): a pre-norm layer
(RMSNorm, rotary, GQA, gated FFN, no dropout) saves ``beta*s*b*(6h + 4 d_a + 4 d_ff + 7r)`` plus
``beta*a*s^2*b`` with eager attention (the tensors: :func:`~edge_sdk.scaling._memory_decoder.
decoder_layer_tensors`). A causal LM's loss saves log-softmax of the logits, ``L = beta*b*s*V``, and
backward briefly holds two more (the step moment adds ``2L``) and first makes the ``4 V h`` gradient
of the output projection (the tied table's, when it trains) while every activation is saved. A third
moment, the end of backward (a tied table's gradient held three times, the heap's small
activations), is :mod:`edge_sdk.scaling._memory_decoder`'s. Parameters: q and o are ``h d_a``, k and
v ``h d_kv``, gate, up and down ``h d_ff``; a tied ``lm_head`` is counted once; LoRA adapts all seven.

Inference (fp32 ONNX Runtime; int8 needs less) keeps the weights and a transient working set of
one layer at a time, plus the session's own allocations; the runtime is a separate, measured
footprint.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from edge_sdk._levers import Levers
from edge_sdk._spec import LayerSpec, SubnetSpec
from edge_sdk.scaling._memory_decoder import Architecture, backward_end_bytes, decoder_layer_bytes, small_bytes

if TYPE_CHECKING:
    from edge_sdk.scaling._parent import ParentModel

__all__ = [
    "ENCODER",
    "INFERENCE_RUNTIME_BYTES",
    "TRAINING_RUNTIME_BYTES",
    "Architecture",
    "LinearSums",
    "MemoryEstimate",
    "Workload",
    "activation_bytes",
    "export_estimate",
    "inference_estimate",
    "linear_sums",
    "recompute_bytes",
    "serving_estimate",
    "trainable_params",
    "training_estimate",
    "workload_for",
]

# Resident bytes of the runtime itself, measured on x86-64 Linux, CPython 3.11, torch 2.13 (a device
# measures its own: ``edge-sdk profile``): python + torch + transformers + the model's modeling code
# imported, and python + onnxruntime + tokenizers imported.
TRAINING_RUNTIME_BYTES = 415_000_000
INFERENCE_RUNTIME_BYTES = 55_000_000

# The fitted parts of training's peak (module docstring), from fresh processes training MiniLM
# with the allocator tuned (``tune_allocator``) and the heap trimmed once a step (``trim_heap``).
_ACTIVATIONS = 1.04  # alpha
_STEP_FIXED = 85_000_000  # c_step
_UPDATE_FIXED = 130_000_000  # c_update
_HEAP_MICRO_BATCHES = 50_000_000  # H
_HEAP_TENSOR_BYTES = 1 << 20  # the allocator's mmap threshold: smaller tensors come from the heap

PLAIN = Levers()  # plain training: no lever


ENCODER = Architecture()


@dataclass(frozen=True)
class Workload:
    """What one step processes: batch size, the longest row, and how tensors are stored.

    ``seq`` is the longest row a device's batches can reach (batches are padded only to their
    longest row, rows truncated at the task's max length). ``steps`` (0: unknown) and ``vocab`` (the
    word-embedding table's rows, 0: unknown) matter only to the embedding levers.
    """

    batch: int
    seq: int
    bytes_per_elem: int = 4  # fp32
    mask_bytes: int = 4  # dropout masks are kept as fp32 on CPU
    eager_attention: bool = True  # attention probabilities saved for backward (a*s^2 per sequence)
    dropout: bool = True  # dropout active in training: its masks are saved for backward
    steps: int = 0  # optimizer steps of a task: bounds the embedding rows it can touch
    vocab: int = 0  # rows of the word-embedding table
    arch: Architecture = field(default=ENCODER)  # the model's layout (:func:`workload_for`)
    keeps_received: bool = False  # a copy of what trains in place is kept, to send deltas (reference_params)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1:
            raise ValueError(f"batch and sequence length must be positive, got {self.batch} and {self.seq}")
        if self.steps < 0 or self.vocab < 0:
            raise ValueError(f"steps and vocab must be >= 0, got {self.steps} and {self.vocab}")

    def touched_rows(self) -> int:
        """At most how many embedding rows a task's batches touch: ``min(V, b x s x steps)``."""
        if self.steps == 0:
            return self.vocab
        return min(self.vocab, self.batch * self.seq * self.steps)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted resident bytes, by part. ``params`` counts the trainable parameters."""

    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    runtime: int

    @property
    def total(self) -> int:
        """The peak: gradients and saved activations are not alive at the same time."""
        return self.runtime + self.weights + self.optimizer + max(self.activations, self.gradients) + self.transient


def workload_for(parent: ParentModel, work: Workload) -> Workload:
    """``work`` with the architecture (and vocabulary, when unknown) of ``parent``'s family and task."""
    family, config = parent.family, parent.config
    if not family.rotary:
        return work
    table = family.word_embedding(parent.task)
    vocab = work.vocab or (int(parent.state[table].shape[0]) if table else 0)
    h = int(config[family.config_keys["hidden"]])
    causal = parent.task == "causal-lm"
    head = (0 if family.tied_aliases(config, parent.task) else vocab * h) if causal else 2 * h
    arch = Architecture(
        decoder=True,
        biases=bool(config.get("attention_bias") or config.get("mlp_bias")),
        token_logits=vocab if causal else 0,
        head=head,
    )
    return replace(work, arch=arch, vocab=vocab, dropout=False)


def _layer_bytes(layer: LayerSpec, h: int, d: int, work: Workload, *, probabilities: bool, lora: int) -> int:
    """What one layer saves for backward (module docstring)."""
    b, s, beta = work.batch, work.seq, work.bytes_per_elem
    d_a = layer.heads * d
    probs = layer.heads * s * s * b
    if work.arch.decoder:
        return decoder_layer_bytes(layer, h, d, work, probabilities=probabilities, lora=lora)
    total = beta * s * b * (4 * h + 4 * d_a + 2 * layer.ffn + 6 * lora)
    if work.dropout:
        total += work.mask_bytes * 2 * s * b * h
        total += (2 * beta + work.mask_bytes) * probs if probabilities else 0
    else:
        total += beta * probs if probabilities else 0
    return total


def _outside_layers(h: int, work: Workload) -> int:
    """Embeddings (sum, LayerNorm, dropout mask) and per-token/per-sequence odds and ends; a decoder's
    final RMSNorm, causal mask and log-probabilities (module docstring)."""
    b, s, beta = work.batch, work.seq, work.bytes_per_elem
    if work.arch.decoder:
        return beta * s * b * (3 * h + s + 32) + _logit_bytes(work)
    return 3 * beta * s * b * h + 32 * beta * s * b + 3 * beta * b * h


def _logit_bytes(work: Workload) -> int:
    """L: one ``b x s x V`` tensor of a causal LM's per-token logits (0 for other tasks)."""
    return work.bytes_per_elem * work.batch * work.seq * work.arch.token_logits


def _micro(work: Workload, levers: Levers) -> tuple[Workload, bool]:
    """One micro-batch's workload, and whether attention probabilities are saved."""
    micro = replace(work, batch=math.ceil(work.batch / levers.micro_batches))
    probabilities = work.eager_attention and not (levers.attention == "sdpa" and not work.dropout)
    return micro, probabilities


def activation_bytes(spec: SubnetSpec, work: Workload, levers: Levers = PLAIN) -> int:
    """Bytes autograd saves for backward in one (micro-batch's) forward pass."""
    h, d = spec.parent.hidden, spec.parent.head_dim
    micro, probabilities = _micro(work, levers)
    if levers.checkpointing:
        layers = len(spec.layers) * micro.bytes_per_elem * micro.seq * micro.batch * h
    else:
        layers = sum(
            _layer_bytes(ly, h, d, micro, probabilities=probabilities, lora=levers.lora_rank) for ly in spec.layers
        )
    return layers + _outside_layers(h, micro)


def recompute_bytes(spec: SubnetSpec, work: Workload, levers: Levers = PLAIN) -> int:
    """With checkpointing, what one layer rebuilds in backward (the largest layer); else 0."""
    if not levers.checkpointing:
        return 0
    h, d = spec.parent.hidden, spec.parent.head_dim
    micro, probabilities = _micro(work, levers)
    return max(_layer_bytes(ly, h, d, micro, probabilities=probabilities, lora=levers.lora_rank) for ly in spec.layers)


def _heap_micro_batches(spec: SubnetSpec, work: Workload, levers: Levers) -> int:
    """H: micro-batches whose activations come from the heap (module docstring)."""
    micro, _ = _micro(work, levers)
    small = micro.bytes_per_elem * micro.batch * micro.seq * spec.parent.hidden < _HEAP_TENSOR_BYTES
    return _HEAP_MICRO_BATCHES if levers.micro_batches > 1 and small else 0


@dataclass(frozen=True)
class LinearSums:
    """Sums over the sliced linears (q, k, v, o, then the FFN's: gate, up, down for a decoder) of
    every kept layer: ``weights`` = sum of in x out, ``outs`` = sum of out (their biases), ``sides``
    = sum of in + out (a rank-1 adapter's parameters)."""

    weights: int
    outs: int
    sides: int


@functools.lru_cache(maxsize=8192)  # the planner prices each candidate spec under many lever sets
def linear_sums(spec: SubnetSpec, decoder: bool) -> LinearSums:
    """:class:`LinearSums` of ``spec`` (``decoder``: the FFN is gated, three linears)."""
    h, dims = spec.parent.hidden, spec.parent
    ffn_linears = 3 if decoder else 2
    weights = outs = sides = 0
    for ly in spec.layers:
        d_a, d_kv, f = ly.heads * dims.head_dim, dims.kv_kept(ly.heads) * dims.head_dim, ly.ffn
        weights += 2 * h * d_a + 2 * h * d_kv + ffn_linears * h * f
        outs += d_a + 2 * d_kv + h + (ffn_linears - 1) * f + h
        sides += 2 * (h + d_a) + 2 * (h + d_kv) + ffn_linears * (h + f)
    return LinearSums(weights, outs, sides)


def _linear_params(spec: SubnetSpec, work: Workload) -> int:
    """Weights (and biases) of the sliced linear layers of every kept layer."""
    sums = linear_sums(spec, work.arch.decoder)
    return sums.weights + (sums.outs if work.arch.biases else 0)


def _lora_params(spec: SubnetSpec, rank: int, work: Workload) -> int:
    """Adapter parameters ``r (in + out)`` of the sliced linears of every kept layer."""
    return rank * linear_sums(spec, work.arch.decoder).sides


def _norm_params(spec: SubnetSpec, work: Workload) -> int:
    """LayerNorms (weight and bias) of the layers and the embeddings, or a decoder's RMSNorms."""
    h = spec.parent.hidden
    return (2 * len(spec.layers) + 1) * h if work.arch.decoder else 4 * h * len(spec.layers) + 2 * h


def _head_params(spec: SubnetSpec, work: Workload) -> int:
    """The task head beside the table: an encoder's pooler and 2-label classifier by default."""
    h = spec.parent.hidden
    return h * h + h + 2 * h + 2 if work.arch.head < 0 else work.arch.head


def _table_params(spec: SubnetSpec, params: int, work: Workload, levers: Levers) -> int:
    """The word-embedding table's parameters: ``V h``. Unknown V (trained table only): at most every
    parameter outside the encoder layers and the pooler."""
    if work.vocab:
        return work.vocab * spec.parent.hidden
    if levers.embeddings != "train":
        raise ValueError(f"embeddings={levers.embeddings!r} needs the vocabulary size (Workload.vocab)")
    return max(0, params - _linear_params(spec, work) - _norm_params(spec, work) - _head_params(spec, work))


def _largest_trainable(spec: SubnetSpec, params: int, work: Workload, levers: Levers) -> int:
    """Elements of the largest trainable tensor (AdamW's per-tensor temporaries scale with it)."""
    h, d = spec.parent.hidden, spec.parent.head_dim
    sizes = [h * h if work.arch.head < 0 else work.arch.head]  # the pooler (or a head of that order)
    if not levers.lora_rank:
        sizes += [h * max(ly.ffn, ly.heads * d) for ly in spec.layers]
    if levers.embeddings == "train":
        sizes.append(_table_params(spec, params, work, levers))
    elif levers.embeddings == "rows":
        sizes.append(work.touched_rows() * h)
    return max(sizes)


def trainable_params(spec: SubnetSpec, params: int, work: Workload, levers: Levers = PLAIN) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of ``spec`` (``params`` parameters) under ``levers``.

    Adapters and compact embedding rows count as extra trainable parameters; frozen ones still hold
    their 4-byte weights.
    """
    trainable, frozen = params, 0
    if levers.lora_rank:
        norms, head = _norm_params(spec, work), _head_params(spec, work)  # both train with the adapters
        linear = _linear_params(spec, work)
        other = max(0, params - linear - _table_params(spec, params, work, levers) - norms - head)
        trainable += _lora_params(spec, levers.lora_rank, work) - linear - other
        frozen += linear + other
    if levers.embeddings != "train":
        table = _table_params(spec, params, work, levers)
        trainable -= table
        frozen += table
        if levers.embeddings == "rows":
            trainable += work.touched_rows() * spec.parent.hidden
    return trainable, frozen


def reference_params(spec: SubnetSpec, params: int, work: Workload, levers: Levers = PLAIN) -> int:
    """Parameters a device copies to send deltas (``Workload.keeps_received``): the sub-network's
    ``params`` less the LoRA targets (frozen: they come back as factors) and less a frozen or
    row-trained table (its rows train in a compact copy); 0 when the device keeps no copy."""
    if not work.keeps_received:
        return 0
    copied = params
    if levers.lora_rank:  # the targets' weights; their biases train, so they are copied
        copied -= linear_sums(spec, work.arch.decoder).weights
    if levers.embeddings != "train":
        copied -= _table_params(spec, params, work, levers)
    return max(0, copied)


def _output_gradient_bytes(spec: SubnetSpec, work: Workload, levers: Levers) -> int:
    """A causal LM's output projection is the first thing backward reaches: its ``V x h`` gradient
    exists while every activation is still saved (an encoder's table gradient comes last). Tied, it
    is the table's, made only when the table trains densely."""
    if not work.arch.token_logits:
        return 0
    tied = work.arch.head == 0
    trained = levers.embeddings == "train" if tied else True
    return 4 * work.arch.token_logits * spec.parent.hidden if trained else 0


def _backward_end(spec: SubnetSpec, work: Workload, levers: Levers, gradients: int) -> int:
    """A decoder's end of backward beyond weights and moments (:mod:`~edge_sdk.scaling._memory_decoder`)."""
    micro, probabilities = _micro(work, levers)
    h, d = spec.parent.hidden, spec.parent.head_dim
    small = small_bytes(spec.layers, h, d, micro, levers, probabilities=probabilities, group=spec.parent.group)
    tied = _output_gradient_bytes(spec, work, levers) if work.arch.head == 0 else 0
    big = activation_bytes(spec, work, levers) - small + 2 * _logit_bytes(micro) if levers.micro_batches > 1 else 0
    return backward_end_bytes(gradients, tied, small, big)


def training_estimate(
    spec: SubnetSpec,
    params: int,
    work: Workload,
    runtime: int = TRAINING_RUNTIME_BYTES,
    levers: Levers = PLAIN,
) -> MemoryEstimate:
    """Peak bytes of training ``spec`` (``params`` fp32 parameters) with AdamW under ``levers``."""
    trainable, frozen = trainable_params(spec, params, work, levers)
    weights, gradients, optimizer = 4 * (trainable + frozen), 4 * trainable, 8 * trainable
    weights += 4 * reference_params(spec, params, work, levers)  # the received copy, for deltas
    activations = activation_bytes(spec, work, levers)
    heap = _heap_micro_batches(spec, work, levers)
    held = gradients + heap if levers.micro_batches > 1 else 0
    step = int(_ACTIVATIONS * activations) + recompute_bytes(spec, work, levers) + held + _STEP_FIXED
    step += 2 * _logit_bytes(_micro(work, levers)[0])  # backward through a causal LM's loss
    if levers.micro_batches == 1:  # (else every gradient is already held)
        step += _output_gradient_bytes(spec, work, levers)
    largest = 4 * _largest_trainable(spec, params, work, levers)
    update = gradients + 2 * largest + heap + _UPDATE_FIXED
    if work.arch.decoder:  # a third moment, the end of backward (_memory_decoder)
        update = max(update, _backward_end(spec, work, levers, gradients))
    return MemoryEstimate(
        params=trainable,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        # what the larger moment holds beyond max(activations, gradients), so ``total`` is the peak
        transient=max(step, update) - max(activations, gradients),
        runtime=runtime,
    )


# ONNX Runtime's own allocations beyond the weights (session, arena, tokenizer), measured: serving
# fp32 MiniLM sub-networks (14.7M-22.7M parameters) peaked at runtime + weights + 65 MB while loading.
_INFERENCE_FIXED = 70_000_000


def inference_estimate(
    spec: SubnetSpec, params: int, work: Workload, runtime: int = INFERENCE_RUNTIME_BYTES
) -> MemoryEstimate:
    """Peak bytes of serving ``spec``: weights plus the largest single layer's working set."""
    h, d = spec.parent.hidden, spec.parent.head_dim
    b, s, beta = work.batch, work.seq, work.bytes_per_elem
    gated = 2 if work.arch.decoder else 1  # gate and up outputs
    per_layer = [
        beta * s * b * (3 * h + 3 * layer.heads * d + gated * layer.ffn) + 2 * beta * layer.heads * s * s * b
        for layer in spec.layers
    ]
    return MemoryEstimate(
        params=params,
        weights=4 * params,
        gradients=0,
        optimizer=0,
        activations=max(per_layer),
        transient=_INFERENCE_FIXED + 2 * beta * s * b * h + _logit_bytes(work),
        runtime=runtime,
    )


# Exporting a sub-network on the device (edge_sdk.serving._install: build, trace to ONNX, [fuse with ONNX
# Runtime's transformer optimizer], parity check, [int8 quantization and drift check], load the installed
# folder) runs in the device's torch process, so it must fit the training allowance too. Bytes above the
# runtime footprint, fitted on fresh processes exporting MiniLM sub-networks of 14.7M-22.7M parameters
# (bench/export_memory.py): per parameter the module, the traced graph, the fusion's copies of it (its
# symbolic shape inference copies the model on each pass: fusing adds 16 B/param to the fp32 fit) and the
# serialized model; fixed, the exporter's, optimizer's and (int8) the quantizer's imports and sessions.
# Keys: (quantize, optimize). Unfused: 1.00x the measured peaks before the fusion existed; fused: 1.01x.
_EXPORT_PER_PARAM = {(False, False): 17, (True, False): 23, (False, True): 33, (True, True): 45}
_EXPORT_FIXED = {
    (False, False): 64_000_000,
    (True, False): 215_000_000,
    (False, True): 95_000_000,
    (True, True): 190_000_000,
}


def export_estimate(params: int, *, quantize: bool, optimize: bool = False) -> int:
    """Peak bytes above the runtime footprint of exporting a ``params``-parameter sub-network to ONNX
    (``optimize``: with ONNX Runtime's transformer fusion, about twice the unfused peak)."""
    return _EXPORT_PER_PARAM[quantize, optimize] * params + _EXPORT_FIXED[quantize, optimize]


def serving_estimate(
    spec: SubnetSpec, params: int, work: Workload, *, runtime_footprint: int, quantize: bool
) -> MemoryEstimate:
    """The larger of the two moments of serving ``spec`` on a device, against its inference budget.

    ONNX Runtime serving it (:func:`inference_estimate`, ORT's own runtime), and the device's torch
    process exporting it (``runtime_footprint`` + :func:`export_estimate`). The returned parts are
    those of whichever moment is larger.
    """
    served = inference_estimate(spec, params, work)
    return larger_moment(served, params, export_estimate(params, quantize=quantize), runtime_footprint)


def larger_moment(served: MemoryEstimate, params: int, export: int, runtime_footprint: int) -> MemoryEstimate:
    """``served`` (ONNX Runtime serving the model), or the torch process exporting it when that is
    larger: the runtime footprint, the fp32 weights and the rest of the ``export`` bytes."""
    if runtime_footprint + export <= served.total:
        return served
    return MemoryEstimate(
        params=params,
        weights=4 * params,
        gradients=0,
        optimizer=0,
        activations=0,
        transient=max(0, export - 4 * params),
        runtime=runtime_footprint,
    )
