"""The memory model: predicted peak bytes of training, or serving, a sub-network.

Training, fp32 weights and AdamW, P trainable parameters (``../shared/design.md`` section 3)::

    weights 4P + Adam moments 8P + max(activations, gradients 4P) + transient + runtime footprint

where the transient is fitted to measured peaks (below): gradients are freed between steps, so the
peak is either the end of the forward pass or the backward pass, whichever holds more.

Activations per post-LN encoder layer (batch b, sequence s, element bytes beta, kept attention width
d_a = heads x head_dim, kept FFN width d_ff, heads a)::

    beta*s*b*(4h + 4 d_a + 2 d_ff) + mask_bytes*2*s*b*h + [eager] (2 beta + mask_bytes)*a*s^2*b

plus the embeddings and task head: ``3*beta*s*b*h`` (sum, LayerNorm and dropout) and a few values
per token and per sequence, measured against what autograd saves (``tests/test_memory.py``).

Inference (fp32 ONNX Runtime; int8 needs less) keeps the weights and a transient working set of
one layer at a time, plus the session's own allocations; the runtime is a separate, measured
footprint.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk._spec import SubnetSpec

__all__ = [
    "INFERENCE_RUNTIME_BYTES",
    "TRAINING_RUNTIME_BYTES",
    "MemoryEstimate",
    "Workload",
    "activation_bytes",
    "export_estimate",
    "inference_estimate",
    "serving_estimate",
    "training_estimate",
]

# Resident bytes of the runtime itself, measured on x86-64 Linux, CPython 3.11, torch 2.13 (a device
# measures its own: ``edge-sdk profile``): python + torch + transformers + the model's modeling code
# imported, and python + onnxruntime + tokenizers imported.
TRAINING_RUNTIME_BYTES = 415_000_000
INFERENCE_RUNTIME_BYTES = 55_000_000

# Training's peak, measured in fresh processes training MiniLM sub-networks (12 shapes: 14.7M-22.7M
# parameters, batch 2-64, sequence 16-256; allocator tuned by ``_alloc.tune_allocator``; the same to
# within 0.3 % run to run), is the larger of two moments of a step:
#   end of the forward pass:  weights + Adam moments + activations + 95 MB
#   backward / optimizer:     weights + Adam moments + gradients + 0.75 x activations + 160 MB
# (gradients are freed between steps by ``zero_grad(set_to_none=True)``, and activations are
# released as the backward pass allocates gradients; the fixed parts are autograd's and AdamW's
# temporaries and the embedding's dense gradient buffers). Fitted so that every measurement lies
# at or under the prediction: 0.5 % to 13 % above the measured peak, never below.
_FORWARD_FIXED = 95_000_000
_BACKWARD_FIXED = 160_000_000
_BACKWARD_ACTIVATIONS = 0.75


@dataclass(frozen=True)
class Workload:
    """What one step processes: batch size, sequence length, and how tensors are stored."""

    batch: int
    seq: int
    bytes_per_elem: int = 4  # fp32
    mask_bytes: int = 4  # dropout masks are kept as fp32 on CPU
    eager_attention: bool = True  # attention probabilities saved for backward (a*s^2 per sequence)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1:
            raise ValueError(f"batch and sequence length must be positive, got {self.batch} and {self.seq}")


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted resident bytes, by part."""

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
        return (
            self.runtime
            + self.weights
            + self.optimizer
            + max(self.activations, self.gradients)
            + self.transient
        )


def activation_bytes(spec: SubnetSpec, work: Workload) -> int:
    """Bytes autograd saves for backward in one training step."""
    h, d = spec.parent.hidden, spec.parent.head_dim
    b, s, beta, mask = work.batch, work.seq, work.bytes_per_elem, work.mask_bytes
    total = 0
    for layer in spec.layers:
        d_a = layer.heads * d
        total += beta * s * b * (4 * h + 4 * d_a + 2 * layer.ffn) + mask * 2 * s * b * h
        if work.eager_attention:
            total += (2 * beta + mask) * layer.heads * s * s * b
    # embeddings (sum, LayerNorm, dropout mask) and per-token/per-sequence odds and ends
    total += 3 * beta * s * b * h + 32 * beta * s * b + 3 * beta * b * h
    return total


def training_estimate(
    spec: SubnetSpec, params: int, work: Workload, runtime: int = TRAINING_RUNTIME_BYTES
) -> MemoryEstimate:
    """Peak bytes of training ``spec`` (``params`` trainable fp32 parameters) with AdamW."""
    weights, gradients, optimizer = 4 * params, 4 * params, 8 * params
    activations = activation_bytes(spec, work)
    forward_end = activations + _FORWARD_FIXED
    backward = gradients + int(_BACKWARD_ACTIVATIONS * activations) + _BACKWARD_FIXED
    return MemoryEstimate(
        params=params,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        # what the larger moment holds beyond max(activations, gradients), so ``total`` is the peak
        transient=max(forward_end, backward) - max(activations, gradients),
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
    per_layer = [
        beta * s * b * (3 * h + 3 * layer.heads * d + layer.ffn) + 2 * beta * layer.heads * s * s * b
        for layer in spec.layers
    ]
    return MemoryEstimate(
        params=params,
        weights=4 * params,
        gradients=0,
        optimizer=0,
        activations=max(per_layer),
        transient=_INFERENCE_FIXED + 2 * beta * s * b * h,
        runtime=runtime,
    )


# Exporting a sub-network on the device (edge_sdk.serving._install: build, trace to ONNX, parity check, [int8
# quantization and drift check], load the installed folder) runs in the device's torch process, so it
# must fit the training allowance too. Bytes above the runtime footprint, fitted on fresh processes
# exporting MiniLM sub-networks (bench/export_memory.py): per parameter the module, the traced graph
# and the serialized model; fixed, the exporter's and (int8) the quantizer's imports and sessions.
_EXPORT_PER_PARAM = {False: 17, True: 23}
_EXPORT_FIXED = {False: 64_000_000, True: 215_000_000}


def export_estimate(params: int, *, quantize: bool) -> int:
    """Peak bytes above the runtime footprint of exporting a ``params``-parameter sub-network to ONNX."""
    return _EXPORT_PER_PARAM[quantize] * params + _EXPORT_FIXED[quantize]


def serving_estimate(
    spec: SubnetSpec, params: int, work: Workload, *, runtime_footprint: int, quantize: bool
) -> MemoryEstimate:
    """The larger of the two moments of serving ``spec`` on a device, against its inference budget.

    ONNX Runtime serving it (:func:`inference_estimate`, ORT's own runtime), and the device's torch
    process exporting it (``runtime_footprint`` + :func:`export_estimate`). The returned parts are
    those of whichever moment is larger.
    """
    served = inference_estimate(spec, params, work)
    export = export_estimate(params, quantize=quantize)
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
