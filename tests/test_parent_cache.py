"""A ranked parent, remembered: the second ranking of a model folder reads the cache and loads nothing,
with the same weights, salience, config and task; a changed folder or another seed ranks again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from edge_sdk.scaling import ranked_parent

from .models import tiny_vocab_bert_config


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded, not read from the cache")


def test_the_second_ranking_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, cache = tmp_path / "model", tmp_path / "cache"
    transformers.BertForSequenceClassification(tiny_vocab_bert_config()).save_pretrained(folder)
    first, salience = ranked_parent(folder, seed=3, cache=cache)

    monkeypatch.setattr("edge_sdk.scaling._ranked.load_parent", _never)
    second, again = ranked_parent(folder, seed=3, cache=cache)
    assert second.task == first.task and second.family is first.family
    assert second.config == first.config
    assert second.state.keys() == first.state.keys()
    assert all(torch.equal(second.state[k], first.state[k]) for k in first.state)
    assert torch.equal(again.heads, salience.heads) and torch.equal(again.ffn, salience.ffn)
    assert again.method == salience.method

    with pytest.raises(AssertionError, match="not read from the cache"):
        ranked_parent(folder, seed=4, cache=cache)  # another seed: another head, ranked again
    weights = next(folder.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(AssertionError, match="not read from the cache"):
        ranked_parent(folder, seed=3, cache=cache)  # the folder changed: ranked again


def test_a_broken_cache_file_is_ignored(tmp_path: Path) -> None:
    folder, cache = tmp_path / "model", tmp_path / "cache"
    transformers.BertForSequenceClassification(tiny_vocab_bert_config()).save_pretrained(folder)
    ranked_parent(folder, cache=cache)
    (written,) = (cache / "parents").iterdir()
    written.write_bytes(b"not safetensors")
    parent, _ = ranked_parent(folder, cache=cache)  # loaded again, and remembered again
    assert parent.state and (cache / "parents" / written.name).stat().st_size > 100
