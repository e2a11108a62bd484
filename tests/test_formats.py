"""Bring your own data: CSV, TSV (any delimiter), JSON Lines and Parquet files written by the tests,
byte-order marks, columns chosen by name, labels as names or as any integers through one label map,
and a label outside the map refused (file, line, label) before anything trains."""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.federation._config import parse_config
from coordinator.simulation._config import parse_simulation_config
from edge_sdk import ConfigError, DataFormat, LabelMap, read_rows, read_tsv
from edge_sdk.cli._join import add_data_options, data_format
from edge_sdk.protocol import TrainSettings, TrainTask
from edge_sdk.training._runner import TaskRunner, TextDataset
from edge_sdk.training._train import TrainConfig, TrainResult, train_local

AG_HEADER = "Class Index,Title,Description"
AG_ROWS = [
    '3,Wall St. Bears Claw Back,"Short-sellers, Wall Street\'s dwindling band, are seeing green again."',
    '4,"New chip, faster phones",A chip maker said on Monday its new design doubles speed.',
    "2,Late goal wins the cup,The home side scored in the last minute to take the title.",
    "1,Talks resume in Geneva,Diplomats met again on Tuesday to discuss the ceasefire.",
]
MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
MRPC_ROWS = [
    '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " .'
    '\tReferring to him as only " the witness " , Amrozi accused his brother .',
    "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain .\tYucaipa bought Dominick 's in 1995 .",
]


def write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


AG_FORMAT = DataFormat(text_column=("Title", "Description"))


# ------------------------------------------------------------------------------------------ formats


def test_csv_with_quotes_and_two_text_columns_joined(tmp_path: Path) -> None:
    data = read_rows(write(tmp_path / "ag.csv", AG_HEADER, AG_ROWS), AG_FORMAT)
    assert data.columns == ("Class Index", "Title", "Description")
    assert [r.label for r in data.rows] == ["3", "4", "2", "1"]  # "Class Index" found by name
    assert data.rows[0].text.startswith("Wall St. Bears Claw Back Short-sellers, Wall Street's")
    assert data.rows[1].text.startswith("New chip, faster phones A chip")
    assert [r.line for r in data.rows] == [2, 3, 4, 5]


def test_glue_mrpc_with_a_byte_order_mark_and_bare_quotes(tmp_path: Path) -> None:
    path = write(tmp_path / "msr_paraphrase_train.txt", MRPC_HEADER, MRPC_ROWS)  # .txt: the delimiter is sniffed
    data = read_rows(path)
    assert data.columns[0] == "Quality"  # not "\ufeffQuality"
    assert [(r.label, r.text_pair is not None) for r in data.rows] == [("1", True), ("0", True)]
    assert data.rows[0].text == 'Amrozi accused his brother , whom he called " the witness " .'
    assert data.rows[1].text_pair == "Yucaipa bought Dominick 's in 1995 ."


def test_sst2_and_rte_headers_still_read_as_before(tmp_path: Path) -> None:
    sst = write(tmp_path / "sst.tsv", "sentence\tlabel", ["a fine film\t1", "dull\t0"])
    rte = write(tmp_path / "rte.tsv", "sentence1\tsentence2\tlabel\tidx", ["A man.\tA person.\t0\t0"])
    assert [(e.text, e.label) for e in read_tsv(sst)] == [("a fine film", 1), ("dull", 0)]
    (pair,) = read_tsv(rte)
    assert (pair.text, pair.text_pair, pair.label) == ("A man.", "A person.", 0)
    test_split = write(tmp_path / "test.tsv", "label\tcontent", ["1\tgreat", "0\tbad"])  # SST-2's test layout
    assert [r.text for r in read_rows(test_split).rows] == ["great", "bad"]


def test_any_delimiter_and_explicit_format(tmp_path: Path) -> None:
    path = write(tmp_path / "data.txt", "text;label", ["one;a", "two;b"])
    assert [r.label for r in read_rows(path).rows] == ["a", "b"]  # sniffed
    path = write(tmp_path / "data.dat", "text|label", ["one|a", "two|b"])
    assert [r.text for r in read_rows(path, DataFormat(format="csv", delimiter="|")).rows] == ["one", "two"]


