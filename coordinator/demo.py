"""``make demo``: a small, real federation on this machine, then a served ONNX model.

A coordinator (the real websocket server, in this process) and three devices (``edge-sdk join``, each
its own process, over loopback websockets) fine-tune the real all-MiniLM-L6-v2 on three disjoint
slices of the vendored SST-2 subset for three rounds. Each device's training budget is that of a
device class from ``profiles/`` (Raspberry Pi 4 2 GB, Jetson Nano 4 GB, Raspberry Pi 5 8 GB) scaled
by 0.45 for MiniLM (see docs/benchmark.md), so each trains a different sub-network. The budgets are
simulated: this machine does not hold the processes to them; each device measures its real peak.

Then the global model's inference sub-network for the smallest device is exported to ONNX and asked
for one prediction with the torch-free runtime (``edge_sdk._infer``). Devices do not deploy models
themselves yet, so the export runs here, on the coordinator. Everything lands in ``runs/demo-*``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from edge_sdk._budget import budget_for_device_class
from edge_sdk._errors import ConfigError, EdgeFMError
from edge_sdk._memory import TRAINING_RUNTIME_BYTES, Workload
from edge_sdk._profiles import load_device_class
from edge_sdk._units import format_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["main", "run_demo"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT / "examples" / "data" / "sst2"
CLASSES = ("raspberry-pi-4-2gb", "jetson-nano-4gb", "raspberry-pi-5-8gb")
BUDGET_SCALE = 0.45
ROUNDS, STEPS, BATCH, SEQ = 3, 3, 8, 256
ROWS_PER_DEVICE = 400
DEV_ROWS = 256
WAIT_S = 600.0  # bound on the whole federation


def _write_shards(folder: Path) -> list[Path]:
    from ._partition import partition_iid

    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    paths = []
    for i, shard in enumerate(partition_iid(len(body), len(CLASSES), seed=0)):
        path = folder / f"device-{i + 1}.tsv"
        path.write_text("\n".join([header, *(body[j] for j in shard[:ROWS_PER_DEVICE])]) + "\n", encoding="utf-8")
        paths.append(path)
    dev = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (folder / "dev.tsv").write_text("\n".join(dev[: DEV_ROWS + 1]) + "\n", encoding="utf-8")
    return paths


def _config(folder: Path, tokens: dict[str, str]) -> Any:
    from ._config import parse_config

    return parse_config(
        {
            "model": {"name": "all-MiniLM-L6-v2", "seed": 0},
            # class budgets keep their own safety margin: no further reserve
            "federation": {"rounds": ROUNDS, "min_devices": len(tokens), "device_wait_s": 180,
                           "round_deadline_s": 600, "min_margin": 0},
            "training": {"local_steps": STEPS, "batch_size": BATCH, "seq_len": SEQ, "lr": 1e-4},
            "validation": {"data": "dev.tsv", "limit": DEV_ROWS, "batch_size": 32},
            "server": {"host": "127.0.0.1", "port": 0, "port_file": "port"},
            "devices": tokens,
            "run": {"dir": "coordinator"},
        },
        base=folder,
        where="demo",
    )


def _start_devices(folder: Path, tokens: dict[str, str], budgets: dict[str, int], shards: list[Path],
                   procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait (bounded) for the coordinator's port, then start one ``edge-sdk join`` process per device."""
    port_file = folder / "port"
    deadline = time.monotonic() + 120
    while not port_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not port_file.is_file():
        return
    url = f"ws://127.0.0.1:{int(port_file.read_text().strip())}"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for (name, token), shard in zip(tokens.items(), shards, strict=True):
        log = (folder / f"{name}.log").open("ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edge_sdk._cli", "join", url, "--token", token, "--data", str(shard),
             "--memory-budget", str(budgets[name]), "--threads", "1", "--no-probe", "--device-id", name,
             "--retry-initial", "0.5", "--retry-max", "2", "--give-up-after", "120"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
        ))
        log.close()


def _federate(folder: Path) -> tuple[Any, dict[str, int]]:
    from ._run import build_engine, serve_async

    tokens = {name: f"demo-token-{i}-{os.urandom(8).hex()}" for i, name in enumerate(CLASSES)}
    budgets = {
        name: int(budget_for_device_class(load_device_class(name), TRAINING_RUNTIME_BYTES).usable * BUDGET_SCALE)
        for name in CLASSES
    }
    shards = _write_shards(folder)
    config = _config(folder, tokens)
    engine = build_engine(config)
    procs: list[subprocess.Popen[bytes]] = []
    starter = threading.Thread(target=_start_devices, args=(folder, tokens, budgets, shards, procs), daemon=True)
    starter.start()
    try:
        code = asyncio.run(asyncio.wait_for(serve_async(config, engine, handle_signals=False), WAIT_S))
        if code != 0:
            raise EdgeFMError(f"the coordinator stopped with code {code}")
    finally:
        starter.join(timeout=130)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    return engine, budgets


