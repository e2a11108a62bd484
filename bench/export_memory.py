"""Memory of a device's ONNX export: what a deploy adds to the training process's runtime footprint.

    python bench/export_memory.py [--fractions 1.0 0.5 0.25] [--seq 128]

A device exports its inference sub-network in its own torch process (``edge_sdk.serving._install``): build the
module, trace it to ONNX, check parity against torch, optionally quantize to int8 and measure drift,
load the installed folder in ONNX Runtime. For uniform MiniLM sub-networks of a few widths, fp32 and
int8, a fresh process imports the training runtime (torch, transformers, the model's code, as a device
measures its footprint), then does exactly that; printed: its peak RSS above that footprint, and the
memory model's ``export_estimate`` for it (the baseline), with the ratio. Runs in about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT / "examples" / "data" / "sst2" / "train.tsv"


def child(folder: Path, quantize: bool, seq: int, optimize: bool) -> None:
    """In a fresh process: the runtime, then one export as a device's Deployer does it."""
    from edge_sdk.scaling._build import model_class
    from edge_sdk.training._train import peak_rss_bytes

    config = json.loads((folder / "config.json").read_text())
    model_class(config)  # the modeling code is part of the runtime's footprint
    runtime = peak_rss_bytes()

    from safetensors.torch import load_file

    from edge_sdk._spec import SubnetSpec
    from edge_sdk.scaling._build import build_model
    from edge_sdk.serving._export import export_onnx
    from edge_sdk.serving._infer import load
    from edge_sdk.training._data import read_tsv

    spec = SubnetSpec.from_json((folder / "spec.json").read_text())
    model = build_model(spec, config, load_file(folder / "weights.safetensors"))
    rows = read_tsv(SST2, limit=64)
    texts = [r.text for r in rows]
    export_onnx(
        model,  # type: ignore[arg-type]
        Path(sys.argv[sys.argv.index("--tokenizer") + 1]),
        folder / "out",
        parity_batch=texts[:8],
        max_length=seq,
        quantize=quantize,
        optimize=optimize,
        drift_texts=texts if quantize else None,
        drift_labels=[r.label for r in rows] if quantize else None,
    )
    params = sum(p.numel() for p in model.parameters())
    del model
    load(folder / "out").predict(texts[:1])
    print(json.dumps({"runtime": runtime, "peak": peak_rss_bytes(), "params": params}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--unfused", action="store_true", help="export without ONNX Runtime's transformer fusion (default: fused)"
    )
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.quantize, args.seq, not args.unfused)
        return 0

    from safetensors.torch import save_file

    from coordinator import load_parent, resolve_model_dir
    from edge_sdk._spec import SubnetSpec
    from edge_sdk._units import format_bytes
    from edge_sdk.scaling._extract import extract, param_count
    from edge_sdk.scaling._memory import export_estimate

    model_dir = resolve_model_dir("all-MiniLM-L6-v2")
    parent = load_parent(model_dir)
    d = parent.dims
    graph = "unfused" if args.unfused else "fused"
    print(f"MiniLM export ({graph}) in a fresh process: build, ONNX, parity, [int8 + drift], load; seq {args.seq}")
    print(
        f"{'sub-network':<22} {'params':>8} {'int8':>5} {'runtime':>11} {'measured':>11} {'predicted':>11} {'ratio':>6}"
    )
    for fraction in args.fractions:
        heads = max(1, round(d.num_heads * fraction))
        ffn = max(1, round(d.ffn * fraction))
        spec = SubnetSpec.uniform(d, heads=heads, ffn=ffn)
        params = param_count(parent, spec)
        for quantize in (False, True):
            with tempfile.TemporaryDirectory(prefix="edge-fm-export-") as tmp:
                folder = Path(tmp)
                (folder / "spec.json").write_text(spec.to_json())
                (folder / "config.json").write_text(json.dumps(dict(parent.config)))
                save_file(extract(parent, spec), folder / "weights.safetensors")
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    str(folder),
                    "--seq",
                    str(args.seq),
                    "--tokenizer",
                    str(model_dir),
                    *(["--quantize"] if quantize else []),
                    *(["--unfused"] if args.unfused else []),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            got = json.loads(out.stdout.strip().splitlines()[-1])
            assert got["params"] == params, (got["params"], params)
            measured = got["peak"] - got["runtime"]
            predicted = export_estimate(params, quantize=quantize, optimize=not args.unfused)
            print(
                f"{heads:>2} heads, FFN {ffn:>5}    {params / 1e6:>7.2f}M {'yes' if quantize else 'no':>5} "
                f"{format_bytes(got['runtime']):>11} {format_bytes(measured):>11} {format_bytes(predicted):>11} "
                f"{predicted / measured:>6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
