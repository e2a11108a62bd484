"""A tiny random Llama (grouped-query attention) with a tiny byte-level BPE tokenizer, for the LLM export
and generation tests: built in well under a second, no download."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

CORPUS = (
    "the quick brown fox jumps over the lazy dog. a gorgeous, witty, seductive movie. "
    "Review: it is a dull film. Sentiment: negative. Review: a charming story. Sentiment: positive. "
    "café, naïve, 東京: bytes beyond ascii stream as whole characters."
)
EOS = "<|endoftext|>"


def tiny_tokenizer_dir(folder: Path, vocab_size: int = 320) -> Path:
    """``folder`` with a byte-level BPE ``tokenizer.json`` (eos ``<|endoftext|>`` = id 0) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def tiny_llama(vocab_size: int = 320, *, seed: int = 0, kv_heads: int = 2) -> transformers.LlamaForCausalLM:
    """2 layers, hidden 64, 4 query heads of 16 in ``kv_heads`` KV groups, FFN 96, tied embeddings, eos 0."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # random init is near-flat: widen it so greedy tokens are not near-ties
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval()