def _table(history: list[dict[str, Any]], budgets: dict[str, int]) -> str:
    head = "| round | accuracy | loss | " + " | ".join(
        f"{n} (budget {format_bytes(budgets[n])}): params / predicted / measured peak" for n in CLASSES
    )
    rows = [head + " |", "| --- | ---: | ---: | " + " | ".join("---" for _ in CLASSES) + " |"]
    for entry in history:
        got = {d["device_id"]: d for d in entry["devices"]}
        cells = []
        for name in CLASSES:
            d = got.get(name)
            if d is None or d["status"] != "ok":
                cells.append(d["status"] if d else "-")
                continue
            cells.append(
                f"{d['params'] / 1e6:.1f}M ({d['params_fraction']:.0%}), {format_bytes(d['predicted_bytes'])},"
                f" {format_bytes(d['peak_rss_bytes'])}"
            )
        m = entry.get("metrics", {})
        rows.append(f"| {entry['round']} | {m.get('accuracy', float('nan')):.4f} | {m.get('loss', float('nan')):.4f} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def _export(engine: Any, budget: int, folder: Path) -> tuple[Path, Any, str]:
    from edge_sdk._build import build_model
    from edge_sdk._export import export_onnx
    from edge_sdk._extract import extract
    from edge_sdk._infer import load
    from edge_sdk._models import resolve_model_dir
    from edge_sdk._search import plan_inference, plan_training

    parent, salience = engine.parent, engine.snapshot().salience
    train = plan_training(parent, salience, budget, Workload(BATCH, SEQ), runtime=0)
    serve = plan_inference(parent, salience, budget, Workload(1, 128), floor=train.spec, runtime=0)
    module = build_model(serve.spec, parent.config, extract(parent, serve.spec), task=parent.task)
    model = cast("PreTrainedModel", module)
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    out = folder / "onnx" / CLASSES[0]
    sentence = "a gorgeous, witty, seductive movie."
    export_onnx(
        model,
        resolve_model_dir("all-MiniLM-L6-v2"),
        out,
        parity_batch=[sentence],
        max_length=128,
        manifest_extra={"device_class": CLASSES[0], "spec": serve.spec.to_dict()},
    )
    prediction = load(out).predict([sentence])[0]
    text = (f"inference sub-network for {CLASSES[0]}: {serve.params / 1e6:.1f}M params "
            f"({serve.params_fraction:.0%}; it trains {train.params / 1e6:.1f}M)")
    return out, prediction, text


def run_demo(folder: Path) -> Path:
    """Run the demo in ``folder``; returns the report's path."""
    if not (SST2 / "train.tsv").is_file():
        raise ConfigError(f"the vendored SST-2 subset is missing ({SST2}): run the demo from a clone of edge-fm")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"edge-fm demo: a coordinator and {len(CLASSES)} devices over loopback websockets, all-MiniLM-L6-v2,"
          f" {ROUNDS} rounds of {STEPS} local steps (batch {BATCH}, sequence {SEQ}); logs in {folder}\n")
    engine, budgets = _federate(folder)
    history = [dict(h) for h in engine.history]
    table = _table(history, budgets)
    print(table)
    print(f"\nfederation: {time.monotonic() - started:.0f} s; exporting the smallest device's inference sub-network")
    out, prediction, text = _export(engine, budgets[CLASSES[0]], folder)
    sentence_line = f"ONNX ({out}): {text}; predicts {prediction.label} ({prediction.score:.2f}) for one review"
    print(sentence_line)
    report = folder / "summary.md"
    report.write_text(
        "# edge-fm demo\n\n"
        f"Budgets: device classes' usable training budgets x {BUDGET_SCALE} (simulated; not enforced here). "
        "Peak: each device process's measured peak RSS (runtime included).\n\n"
        f"{table}\n\n{sentence_line}\n\nRounds (JSON): {folder / 'rounds.json'}\n",
        encoding="utf-8",
    )
    (folder / "rounds.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    print(f"\nreport: {report}  ({time.monotonic() - started:.0f} s in all)")
    return report


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = Path.cwd() / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        run_demo(folder)
    except EdgeFMError as exc:
        print(f"demo failed: {exc} (logs in {folder})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
