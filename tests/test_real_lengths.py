"""Real lengths: rows truncated at a max length, every (micro-)batch padded only to its longest row."""

import numpy as np
import pytest
import torch

from edge_sdk._errors import ConfigError
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._build import build_model
from edge_sdk.training._data import (
    default_max_length,
    encode,
    iter_batches,
    load_tokenizer,
    read_tsv,
    split_batch,
    trim,
)
from edge_sdk.training._runner import TextDataset

from .models import SST2, minilm, minilm_dir


def test_batches_are_padded_to_their_longest_row() -> None:
    rows = read_tsv(SST2 / "train.tsv", limit=64)
    data = encode(load_tokenizer(minilm_dir(), 128), rows)
    assert data.input_ids.shape[1] == int(data.lengths.max())  # the data set: to its longest row
    for batch in iter_batches(data, 8, seed=0, shuffle=False):
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(axis=1).max())
        assert batch["labels"].shape == (8,)
    short = encode(load_tokenizer(minilm_dir(), 12), rows)
    assert short.input_ids.shape[1] == 12 and short.lengths.max() == 12  # truncated at the max length
    assert (short.input_ids[short.lengths == 12, 11] == 102).all()  # [SEP] kept at the cut


def test_micro_batches_split_rows_and_trim_each() -> None:
    mask = np.zeros((5, 9), dtype=np.int64)
    for i, n in enumerate([2, 9, 3, 4, 1]):
        mask[i, :n] = 1
    batch = {"input_ids": mask * 7, "attention_mask": mask, "labels": np.arange(5)}
    parts = split_batch(batch, 3)
    assert [p["labels"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert [p["input_ids"].shape[1] for p in parts] == [9, 4, 1]
    assert len(split_batch(batch, 8)) == 5  # never more micro-batches than rows
    assert trim(batch)["input_ids"].shape == (5, 9)
    with pytest.raises(ConfigError):
        split_batch(batch, 0)


def test_default_max_length_is_a_quantile_capped_by_the_model() -> None:
    lengths = np.arange(1, 1001)
    assert default_max_length(lengths) == 1000  # the 99.9th percentile: a length that occurs
    assert default_max_length(lengths, quantile=0.5) == 501
    assert default_max_length(lengths, cap=128) == 128
    data = TextDataset(read_tsv(SST2 / "train.tsv", limit=2000), minilm_dir())
    p999 = data.default_max_length(cap=512)
    assert 40 <= p999 <= int(data.encoded(512).lengths.max())
    assert data.default_max_length(cap=16) == 16


def test_dynamic_padding_leaves_the_logits_of_unpadded_rows_unchanged() -> None:
    """The real MiniLM: a batch padded to its longest row gives the logits of the same rows padded to 128."""
    parent = minilm()
    model = build_model(SubnetSpec.full(parent.dims), parent.config, parent.state)
    data = encode(load_tokenizer(minilm_dir(), 128), read_tsv(SST2 / "dev.tsv", limit=16))
    (batch,) = list(iter_batches(data, 16, seed=0, shuffle=False))
    width = batch["input_ids"].shape[1]
    assert width < 64  # the batch is short: most of 128 would be padding
    padded = {k: np.pad(v, ((0, 0), (0, 128 - width))) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        short = model(**{k: torch.as_tensor(v) for k, v in batch.items() if k != "labels"}).logits
        long = model(**{k: torch.as_tensor(v) for k, v in padded.items()}).logits
    torch.testing.assert_close(short, long, atol=1e-5, rtol=0)