def test_json_lines_with_integer_and_name_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [{"review": "good", "stars": 5}, {"review": "bad", "stars": 1.0}, {"review": "ok", "stars": "3"}]
    path.write_text("\ufeff" + "\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    data = read_rows(path, DataFormat(text_column=("review",), label_column="stars"))
    assert [(r.text, r.label, r.line) for r in data.rows] == [("good", "5", 1), ("bad", "1", 2), ("ok", "3", 3)]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["yes", "no", "maybe"], "label": [1, 0, 2]}), path)
    data = read_rows(path)
    assert [(r.text, r.label, r.line) for r in data.rows] == [("yes", "1", 1), ("no", "0", 2), ("maybe", "2", 3)]
    assert data.where == "row"


def test_errors_name_the_file_the_line_and_the_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path / "ag.csv", AG_HEADER, AG_ROWS)
    with pytest.raises(ConfigError, match=r"ag.csv: no text column: the file has \['Class Index', 'Title'"):
        read_rows(path)
    with pytest.raises(ConfigError, match=r"text_column 'Body' is not a column; the file has"):
        read_rows(path, DataFormat(text_column=("Body",)))
    bad = write(tmp_path / "bad.tsv", "label\tsentence", ["1\tfine", "0\ttoo\tmany"])
    with pytest.raises(ConfigError, match=r"bad.tsv: line 3: 3 field\(s\) separated by '\\t'; the header has 2"):
        read_rows(bad)
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"x.jsonl: line 2: no value for column\(s\) \['label'\]"):
        read_rows(jsonl)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.csv: line 2: not UTF-8 text"):
        read_rows(latin)
    with pytest.raises(ConfigError, match="format must be one of"):
        DataFormat(format="xlsx")


# ------------------------------------------------------------------------------------------ label map


def test_labels_as_names_and_as_one_based_integers() -> None:
    inferred = LabelMap.infer(["3", "10", "1", "2", "02"])
    assert inferred.values == ("1", "2", "3", "10")  # integers sorted numerically
    assert [inferred.index(x) for x in ("1", "02", "10", "4")] == [0, 1, 3, None]
    named = LabelMap.from_config({"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"})
    assert [named.index(x) for x in ("1", "4", "Sports", "0", "5")] == [0, 3, 1, None, None]
    glue = LabelMap.from_config(["negative", "positive"])  # names only: integers 0..n-1 are indices
    assert [glue.index(x) for x in ("positive", "0", "1", "2")] == [1, 0, 1, None]
    assert LabelMap.infer(["pos", "neg"]).names == ("neg", "pos")
    with pytest.raises(ConfigError, match="at least 2"):
        LabelMap.infer(["1", "1"])


def test_the_map_travels_in_a_model_config_and_is_checked_on_arrival() -> None:
    named = LabelMap.from_config({"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"})
    config = named.apply_to({"hidden_size": 8, "id2label": {str(i): f"LABEL_{i}" for i in range(4)}})
    assert config["id2label"]["3"] == "Sci/Tech" and config["label2id"]["World"] == 0
    assert LabelMap.from_model_config(config) == named
    with pytest.raises(ConfigError, match="classifier has 2 outputs; the run has 4 labels"):
        named.apply_to({"id2label": {"0": "a", "1": "b"}})
    for bad in (
        {"id2label": {str(i): "x" * 5000 for i in range(2)}},
        {"id2label": {"0": "a", "2": "b"}},
        {"id2label": {str(i): str(i) for i in range(100_000)}},
        {"id2label": {"0": "a", "1": "b"}, "label_values": ["1"]},
    ):
        with pytest.raises(ConfigError):
            LabelMap.from_model_config(bad)


def test_a_label_outside_the_map_names_the_file_line_and_label(tmp_path: Path) -> None:
    path = write(tmp_path / "ag.csv", AG_HEADER, [*AG_ROWS, "5,Odd one,Not a class of the run."])
    data = read_rows(path, AG_FORMAT)
    with pytest.raises(ConfigError, match=r"ag.csv: line 6: label '5' is not one of the run's 4 labels \('1', '2'"):
        LabelMap.from_config([1, 2, 3, 4]).examples(data)


