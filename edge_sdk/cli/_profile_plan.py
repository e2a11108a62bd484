"""``edge-sdk profile --model DIR``: the sub-networks a coordinator would plan for this device.

The hook ``edge_sdk.cli._profile`` imports lazily: :func:`add_arguments` adds the options, and
:func:`run_plan` returns the JSON section and the table lines. Without ``--model`` nothing is planned
and nothing heavy is imported (the profile itself needs no torch).

The plans follow the coordinator's rule (``edge_sdk.scaling._planning``): training from the budget's usable
bytes less the coordinator's reserve, training levers before widths (``--no-levers``: plain training;
``--forbid``/``--pin``: a run's lever policy), inference (ONNX Runtime, no torch) from that plus the runtime
footprint, never smaller than the training sub-network. Salience is the data-free weight L1; a
coordinator configured with activation-aware salience may choose slightly different heads and neurons.
"""

from __future__ import annotations

import argparse
from typing import Any

from edge_sdk._units import format_bytes, size_argument
from edge_sdk.device._profile import DeviceProfile
from edge_sdk.scaling._budget import DEFAULT_MIN_MARGIN_BYTES, MemoryBudget
from edge_sdk.scaling._policy import add_lever_arguments, describe_policy, policy_from_arguments

__all__ = ["add_arguments", "run_plan"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sub-network plan", "with --model: the training and inference sub-networks a coordinator would plan"
    )
    group.add_argument("--model", metavar="DIR", help="model folder, or a packaged model name (all-MiniLM-L6-v2)")
    group.add_argument("--batch", type=_positive, default=8, help="training batch size (default 8, as a run's)")
    group.add_argument("--seq", type=_positive, default=64, help="training sequence length (default 64)")
    group.add_argument("--infer-batch", type=_positive, default=1, help="inference batch size (default 1)")
    group.add_argument("--infer-seq", type=_positive, default=128, help="inference sequence length (default 128)")
    group.add_argument(
        "--int8",
        action="store_true",
        help="the run deploys int8 models ([deploy] quantize): their export needs more memory",
    )
    group.add_argument(
        "--min-margin",
        type=size_argument,
        default=DEFAULT_MIN_MARGIN_BYTES,
        metavar="SIZE",
        help="the coordinator's reserve, its [federation] min_margin "
        f"(default {format_bytes(DEFAULT_MIN_MARGIN_BYTES)})",
    )
    add_lever_arguments(group)


def run_plan(
    args: argparse.Namespace, profile: DeviceProfile, budget: MemoryBudget
) -> tuple[dict[str, Any] | None, list[str]]:
    """The plan section for ``--json`` and the table lines; (None, []) without ``--model``."""
    if getattr(args, "model", None) is None:
        return None, []
    # Heavy imports (torch, transformers) only when a plan is asked for.
    from edge_sdk.scaling._memory import Workload
    from edge_sdk.scaling._models import resolve_model_dir
    from edge_sdk.scaling._planning import plan_device, plan_dict, plan_table
    from edge_sdk.scaling._ranked import ranked_parent

    policy = policy_from_arguments(args)
    model_dir = resolve_model_dir(args.model)
    parent, salience = ranked_parent(model_dir)
    plans = plan_device(
        parent,
        salience,
        usable=budget.usable,
        margin=budget.margin,
        runtime_footprint=budget.runtime_footprint,
        train=Workload(args.batch, args.seq, steps=args.steps),
        infer=Workload(args.infer_batch, args.infer_seq),
        quantize=args.int8,
        min_margin=args.min_margin,
        policy=policy,
    )
    section = {
        "model": str(model_dir),
        "salience": "weight_l1",
        "min_margin_bytes": args.min_margin,
        "training_workload": {"batch": args.batch, "seq": args.seq},
        "steps": args.steps,
        "lever_policy": None if policy is None else policy.to_dict(),
        "inference_workload": {"batch": args.infer_batch, "seq": args.infer_seq, "int8": args.int8},
        "training": plan_dict(plans.training),
        "inference": plan_dict(plans.inference),
        "inference_could_grow": plans.serving.could_grow,
        "inference_export_fits": plans.serving.fits,
    }
    d = parent.dims
    lines = [
        "",
        f"Plan for {args.model} ({d.family}: {d.num_layers} layers, {d.num_heads} heads, FFN {d.ffn}; "
        f"salience: weight L1; coordinator reserve {format_bytes(args.min_margin)})",
        f"  training batch {args.batch} x sequence {args.seq}, {args.steps} steps a task, levers: "
        f"{describe_policy(policy)}; inference batch {args.infer_batch} x sequence "
        f"{args.infer_seq}{' int8' if args.int8 else ''}, in ONNX Runtime without torch (the runtime footprint "
        "is free for it; the export on this device must fit too)",
        *(f"  {line}".rstrip() for line in plan_table("training sub-network", plans.training)),
        "",
        *(f"  {line}".rstrip() for line in plan_table("inference sub-network", plans.inference)),
    ]
    if not plans.serving.fits:
        lines.append(
            "  warning: not even the training sub-network's export fits this budget; it would be served"
            " anyway, at the risk of the export's peak"
        )
    return section, lines
