"""Causal-LM test helpers: the vendored SST-2 instruction records, a tiny byte-level BPE tokenizer
trained on them, and a tiny random Llama model folder that uses it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from .models import ROOT

SST2_INSTRUCT = ROOT / "examples" / "data" / "sst2-instruct"
EOS = "<|endoftext|>"
TINY_LLAMA = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=128,
)


def instruct_texts(limit: int = 300) -> list[str]:
    """Prompts and responses of the vendored records (the tokenizer's training text)."""
    texts = []
    for line in (SST2_INSTRUCT / "train-0.jsonl").read_text(encoding="utf-8").splitlines()[:limit]:
        record = json.loads(line)
        texts += [record["prompt"], record["response"]]
    return texts


def tiny_tokenizer_dir(folder: Path, vocab_size: int = 384) -> Path:
    """A byte-level BPE tokenizer (``tokenizer.json``, ``<|endoftext|>`` its eos) trained on the records."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(instruct_texts(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}), encoding="utf-8")
    return folder


def tiny_llama_config(vocab_size: int, **overrides: object) -> transformers.LlamaConfig:
    settings: dict[str, object] = {**TINY_LLAMA, "tie_word_embeddings": True, "eos_token_id": 0, "pad_token_id": 0}
    return transformers.LlamaConfig(vocab_size=vocab_size, **{**settings, **overrides})


def tiny_llama_dir(folder: Path, *, causal: bool = True, seed: int = 0) -> Path:
    """A model folder: a tiny random Llama (causal LM, or a 2-label classifier), its tokenizer."""
    tiny_tokenizer_dir(folder)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab, num_labels=2)
    model = transformers.LlamaForCausalLM(config) if causal else transformers.LlamaForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
