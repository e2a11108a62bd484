"""End to end, in process, over real websockets on 127.0.0.1: a coordinator built from a run config
(``build_engine`` + ``serve_async``, as ``edge-coordinator serve`` runs it) and SDK devices reading
their own files, for the layouts a newcomer brings without converting them:

- an AG-News-like CSV (``Class Index,Title,Description``, classes 1-4, title and description joined),
  the classes named in the config; a device holding a class outside the map fails its task (named
  file, line and label) and the others train; the deployed model names the classes;
- a sentence-pair file with GLUE MRPC's headers and byte-order mark, the labels inferred from the
  coordinator's validation file.

The model is a 2-layer BERT with random weights and MiniLM's vocabulary (the packaged tokenizer).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import transformers

from coordinator.federation import latest_checkpoint, load_checkpoint, parse_config
from coordinator.serve._run import build_engine, serve_async
from edge_sdk import DataFormat, LabelMap, load, read_rows
from edge_sdk.client._backoff import Backoff
from edge_sdk.client._client import DeviceOptions, EdgeDevice
from edge_sdk.training._runner import TextDataset

from .models import minilm_dir, tiny_vocab_bert_config

AG_WORDS = {
    "1": ["talks", "minister", "election", "ceasefire", "embassy", "parliament"],
    "2": ["goal", "match", "coach", "season", "tournament", "striker"],
    "3": ["shares", "profit", "market", "bank", "earnings", "merger"],
    "4": ["software", "chip", "internet", "satellite", "phone", "research"],
}
TIMEOUT = 120.0


def tiny_model(folder: Path, num_labels: int) -> Path:
    config = tiny_vocab_bert_config()
    config.num_labels = num_labels
    transformers.BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    return folder


def ag_csv(path: Path, rows: int, seed: int, extra: str = "") -> Path:
    rng = random.Random(seed)
    lines = ["Class Index,Title,Description"]
    for _ in range(rows):
        label = rng.choice(sorted(AG_WORDS))
        words = AG_WORDS[label]
        title = " ".join(rng.choices(words, k=3)).capitalize()
        lines.append(f'{label},{title},"{rng.choice(words)}, {rng.choice(words)} and {rng.choice(words)}."')
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def mrpc_txt(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for i in range(rows):
        first = " ".join(rng.choices(["the", "company", "said", "shares", '"', "rose", "on", "Monday"], k=8))
        second = first if rng.random() < 0.5 else " ".join(rng.sample(first.split(), k=4))
        lines.append(f"{int(first == second)}\t{1000 + i}\t{2000 + i}\t{first} .\t{second} .")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_config(folder: Path, model: Path, names: list[str], extra_model: dict[str, Any], validation: dict[str, Any]):  # type: ignore[no-untyped-def]
    data = {
        "model": {"name": str(model), "seed": 1, **extra_model},
        "federation": {"rounds": 2, "min_devices": len(names), "device_wait_s": 60, "round_deadline_s": 60},
        "training": {"local_steps": 2, "batch_size": 4, "seq_len": 32, "lr": 1e-3},
        "validation": {"tokenizer": str(minilm_dir()), "limit": 64, **validation},
        "server": {"host": "127.0.0.1", "port": 0, "port_file": "port"},
        "devices": {name: f"token-of-{name}" for name in names},
        "run": {"dir": "run"},
        "deploy": {"timeout_s": 120},
    }
    return parse_config(data, base=folder, where="run.toml")


def options(port: int, name: str, deploy_dir: Path | None = None) -> DeviceOptions:
    return DeviceOptions(
        url=f"ws://127.0.0.1:{port}",
        token=f"token-of-{name}",
        memory_budget="4GB",
        probe=False,
        threads=1,
        deploy_dir=deploy_dir,
        backoff=Backoff(initial_s=0.05, max_s=0.2, give_up_s=30),
    )


async def federate(config: Any, datasets: dict[str, TextDataset], deploy_dir: Path | None = None) -> dict[str, Any]:
    """Serve ``config``'s run to the ``datasets``' devices; each device's result (tasks done, or its error)."""
    engine = build_engine(config)
    server = asyncio.ensure_future(serve_async(config, engine, handle_signals=False))
    port_file = config.server.port_file
    async with asyncio.timeout(TIMEOUT):
        while not (port_file.is_file() and port_file.read_text().strip()):
            await asyncio.sleep(0.05)
        port = int(port_file.read_text())
        devices = [
            EdgeDevice(options(port, name, deploy_dir if i == 0 else None), data)
            for i, (name, data) in enumerate(datasets.items())
        ]
        results = await asyncio.gather(*(d.run_async() for d in devices), return_exceptions=True)
        assert await server == 0
    return dict(zip(datasets, results, strict=True))


def outcomes(run_dir: Path) -> list[dict[str, Any]]:
    state = load_checkpoint(latest_checkpoint(run_dir))  # type: ignore[arg-type]
    return [d for entry in state.history for d in entry["devices"]]


def test_an_ag_news_csv_with_one_based_classes_and_two_text_columns(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model", 4)
    ag_csv(tmp_path / "dev.csv", 40, seed=0)
    columns = {"text_column": ["Title", "Description"]}
    names = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
    config = run_config(tmp_path, model, ["a", "b", "odd"], {"labels": names}, {"data": "dev.csv", **columns})
    fmt = DataFormat(text_column=("Title", "Description"))
    datasets = {
        "a": TextDataset(read_rows(ag_csv(tmp_path / "a.csv", 24, seed=1), fmt), None),
        "b": TextDataset(read_rows(ag_csv(tmp_path / "b.csv", 24, seed=2), fmt), None),
        # a class the run does not have, on line 10 of this device's file
        "odd": TextDataset(read_rows(ag_csv(tmp_path / "odd.csv", 8, seed=3, extra="5,Odd,One out.\n"), fmt), None),
    }
    results = asyncio.run(federate(config, datasets, deploy_dir=tmp_path / "installed"))
    assert results["a"] == 2 and results["b"] == 2, results
    rows = outcomes(tmp_path / "run")
    assert sorted(d["status"] for d in rows if d["device_id"] != "odd") == ["ok"] * 4
    odd = [d for d in rows if d["device_id"] == "odd"]
    assert odd and all(d["status"] != "ok" for d in odd)
    assert all("odd.csv: line 10: label '5' is not one of the run's 4 labels" in d["reason"] for d in odd), odd
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
    assert LabelMap.from_model_config(state.model_config) == LabelMap(tuple(names.values()), tuple(names))
    predictor = load(tmp_path / "installed")
    assert predictor.labels == ("World", "Sports", "Business", "Sci/Tech")
    assert predictor.predict(["Goal in the match"])[0].label in names.values()


def test_a_glue_mrpc_pair_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model", 2)
    mrpc_txt(tmp_path / "msr_paraphrase_test.txt", 32, seed=0)
    config = run_config(tmp_path, model, ["a", "b"], {}, {"data": "msr_paraphrase_test.txt"})
    datasets = {
        name: TextDataset(read_rows(mrpc_txt(tmp_path / f"{name}.txt", 24, seed=i + 1)), None)
        for i, name in enumerate(("a", "b"))
    }
    assert datasets["a"].file is not None and datasets["a"].file.rows[0].text_pair is not None
    results = asyncio.run(federate(config, datasets))
    assert results == {"a": 2, "b": 2}
    assert sorted(d["status"] for d in outcomes(tmp_path / "run")) == ["ok"] * 4
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
    assert LabelMap.from_model_config(state.model_config).values == ("0", "1")  # inferred from the dev file