def tiny_task(labels: LabelMap) -> tuple[TrainTask, dict[str, np.ndarray]]:
    """A train task for a 2-layer BERT with MiniLM's vocabulary and a head of ``len(labels)`` classes."""
    import transformers

    from edge_sdk._spec import SubnetSpec
    from edge_sdk.protocol import encode_tensors, torch_to_numpy
    from edge_sdk.scaling._extract import extract
    from edge_sdk.scaling._parent import parent_from_module

    from .models import tiny_vocab_bert_config

    config = tiny_vocab_bert_config()
    config.num_labels = len(labels)
    parent = parent_from_module(transformers.BertForSequenceClassification(config))
    spec = SubnetSpec.full(parent.dims)
    tensors = torch_to_numpy(extract(parent, spec))
    task = TrainTask(
        task_id="t",
        round=1,
        spec=spec.to_dict(),
        model_config=json.loads(json.dumps(labels.apply_to(parent.config), default=str)),
        settings=TrainSettings(local_steps=1, lr=1e-3, batch_size=2, seq_len=16),
        weights=encode_tensors(tensors)[0],
    )
    return task, tensors


def test_a_device_refuses_a_label_outside_the_map_before_any_training(tmp_path: Path) -> None:
    path = write(tmp_path / "ag.csv", AG_HEADER, [*AG_ROWS, "7,Odd one,Not a class of the run."])
    data = TextDataset(read_rows(path, AG_FORMAT), None)
    assert len(data) == 5  # counted before any label map arrives
    trained: list[int] = []

    def train(model: Any, batches: Any, config: TrainConfig) -> TrainResult:
        trained.append(1)
        return train_local(model, batches, config)

    runner = TaskRunner(data, train_fn=train)
    task, tensors = tiny_task(LabelMap.from_config([1, 2, 3, 4]))
    with pytest.raises(ConfigError, match=r"ag.csv: line 6: label '7' is not one of the run's 4 labels"):
        runner.train(task, tensors, threading.Event())
    assert trained == []
    task, tensors = tiny_task(LabelMap.from_config({1: "World", 2: "Sports", 3: "Business", 4: "Sci/Tech", 7: "Odd"}))
    out = runner.train(task, tensors, threading.Event())
    assert trained == [1] and out.num_samples == 5
    assert [e.label for e in data.examples] == [2, 3, 1, 0, 4]


# ------------------------------------------------------------------------------------------ configs and CLI


