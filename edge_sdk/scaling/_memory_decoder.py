"""A decoder's end-of-backward moment: what :mod:`edge_sdk.scaling._memory`'s two encoder moments miss.

Measured on the real SmolLM2-135M in fresh processes (batch 4 x 64 and 8 x 64; plain, checkpointing
with a frozen table, 4 micro-batches with a frozen table and LoRA r16): the resident set sampled at
the forward, backward and optimizer-step boundaries, ``VmHWM`` reset between them
(``/proc/self/clear_refs``), and the heap read with ``mallinfo2`` (``bench/training_phases.py``).
The peak is not where the encoder model puts it (the start of backward, or AdamW's step): it is the
*end of backward*, when every gradient exists, for two reasons an encoder never shows.

* **The tied table's gradient is held three times.** The output projection's gradient of a tied
  ``V x h`` table reaches the table's accumulator first and waits in autograd's input buffer (a
  transposed view: the projection multiplies by ``W^T``) until the embedding's dense backward makes
  the second ``V x h`` tensor; their sum is then copied into the parameter's own layout. Three copies
  at once, one of which stays as ``.grad``: the moment adds ``2 * 4 V h`` (measured on a bare tied
  embedding and head, V = 49,152, h = 576: backward peaks 216 MiB above what it leaves; untied, the
  two gradients are both in G; ``tests/test_llama_memory.py``).
  Only when the table trains densely (a frozen table has no gradient).
* **Small activations stay resident through backward.** Tensors under the allocator's 1 MiB mmap
  threshold (:mod:`edge_sdk.device._allocator`) come from the C heap, and the trainer returns the
  heap's free pages once a step, after backward. A decoder's ``b x s x h`` activations fall under it at
  small batches (576 KiB at 4 x 64 x 576): freed by backward, they are still resident when the last
  gradient is made; so are backward's own small temporaries (the activations' gradients). Measured as
  the resident set at the end of backward less weights, moments and gradients (``S + G``), against the
  saved activations in tensors under the threshold (``A_small``), over steps 2-7:

      plain, batch 4 (A_small 187 MiB):                        278-377 MiB
      4 micro-batches of 1 row, LoRA r16 (A_small 92 MiB):     248-252 MiB
      checkpointing, batch 4 (A_small 24 MiB: the layer
        inputs and one rebuilt layer):                          180-193 MiB
      plain, batch 8 (A_small ~0: every b x s x h tensor
        is 1.1 MiB, mmapped, returned when freed):              102-109 MiB

  which ``R = H_0 + rho * A_small`` covers with ``rho`` = 1.2 (each small saved activation, and its
  small gradient in backward, less what the heap reuses) and ``H_0`` = 200 MiB (the heap's working set
  between trims: the optimizer's small temporaries, autograd's nodes, the small weight gradients that
  interleave with freed activations, so the heap cannot shrink below them; the upper end of the
  ranges above, which vary by up to 100 MiB from step to step and run to run).

**LoRA at one micro-batch** churns the heap more: each of the seven adapters of a layer makes, and
drops, ``3 x b s out`` in forward (B's output, its scaled copy, the sum with the base output), and
its small factor gradients, made in every layer's backward, pin the heap above them, so checkpointing
does not help. Measured at batch 4 with LoRA r16: 521-640 MiB with the table trained (plain: 278-377)
and 461 MiB with checkpointing and a frozen table (without LoRA: 180-193); those temporaries under the
threshold (186 MiB) join ``A_small``. With micro-batches the measured heap showed no such growth
(248-252 MiB at 4 micro-batches of 1 row), so they are not counted there.

So a decoder's third moment is ``S + G + [tied and trained: 8 V h] + H_0 + rho * A_small``. With
``k > 1`` micro-batches, ``A_small`` is one micro-batch's, and the heap is not trimmed between them:
the next micro-batch's forward runs on the retained heap with every gradient held, so its mmapped
tensors add on top, ``A - A_small + 2L`` (its logits' log-probabilities, and the two ``b x s x V``
gradients backward makes from them). Measured at 4 micro-batches of 1 row, LoRA r16: 877-932 MiB
above the runtime against 935 MiB predicted. Encoders keep their two moments (their fits already
hold these effects, measured on MiniLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_sdk._levers import Levers
from edge_sdk._spec import LayerSpec

if TYPE_CHECKING:
    from edge_sdk.scaling._memory import Workload

__all__ = [
    "DECODER_HEAP_FLOOR",
    "SMALL_RETAINED",
    "Architecture",
    "backward_end_bytes",
    "decoder_layer_bytes",
    "decoder_layer_tensors",
    "small_bytes",
]

DECODER_HEAP_FLOOR = 200 << 20  # H_0
SMALL_RETAINED = 1.2  # rho
_MMAP_THRESHOLD = 1 << 20  # tensors under it come from the heap (edge_sdk.device._allocator)


@dataclass(frozen=True)
class Architecture:
    """What the memory model needs of a family and task beyond a spec's widths (default: a post-LN
    encoder with biases and a pooler + 2-label classifier, as BERT, RoBERTa, DistilBERT and ViT)."""

    decoder: bool = False  # pre-norm decoder layer (Llama): RMSNorm, rotary, gated FFN, no dropout
    biases: bool = True  # the sliced linears have biases
    token_logits: int = 0  # a causal LM's vocabulary: per-token logits and their loss (0: none)
    head: int = -1  # task-head parameters beside the layers and the table (-1: pooler + classifier)


def decoder_layer_bytes(layer: LayerSpec, h: int, d: int, work: Workload, *, probabilities: bool, lora: int) -> int:
    """The bytes of :func:`decoder_layer_tensors`."""
    return sum(n * size for n, size in decoder_layer_tensors(layer, h, d, work, probabilities=probabilities, lora=lora))


def decoder_layer_tensors(
    layer: LayerSpec, h: int, d: int, work: Workload, *, probabilities: bool, lora: int
) -> list[tuple[int, int]]:
    """(count, bytes) of the tensors one pre-norm decoder layer saves for backward per (micro-)batch:
    ``6 x b s h`` (two RMSNorm blocks: input, normalized values, their product with the weight),
    ``4 x b s d_a`` (rotated queries, keys and values repeated to the query heads, attention output),
    ``4 x b s d_ff`` (gate, silu(gate), up, their product), ``7 x b s r`` (one per LoRA adapter) and,
    for eager attention, ``1 x b a s^2`` (the probabilities). Their sum is
    ``beta s b (6h + 4 d_a + 4 d_ff + 7r) [+ beta a s^2 b]``."""
    tokens = work.batch * work.seq * work.bytes_per_elem
    tensors = [(6, tokens * h), (4, tokens * layer.heads * d), (4, tokens * layer.ffn)]
    if lora:
        tensors.append((7, tokens * lora))
    if probabilities:
        tensors.append((1, work.bytes_per_elem * work.batch * layer.heads * work.seq * work.seq))
    return tensors


def _small(tensors: Sequence[tuple[int, int]]) -> int:
    return sum(count * size for count, size in tensors if size < _MMAP_THRESHOLD)


def small_bytes(
    layers: Sequence[LayerSpec],
    h: int,
    d: int,
    micro: Workload,
    levers: Levers,
    *,
    probabilities: bool,
    group: int = 1,
) -> int:
    """``A_small``: saved activation bytes of one micro-batch in tensors under the mmap threshold. With
    checkpointing, the layers' inputs (``b x s x h`` each) and the largest rebuilt layer's. With LoRA and
    one micro-batch, plus every layer's adapter temporaries under it (:func:`_adapter_outputs`), even
    with checkpointing: each layer's backward leaves its adapters' small gradients on top of them."""
    per_layer = [
        _small(decoder_layer_tensors(ly, h, d, micro, probabilities=probabilities, lora=levers.lora_rank))
        for ly in layers
    ]
    adapters = 0
    if levers.lora_rank and levers.micro_batches == 1:
        adapters = sum(_small(_adapter_outputs(ly, h, d, group, micro)) for ly in layers)
    if not levers.checkpointing:
        return sum(per_layer) + adapters
    inputs = _small([(len(layers), micro.batch * micro.seq * micro.bytes_per_elem * h)])
    return inputs + max(per_layer, default=0) + adapters


def _adapter_outputs(layer: LayerSpec, h: int, d: int, group: int, work: Workload) -> list[tuple[int, int]]:
    """LoRA's forward temporaries, not saved: per target, B's output, its scaled copy and the sum with
    the base output, ``3 x b s out`` (out: q d_a, k and v d_kv, o h, gate and up d_ff, down h)."""
    tokens = work.batch * work.seq * work.bytes_per_elem
    d_kv = layer.heads // group * d
    return [(3, tokens * out) for out in (layer.heads * d, d_kv, d_kv, h, layer.ffn, layer.ffn, h)]


def backward_end_bytes(gradients: int, table: int, small: int, big: int = 0) -> int:
    """The end-of-backward moment beyond weights and moments: every gradient (``gradients`` bytes),
    two more copies of a tied table's gradient (``table``: its ``4 V h`` bytes when it is tied and
    trains densely, else 0), the heap's retained small tensors ``H_0 + rho * A_small``, and ``big``:
    with micro-batches, what the next micro-batch holds in mmapped tensors on top of that heap (its
    saved activations over ``A_small`` and the ``2L`` of backward through the loss)."""
    return gradients + 2 * table + DECODER_HEAP_FLOOR + int(SMALL_RETAINED * small) + big
