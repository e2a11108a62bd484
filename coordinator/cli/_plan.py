"""``edge-coordinator plan``: the training and inference sub-networks for a memory budget.

Training levers come before widths (``--no-levers``: plain training, the width search alone);
``--forbid`` and ``--pin`` give the planner a lever policy as a run's configuration would. The
ranked model is remembered in edge-fm's cache folder (``$EDGE_FM_CACHE``, else
``~/.cache/edge-fm``): a second plan of the same model loads nothing through transformers.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from edge_sdk._units import format_bytes, size_argument
from edge_sdk.scaling import (
    INFERENCE_RUNTIME_BYTES,
    TRAINING_RUNTIME_BYTES,
    Workload,
    add_lever_arguments,
    describe_policy,
    lm_serving_estimator,
    plan_dict,
    plan_inference,
    plan_table,
    plan_training,
    policy_from_arguments,
    ranked_parent,
    resolve_model_dir,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="the sub-networks a device with this much memory would train and serve",
        description="Rank heads and neurons by salience, then find the largest sub-network whose "
        "training fits the budget (training levers first: micro-batches, checkpointing, embedding rows, "
        "then frozen embeddings and LoRA, cutting width only when none fits), and the larger one whose "
        "inference fits.",
    )
    p.add_argument("--model", required=True, help="model folder, or a packaged model name (all-MiniLM-L6-v2)")
    p.add_argument("--memory", required=True, type=size_argument, help="the device's memory budget, e.g. 1.5GB, 900MiB")
    p.add_argument("--batch", type=int, default=16, help="training batch size (default 16)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--infer-batch", type=int, default=1, help="inference batch size (default 1)")
    p.add_argument("--runtime", type=size_argument, default=None, help="the training runtime's own footprint")
    add_lever_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="load and rank the model again (by default a model ranked before is read from edge-fm's cache)",
    )


def run(args: argparse.Namespace) -> int:
    policy = policy_from_arguments(args)
    model_dir = resolve_model_dir(args.model)
    parent, salience = ranked_parent(model_dir, cache=not args.no_cache)
    train_work = Workload(args.batch, args.seq, steps=args.steps)
    training = plan_training(
        parent, salience, args.memory, train_work, runtime=args.runtime or TRAINING_RUNTIME_BYTES, policy=policy
    )
    infer_work = Workload(args.infer_batch, args.seq)
    causal = parent.task == "causal-lm"  # an LLM serves with its KV cache and the table's second copy
    inference = plan_inference(
        parent,
        salience,
        args.memory,
        infer_work,
        floor=training.spec,
        runtime=INFERENCE_RUNTIME_BYTES,
        estimator=lm_serving_estimator(parent, infer_work, runtime_footprint=None, quantize=False) if causal else None,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(model_dir),
                    "budget_bytes": args.memory,
                    "batch": args.batch,
                    "seq": args.seq,
                    "steps": args.steps,
                    "lever_policy": None if policy is None else policy.to_dict(),
                    "training": plan_dict(training),
                    "inference": plan_dict(inference),
                },
                indent=2,
            )
        )
        return 0
    d = parent.dims
    print(
        f"model {model_dir} ({d.family}: {d.num_layers} layers, {d.num_heads} heads of {d.head_dim}, "
        f"FFN {d.ffn}, hidden {d.hidden})"
    )
    print(
        f"budget {args.memory:,} bytes ({format_bytes(args.memory)}); "
        f"training batch {args.batch} x sequence {args.seq}, {args.steps} steps a task; inference batch "
        f"{args.infer_batch}; levers: {describe_policy(policy)}\n"
    )
    print("\n".join(plan_table("training sub-network", training)))
    print()
    print("\n".join(plan_table("inference sub-network", inference)))
    return 0
