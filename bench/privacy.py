"""What does differential privacy cost? Accuracy against epsilon on the robustness benchmark's federation.

    python bench/privacy.py                              # no DP + central DP at three noise multipliers
    python bench/privacy.py --noise 0.01 --rounds 1 --steps 1 --no-docs        # a quick smoke run

The federation is bench/robustness.py's (all-MiniLM-L6-v2 on SST-2, 5 Raspberry Pi 5 8 GB devices
training the whole model, all in every round, IID split), with no attacker. DP-FedAvg at the
coordinator (``[privacy] mode = "central"``): each device's delta clipped to ``--clip-norm`` (L2 over
what it trained), devices weighted equally, Gaussian noise of standard deviation
``noise_multiplier x clip_norm`` added to the sum of the deltas on every covered coordinate
(``coordinator/federation/_privacy.py``). Epsilon for delta = 1e-5 after the last round, from
dp-accounting's RDP accountant: every round is the Gaussian mechanism with the noise multiplier,
sampled with q = 5 / 5 = 1 (no amplification by sampling: every device takes part every round).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import (
    DEVICES,
    ROOT,
    RULES,
    common_args,
    federation,
    load_run,
    quiet_logs,
    run_cells,
    warm_model,
    write_block,
)

NOISE = (0.01, 0.1, 1.0)
CLIP_NORM = 1.0
DELTA = 1e-5


def epsilon(noise_multiplier: float, rounds: int, q: float = 1.0, delta: float = DELTA) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the (subsampled) Gaussian mechanism (RDP)."""
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = RdpAccountant()
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def cell(seed: int, noise: float | None) -> str:
    return f"seed{seed}/{'no-dp' if noise is None else f'central-z{noise:g}'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, "bench-privacy")
    p.add_argument("--noise", type=float, nargs="+", default=list(NOISE), help="noise multipliers (central DP)")
    p.add_argument("--clip-norm", type=float, default=CLIP_NORM, help="each device's delta clipped to this L2 norm")
    args = p.parse_args(argv)
    quiet_logs()
    args.model = warm_model(args)
    settings: list[float | None] = [None, *args.noise]
    if not args.from_runs:
        cells = []
        for seed in args.seeds:
            for noise in [*args.noise, None]:  # no DP last: it may be bench/robustness.py's fedavg run, linked
                privacy = None
                if noise is not None:
                    privacy = {"mode": "central", "clip_norm": args.clip_norm, "noise_multiplier": noise}
                    privacy["delta"] = DELTA
                name = cell(seed, noise)
                aggregation = RULES["fedavg"] if noise is None else None  # central DP does its own merge
                cells.append((name, federation(args, seed, args.out / name, aggregation=aggregation, privacy=privacy)))
        run_cells(args, cells)
    rows = [
        "| setting | noise multiplier | epsilon (delta 1e-5), accountant | epsilon in the run's records"
        " | final accuracy % (per seed) | vs no DP, paired (points) |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    base = {s: load_run(args.out / cell(s, None)) for s in args.seeds}
    for noise in settings:
        runs = {s: load_run(args.out / cell(s, noise)) for s in args.seeds}
        finals = [100 * runs[s].final for s in args.seeds]
        diffs = [100 * (runs[s].final - base[s].final) for s in args.seeds]
        recorded = runs[args.seeds[0]].rounds[-1].get("epsilon")
        eps = "-" if noise is None else f"{epsilon(noise, args.rounds):.4g}"
        rows.append(
            f"| {'no DP (FedAvg)' if noise is None else f'central DP, clip {args.clip_norm:g}'}"
            f" | {'-' if noise is None else f'{noise:g}'} | {eps}"
            f" | {'-' if recorded is None else f'{float(recorded):.4g}'}"
            f" | {np.mean(finals):.2f} ({', '.join(f'{f:.2f}' for f in finals)})"
            f" | {'-' if noise is None else ', '.join(f'{d:+.2f}' for d in diffs)} |"
        )
    minutes = sum(load_run(args.out / cell(s, n)).wall_s for s in args.seeds for n in settings) / 60
    text = "\n".join(rows)
    print(text)
    print(f"\ntotal {minutes:.1f} min of runs; runs in {args.out}")
    if not args.no_docs:
        flags = [f"--rounds {args.rounds}", f"--steps {args.steps}"]
        flags.append("--noise " + " ".join(f"{n:g}" for n in args.noise))
        flags += [f"--warm-start {args.warm_start}"] if args.warm_start else []
        setup = (
            f"Reproduce: `python bench/privacy.py {' '.join(flags)}` (from the repository root).\n\n"
            f"Setup: bench/robustness.py's federation ({DEVICES} devices, whole model, all in every round, IID),"
            f" {args.rounds} round(s) x {args.steps} local steps, no attacker, starting from"
            f" {args.warm_start or 'MiniLM with a fresh head'}; central DP-FedAvg with each"
            f" device's delta clipped to {args.clip_norm:g}; seeds {', '.join(map(str, args.seeds))}. Wall time"
            f" of the runs: {minutes:.1f} min."
        )
        write_block(ROOT / "docs" / "privacy.md", "privacy", f"{setup}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