def test_join_options_name_the_format_and_columns(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_data_options(p)
    args = p.parse_args(
        ["--text-column", "Title", "--text-column", "Description", "--label-column", "Class Index",
         "--delimiter", "tab", "--format", "tsv", "--text-pair-column", "Other"]
    )  # fmt: skip
    fmt = data_format(args)
    assert fmt == DataFormat("tsv", "\t", ("Title", "Description"), "Other", "Class Index")
    with pytest.raises(SystemExit):
        p.parse_args(["--format", "xlsx"])


def test_run_and_simulation_configs_take_the_same_keys(tmp_path: Path) -> None:
    write(tmp_path / "ag.csv", AG_HEADER, AG_ROWS)
    columns = {"text_column": ["Title", "Description"], "label_column": "Class Index"}
    run = parse_config(
        {
            "model": {"name": "m", "labels": {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}},
            "validation": {"data": "ag.csv", **columns},
            "devices": {"d": "token-d-12345"},
            "run": {"dir": "run"},
        },
        base=tmp_path,
    )
    assert run.validation is not None and run.validation.format == DataFormat(
        text_column=("Title", "Description"), label_column="Class Index"
    )
    assert run.model.labels is not None and run.model.labels.names[3] == "Sci/Tech"
    sim = parse_simulation_config(
        {
            "model": {"name": "m"},
            "data": {"kind": "csv", "train": "ag.csv", "dev": "ag.csv", **columns},
            "devices": {"raspberry-pi-4-2gb": 2},
            "run": {"dir": "run"},
        },
        base=tmp_path,
    )
    assert sim.data.kind == "file" and sim.data.format.format == "csv"
    assert sim.data.format.text_column == ("Title", "Description")
    with pytest.raises(ConfigError, match=r"\[data\]: unknown key\(s\) text_columns"):
        parse_simulation_config(
            {"model": {"name": "m"}, "data": {"train": "ag.csv", "text_columns": ["Title"]},
             "devices": {"raspberry-pi-4-2gb": 2}, "run": {"dir": "run"}},
            base=tmp_path,
        )  # fmt: skip
    legacy = parse_config(
        {"model": {"name": "m"}, "deploy": {"labels": ["neg", "pos"]}, "devices": {"d": "token-d-12345"},
         "run": {"dir": "run"}},
        base=tmp_path,
    )  # fmt: skip
    assert legacy.model.labels == LabelMap(("neg", "pos"))
    with pytest.raises(ConfigError, match=r"\[model\] num_labels: is 2 but labels names 4"):
        parse_config(
            {"model": {"name": "m", "num_labels": 2, "labels": [1, 2, 3, 4]}, "devices": {"d": "token-d-12345"},
             "run": {"dir": "run"}},
            base=tmp_path,
        )  # fmt: skip


def test_class_indices_outside_the_run_fail_the_task_before_training(tmp_path: Path) -> None:
    """A TSV of class indices (read_tsv) with an index the model has no output for: a ConfigError
    naming the label before training (it was an IndexError inside the loss, which hung a device)."""
    path = write(tmp_path / "sst.tsv", "label\tsentence", ["0\tfine", "1\tgood", "4\tfour?"])
    runner = TaskRunner(TextDataset(read_tsv(path), None), train_fn=lambda *a: pytest.fail("trained"))
    task, tensors = tiny_task(LabelMap.default(2))
    with pytest.raises(ConfigError, match=r"label 4 is not one of the run's 2 labels"):
        runner.train(task, tensors, threading.Event())


def test_a_simulation_infers_one_based_labels_from_its_files(tmp_path: Path) -> None:
    from coordinator.simulation._run import _sim_data

    from .models import minilm_dir

    write(tmp_path / "train.csv", AG_HEADER, AG_ROWS * 4)
    write(tmp_path / "dev.csv", AG_HEADER, AG_ROWS)
    config = parse_simulation_config(
        {
            "model": {"name": "m"},
            "data": {"train": "train.csv", "dev": "dev.csv", "text_column": ["Title", "Description"]},
            "devices": {"raspberry-pi-4-2gb": 2},
            "run": {"dir": "run"},
        },
        base=tmp_path,
    )
    data, evaluator, _, labels = _sim_data(config, minilm_dir())
    assert labels.values == ("1", "2", "3", "4")
    assert list(data.labels()[:4]) == [2, 3, 1, 0]  # "3", "4", "2", "1"
    assert evaluator is not None and sorted(evaluator.data.labels.tolist()) == [0, 1, 2, 3]  # type: ignore[attr-defined]
    too_few = dict(config.model.__dict__, num_labels=2)
    with pytest.raises(ConfigError, match=r"\[model\] num_labels is 2 but the data holds 4 labels"):
        _sim_data(dataclasses.replace(config, model=type(config.model)(**too_few)), minilm_dir())


def test_a_resumed_run_keeps_its_label_map(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from coordinator.serve._run import _resumed_labels

    saved = LabelMap.from_config({"1": "World", "2": "Sports"})
    state = SimpleNamespace(model_config=saved.apply_to({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))
    base = {"devices": {"d": "token-d-12345"}, "run": {"dir": "run"}}
    plain = parse_config({"model": {"name": "m"}, **base}, base=tmp_path)
    assert _resumed_labels(plain, state) == saved  # type: ignore[arg-type]
    other = parse_config({"model": {"name": "m", "labels": ["a", "b"]}, **base}, base=tmp_path)
    with pytest.raises(ConfigError, match="holds a run with 2 labels: 1=World, 2=Sports; the config names"):
        _resumed_labels(other, state)  # type: ignore[arg-type]


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"reading Parquet needs pyarrow: pip install 'edge-fm\[parquet\]'"):
        read_rows(path)


def test_a_file_labelled_with_names(tmp_path: Path) -> None:
    path = write(
        tmp_path / "news.csv", "text,topic", ["goal!,Sports", "rates up,Business", "vote,World", "odd,Weather"]
    )
    data = read_rows(path, DataFormat(label_column="topic", text_column=("text",)))
    labels = LabelMap.from_config({"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"})
    with pytest.raises(ConfigError, match=r"news.csv: line 5: label 'Weather' is not one of the run's 4 labels"):
        labels.examples(data)
    assert [e.label for e in labels.examples(data.subset([0, 1, 2]))] == [1, 2, 0]
