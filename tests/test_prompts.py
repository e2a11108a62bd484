"""Causal-LM records: reading prompt/response files, tokenizing with the loss on the response only,
batches padded on the right, the held-out response-token loss, and the run config of the task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.federation._config import parse_config
from coordinator.federation._preflight import check_data_file
from edge_sdk import ConfigError, DataFormat, SpecError, is_prompt_file, read_prompts
from edge_sdk.training._data import iter_batches
from edge_sdk.training._prompts import IGNORE_INDEX, PromptDataset, PromptRow, PromptTokenizer, encode_prompts
from edge_sdk.training._train import evaluate

from ._llm import EOS, SST2_INSTRUCT, tiny_llama_config, tiny_tokenizer_dir
from .models import SST2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def test_the_vendored_records_read_with_their_responses_as_written() -> None:
    dev = read_prompts(SST2_INSTRUCT / "dev.jsonl")
    assert len(dev) == 200
    assert {r.response for r in dev.rows} == {" positive", " negative"}  # the leading space is kept
    assert all(r.prompt.startswith("Review: ") and r.prompt.endswith("\nSentiment:") for r in dev.rows)
    assert all(len(read_prompts(SST2_INSTRUCT / f"train-{k}.jsonl")) == 300 for k in range(3))
    assert sum(p.stat().st_size for p in SST2_INSTRUCT.glob("*.jsonl")) < 300_000
    assert is_prompt_file(SST2_INSTRUCT / "dev.jsonl")
    assert not is_prompt_file(SST2 / "dev.tsv")


def test_columns_are_named_or_found_and_bad_records_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"what is 2+2?", four\n', encoding="utf-8")
    (row,) = read_prompts(path).rows
    assert (row.prompt, row.response) == ("what is 2+2?", " four")
    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"q": "hi", "a": " there"}) + "\n", encoding="utf-8")
    fmt = DataFormat(prompt_column="q", response_column="a")
    assert is_prompt_file(named, fmt)
    assert read_prompts(named, fmt).rows[0].response == " there"
    with pytest.raises(ConfigError, match="no response column"):
        read_prompts(named, DataFormat(prompt_column="q"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(
        json.dumps({"prompt": "x", "response": "ok"}) + "\n" + json.dumps({"prompt": "y", "response": " "}) + "\n"
    )
    with pytest.raises(ConfigError, match=r"empty.jsonl: line 2: the response is empty"):
        read_prompts(empty)
    # the preflight check reads records for the causal-LM task, labelled rows for classification
    assert check_data_file(SST2_INSTRUCT / "dev.jsonl", "[validation] data", task="causal-lm") == 200
    with pytest.raises(ConfigError, match="no label column"):
        check_data_file(SST2_INSTRUCT / "dev.jsonl", "[validation] data", task="text-classification")


def test_prompt_tokens_are_masked_and_the_response_and_eos_are_the_labels(tokenizer_dir: Path) -> None:
    tok = PromptTokenizer(tokenizer_dir)
    eos = tok.tokenizer.token_to_id(EOS)
    assert tok.eos == eos and tok.pad == eos
    rows = [
        PromptRow("Review: a fine film .\nSentiment:", " positive"),
        PromptRow("Review: bad\nSentiment:", " negative"),
    ]
    enc = encode_prompts(tok, rows, max_length=64)
    for i, row in enumerate(rows):
        p, r = tok.ids([row.prompt])[0], tok.ids([row.response])[0] + [eos]
        n = len(p) + len(r)
        assert enc.input_ids[i, :n].tolist() == p + r
        assert (enc.labels[i, : len(p)] == IGNORE_INDEX).all()  # no loss on the prompt
        assert enc.labels[i, len(p) : n].tolist() == r  # the response and its end token
        assert (enc.attention_mask[i, :n] == 1).all() and (enc.attention_mask[i, n:] == 0).all()
        assert (enc.labels[i, n:] == IGNORE_INDEX).all()  # nor on the right padding
    assert enc.input_ids.shape[1] == max(enc.lengths)
    assert tok.tokenizer.decode(enc.labels[0][enc.labels[0] >= 0].tolist()) == " positive"
    # a long row loses the start of its prompt, never its response
    cut = encode_prompts(tok, rows[:1], max_length=5)
    response = tok.ids([" positive"])[0] + [eos]
    assert cut.input_ids.shape[1] == 5 and cut.input_ids[0, -len(response) :].tolist() == response
    assert cut.input_ids[0, : 5 - len(response)].tolist() == tok.ids([rows[0].prompt])[0][-(5 - len(response)) :]


def test_batches_are_padded_to_their_longest_row(tokenizer_dir: Path) -> None:
    data = PromptDataset(read_prompts(SST2_INSTRUCT / "train-0.jsonl", limit=40), tokenizer_dir, holdout=8)
    assert len(data) == 32 and len(data.held_out) == 8
    batch = next(data.batches(4, 48, seed=0))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(axis=1).max() <= 48
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()


def test_held_out_loss_is_the_mean_over_response_tokens(tokenizer_dir: Path) -> None:
    import transformers

    tok = PromptTokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tok.vocab_size)).eval()
    rows = list(read_prompts(SST2_INSTRUCT / "dev.jsonl", limit=6).rows)
    enc = encode_prompts(tok, rows, max_length=64)
    metrics = evaluate(model, iter_batches(enc, 4, seed=0, shuffle=False))  # batches of 4 and 2 rows
    # by hand: every response token weighs the same, whatever its row and batch
    total, count = 0.0, 0
    for i in range(len(rows)):
        with torch.no_grad():
            n = int(enc.lengths[i])
            ids = torch.as_tensor(enc.input_ids[i : i + 1, :n])
            out = model(input_ids=ids, labels=torch.as_tensor(enc.labels[i : i + 1, :n]))
        tokens = int((enc.labels[i, 1:n] != IGNORE_INDEX).sum())
        total, count = total + float(out.loss) * tokens, count + tokens
    assert metrics["tokens"] == count == sum(len(tok.ids([r.response])[0]) + 1 for r in rows)
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert metrics["samples"] == 6 and "accuracy" not in metrics


def test_the_causal_lm_task_has_no_labels_and_reads_prompt_columns() -> None:
    base = {
        "model": {"name": "m", "task": "causal-lm"},
        "devices": {"a": "token-of-a-device"},
        "run": {"dir": "run"},
        "validation": {
            "data": str(SST2_INSTRUCT / "dev.jsonl"),
            "prompt_column": "prompt",
            "response_column": "response",
        },
    }
    cfg = parse_config(base, base="/srv")
    assert cfg.model.task == "causal-lm" and cfg.model.labels is None
    assert cfg.validation is not None and cfg.validation.format.response_column == "response"
    with pytest.raises(ConfigError, match=r"\[model\] labels: does not apply to task 'causal-lm'"):
        parse_config({**base, "model": {"name": "m", "task": "causal-lm", "labels": ["a", "b"]}})


def test_a_causal_lm_run_sends_its_head_and_no_label_map(tokenizer_dir: Path) -> None:
    import transformers

    from coordinator.federation._tables import task_config
    from edge_sdk.scaling import parent_from_module
    from edge_sdk.training import model_task

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(PromptTokenizer(tokenizer_dir).vocab_size))
    sent = task_config(parent_from_module(model, "causal-lm"), None)
    assert sent["architectures"] == ["LlamaForCausalLM"] and model_task(sent) == "causal-lm"
    assert not {"id2label", "label2id", "label_values"} & set(sent)


def test_evaluate_keeps_classification_metrics(tokenizer_dir: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = tiny_llama_config(PromptTokenizer(tokenizer_dir).vocab_size, num_labels=2)
    model = transformers.LlamaForSequenceClassification(config).eval()
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    metrics = evaluate(model, iter([{**batch, "labels": np.array([0, 1])}]))
    assert set(metrics) >= {"accuracy", "loss", "macro_f1"} and "perplexity" not in metrics


def test_a_llama_classifies_text_through_the_text_classification_path(tokenizer_dir: Path) -> None:
    """LlamaForSequenceClassification: the run names its head and a pad id (its end token's); a
    device builds that head (not the family's first task, the causal LM) and trains on padded
    batches of labelled texts, each row scored at its own last token."""
    import transformers

    from coordinator.federation._tables import task_config
    from edge_sdk import LabelMap, SubnetSpec, TextDataset, build_model, read_rows
    from edge_sdk.scaling import parent_from_module
    from edge_sdk.training import model_task
    from edge_sdk.training._train import TrainConfig, train_local

    torch.manual_seed(0)
    vocab = PromptTokenizer(tokenizer_dir).vocab_size
    config = tiny_llama_config(vocab, num_labels=2, pad_token_id=None, eos_token_id=3)
    parent = parent_from_module(transformers.LlamaForSequenceClassification(config), "text-classification")
    labels = LabelMap.infer(["0", "1"])
    sent = task_config(parent, labels)
    assert sent["architectures"] == ["LlamaForSequenceClassification"] and sent["pad_token_id"] == 3
    assert model_task(sent) == "text-classification" and model_task(parent.config) is None
    model = build_model(SubnetSpec.full(parent.dims), sent, parent.state, task=model_task(sent))
    assert type(model).__name__ == "LlamaForSequenceClassification"
    data = TextDataset(read_rows(SST2 / "dev.tsv", limit=24), tokenizer_dir)
    data.use_labels(labels)
    batch = next(data.eval_batches(8, 64))
    assert (batch["attention_mask"] == 0).any()  # padded rows: scored at their last real token
    whole = evaluate(model, iter([batch]))
    rows = [
        {
            k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] if v.ndim == 2 else v[i : i + 1]
            for k, v in batch.items()
        }
        for i in range(8)
    ]
    alone = [evaluate(model, iter([row]))["loss"] for row in rows]
    assert whole["loss"] == pytest.approx(float(np.mean(alone)), rel=1e-5)
    result = train_local(model, data.batches(8, 64, seed=0), TrainConfig(steps=2, lr=1e-3))
    assert math.isfinite(result.loss)


def test_records_and_a_classifier_do_not_mix(tokenizer_dir: Path) -> None:
    from edge_sdk.training._runner import _check_data_kind

    _check_data_kind("causal-lm", "causal-lm")
    _check_data_kind(None, "text-classification")
    with pytest.raises(SpecError, match="trains a text-classification model but this device's data holds prompt/resp"):
        _check_data_kind(
            PromptDataset(read_prompts(SST2_INSTRUCT / "dev.jsonl", limit=4), tokenizer_dir).task, "text-classification"
        )
    with pytest.raises(SpecError, match="trains a causal-lm model but this device's data holds labelled examples"):
        _check_data_kind(None, "causal-lm")
