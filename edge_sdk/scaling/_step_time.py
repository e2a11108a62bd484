"""A relative model of a training step's compute, to break ties between lever sets that fit.

Not a prediction of seconds: a count of multiply-adds (MACs) good enough to rank recipes for the
same sub-network and batch. For ``t = batch x seq`` tokens and a sub-network whose six linear layers
hold ``W`` weights (``sum over kept layers of 4 h d_a + 2 h d_ff``) and whose attention costs
``2 s d_a`` MACs a token per layer::

    forward   F = t (W + attention) + t W_lora            (W_lora: LoRA adapters, r (in + out) a linear)
    backward  B = t (W + attention)                        (gradients of the activations, always)
                + t W_trained                              (weight gradients: W dense, W_lora with LoRA)
    optimizer O = 8 x trainable parameters                 (AdamW: a few element-wise passes)
    step        = F + B + O + [checkpointing] F + [k micro-batches] (k - 1) x 3 % of (F + B)

so checkpointing costs about one more forward (+1/3 of a plain step), each extra micro-batch a
small fixed overhead (kernel launches and Python per pass, smaller matrix products), and LoRA
skips the weight gradients of the frozen linears. Training the embedding table on its touched rows
only, or freezing it, shrinks the optimizer's part. SDPA attention computes the same products.
"""

from __future__ import annotations

from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._memory import Workload, linear_sums, trainable_params

__all__ = ["MICRO_BATCH_OVERHEAD", "OPTIMIZER_MACS_PER_PARAM", "relative_step_time", "step_macs"]

MICRO_BATCH_OVERHEAD = 0.03  # of a plain forward + backward, per micro-batch beyond the first
OPTIMIZER_MACS_PER_PARAM = 8


def _linear_weights(spec: SubnetSpec, work: Workload) -> int:
    """Weights a token multiplies: the sliced linears, and a causal LM's output projection (h x V)."""
    return linear_sums(spec, work.arch.decoder).weights + spec.parent.hidden * work.arch.token_logits


def _adapter_weights(spec: SubnetSpec, rank: int, work: Workload) -> int:
    return rank * linear_sums(spec, work.arch.decoder).sides


def step_macs(spec: SubnetSpec, params: int, work: Workload, levers: Levers) -> float:
    """Multiply-adds of one optimizer step of ``spec`` (``params`` parameters) under ``levers``."""
    tokens = work.batch * work.seq
    weights = _linear_weights(spec, work)
    attention = sum(2 * work.seq * ly.heads * spec.parent.head_dim for ly in spec.layers)
    adapters = _adapter_weights(spec, levers.lora_rank, work) if levers.lora_rank else 0
    forward = tokens * (weights + attention + adapters)
    backward = tokens * (weights + attention) + tokens * (adapters if levers.lora_rank else weights)
    trainable, _ = trainable_params(spec, params, work, levers)
    step = float(forward + backward + OPTIMIZER_MACS_PER_PARAM * trainable)
    if levers.checkpointing:
        step += forward
    step += (levers.micro_batches - 1) * MICRO_BATCH_OVERHEAD * (forward + backward)
    return step


def relative_step_time(spec: SubnetSpec, params: int, work: Workload, levers: Levers) -> float:
    """:func:`step_macs` under ``levers`` over that of plain training of the same sub-network."""
    return step_macs(spec, params, work, levers) / step_macs(spec, params, work, Levers())
