"""``make demo``: a small, real federation on this machine, then a served ONNX model.

A coordinator (the real websocket server, in this process) and three devices (``edge-sdk join``, each
its own process, over loopback websockets) fine-tune the real all-MiniLM-L6-v2 on three disjoint
slices of the vendored SST-2 subset for three rounds. Each device's training budget is that of a
device class from ``profiles/`` (Raspberry Pi 4 2 GB, Jetson Nano 4 GB, Raspberry Pi 5 8 GB) scaled
by 0.45 for MiniLM (see docs/benchmark.md), so each trains a different sub-network. The budgets are
simulated: this machine does not hold the processes to them; each device measures its real peak.

When the last round is done the coordinator deploys: each device is sent the largest sub-network of
the global model whose *inference* fits its budget (never smaller than what it trained), exports it
to ONNX itself, checks parity against torch and installs it in ``models/<device>``. The demo deploys
fp32 models: at budgets that bind, an int8 export (quantizer and drift sessions, 23 bytes a parameter
+ 215 MB) needs more memory than training the same sub-network (docs/running.md), so the planner
would keep the smallest device at its training sub-network. The demo prints what each device trains
and serves, and asks one installed model for a prediction with the torch-free runtime
(``edge_sdk.serving._infer``). Everything lands in ``runs/demo-*``.

``python -m coordinator.demo --rounds N`` runs N rounds instead of 3 (the test runs 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_sdk import load_device_class
from edge_sdk._errors import ConfigError, EdgeFMError
from edge_sdk._units import format_bytes
from edge_sdk.scaling import TRAINING_RUNTIME_BYTES, budget_for_device_class

__all__ = ["main", "run_demo"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT / "examples" / "data" / "sst2"
CLASSES = ("raspberry-pi-4-2gb", "jetson-nano-4gb", "raspberry-pi-5-8gb")
BUDGET_SCALE = 0.45
# Rows are truncated at SEQ tokens and each batch padded to its longest row (SST-2's sentences are
# short: most batches hold 20-40 tokens), so 4 rounds of 15 steps of 16 take about a minute a round.
ROUNDS, STEPS, BATCH, SEQ, LR = 4, 15, 16, 64, 1e-4
ROWS_PER_DEVICE = 1000
HOLDOUT = 32  # examples each device holds back from training (an int8 deploy measures its drift on them)
LABELS = ("negative", "positive")
# Obvious sentences (not in the data) every device's served model is asked about at the end.
SENTENCES = (
    ("a gorgeous, witty, seductive movie.", "positive"),
    ("one of the best films of the year, moving and beautifully acted.", "positive"),
    ("a dull, tedious mess with nothing to say.", "negative"),
    ("the worst movie i have seen in years: boring and badly written.", "negative"),
)
DEV_ROWS = 256
WAIT_S = 600.0  # bound on the whole federation


def _write_shards(folder: Path) -> list[Path]:
    from coordinator.simulation import partition_iid

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


def _config(folder: Path, tokens: dict[str, str], rounds: int) -> Any:
    from coordinator.federation import parse_config

    return parse_config(
        {
            "model": {"name": "all-MiniLM-L6-v2", "seed": 0},
            # class budgets keep their own safety margin: no further reserve
            "federation": {
                "rounds": rounds,
                "min_devices": len(tokens),
                "device_wait_s": 180,
                "round_deadline_s": 600,
                "min_margin": 0,
            },
            "training": {"local_steps": STEPS, "batch_size": BATCH, "seq_len": SEQ, "lr": LR},
            "validation": {"data": "dev.tsv", "limit": DEV_ROWS, "batch_size": 32, "seq_len": SEQ},
            "server": {"host": "127.0.0.1", "port": 0, "port_file": "port"},
            "devices": tokens,
            "run": {"dir": "coordinator"},
            "deploy": {"batch_size": 1, "seq_len": 128, "quantize": False, "labels": list(LABELS), "timeout_s": 300},
        },
        base=folder,
        where="demo",
    )


def _start_devices(
    folder: Path,
    tokens: dict[str, str],
    budgets: dict[str, int],
    shards: list[Path],
    procs: list[subprocess.Popen[bytes]],
) -> None:
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
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge_sdk.cli",
                    "join",
                    url,
                    "--token",
                    token,
                    "--data",
                    str(shard),
                    "--memory-budget",
                    str(budgets[name]),
                    "--threads",
                    "1",
                    "--no-probe",
                    "--device-id",
                    name,
                    "--retry-initial",
                    "0.5",
                    "--retry-max",
                    "2",
                    "--give-up-after",
                    "120",
                    "--deploy-dir",
                    str(folder / "models" / name),
                    "--holdout",
                    str(HOLDOUT),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=folder,
            )
        )
        log.close()


class _RoundZero(logging.Handler):
    """Prints the pre-trained model's validation line (round 0) when the coordinator logs it."""

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("round 0"):
            print(record.getMessage().replace("round 0 (pre-trained model):", "round 0 (before training):"), flush=True)


def _shown_by_progress(record: logging.LogRecord) -> bool:
    """False for the engine's collapse warning: the round's progress line already says it."""
    return not (record.name == "coordinator.federation._engine" and "COLLAPSED" in record.getMessage())


def _federate(folder: Path, rounds: int) -> tuple[Any, dict[str, int]]:
    from coordinator._progress import RoundProgress
    from coordinator.serve import prepare_run, serve_async

    tokens = {name: f"demo-token-{i}-{os.urandom(8).hex()}" for i, name in enumerate(CLASSES)}
    budgets = {
        name: int(budget_for_device_class(load_device_class(name), TRAINING_RUNTIME_BYTES).usable * BUDGET_SCALE)
        for name in CLASSES
    }
    shards = _write_shards(folder)
    config = _config(folder, tokens, rounds)
    round_zero, run_logger = _RoundZero(), logging.getLogger("coordinator.serve._run")
    run_logger.addHandler(round_zero)
    run_logger.setLevel(logging.INFO)
    run_logger.propagate = False  # only round 0's line, not the run's other INFO lines
    procs: list[subprocess.Popen[bytes]] = []
    starter = threading.Thread(target=_start_devices, args=(folder, tokens, budgets, shards, procs), daemon=True)
    try:
        engine, begin = prepare_run(config)  # round 0 is checkpointed and evaluated while devices connect
        starter.start()
        serving = serve_async(config, engine, handle_signals=False, begin=begin, observer=RoundProgress(sys.stdout))
        code = asyncio.run(asyncio.wait_for(serving, WAIT_S))
        if code != 0:
            raise EdgeFMError(f"the coordinator stopped with code {code}")
    finally:
        run_logger.removeHandler(round_zero)
        run_logger.setLevel(logging.NOTSET)
        run_logger.propagate = True
        if starter.is_alive():
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
        f"{n} (budget {format_bytes(budgets[n])}): params, levers / predicted / measured peak" for n in CLASSES
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
                f"{d['params'] / 1e6:.1f}M ({d['params_fraction']:.0%}), {d.get('levers') or 'plain'},"
                f" {format_bytes(d['predicted_bytes'])},"
                f" {format_bytes(d['peak_rss_bytes'])}"
            )
        m = entry.get("metrics", {})
        rows.append(
            f"| {entry['round']} | {m.get('accuracy', float('nan')):.4f} | {m.get('loss', float('nan')):.4f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(rows)


def _deploy_table(deployments: list[dict[str, Any]]) -> str:
    rows = [
        "| device | trains | serves | parity (max abs diff) | model.onnx | int8 | int8 agreement, accuracy drop"
        " | device peak RSS so far |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    got = {d["device_id"]: d for d in deployments}
    for name in CLASSES:
        d = got.get(name)
        if d is None or d["status"] != "ok":
            rows.append(f"| {name} | {d['status'] if d else 'not deployed'}: {d['reason'] if d else ''} |")
            continue
        m = d["metrics"]
        drift = (
            f"{m['drift_agreement']:.3f}, {m['drift_accuracy_drop']:+.3f} on {int(m['drift_rows'])}"
            if "drift_accuracy_drop" in m
            else "-"
        )
        rows.append(
            f"| {name} | {d['train_params'] / 1e6:.2f}M | {d['params'] / 1e6:.2f}M ({d['params_fraction']:.0%}) |"
            f" {m['parity_max_abs_diff']:.1e} | {format_bytes(int(m['onnx_bytes']))} |"
            f" {format_bytes(int(m['int8_bytes'])) if 'int8_bytes' in m else '-'} | {drift} |"
            f" {format_bytes(int(m.get('process_peak_rss_bytes', 0)))} |"
        )
    return "\n".join(rows)


def _answers(folder: Path, deployed: list[str]) -> tuple[str, int, int]:
    """Each installed model (ONNX Runtime, no torch) labels the obvious sentences: a table, right, asked."""
    from edge_sdk import load

    rows = ["| sentence | expected | " + " | ".join(deployed) + " |", "| --- | --- |" + " --- |" * len(deployed)]
    answers = {name: load(folder / "models" / name, threads=1).predict([s for s, _ in SENTENCES]) for name in deployed}
    right = 0
    for i, (sentence, expected) in enumerate(SENTENCES):
        cells = []
        for name in deployed:
            p = answers[name][i]
            right += p.label == expected
            cells.append(f"{p.label} ({p.score:.2f}) {'ok' if p.label == expected else 'WRONG'}")
        rows.append(f"| {sentence} | {expected} | " + " | ".join(cells) + " |")
    return "\n".join(rows), right, len(SENTENCES) * len(deployed)


def run_demo(folder: Path, rounds: int = ROUNDS) -> Path:
    """Run the demo in ``folder``; returns the report's path."""
    if not (SST2 / "train.tsv").is_file():
        raise ConfigError(f"the vendored SST-2 subset is missing ({SST2}): run the demo from a clone of edge-fm")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(
        f"edge-fm demo: a coordinator and {len(CLASSES)} devices over loopback websockets, all-MiniLM-L6-v2"
        f" on SST-2 (sentiment), {rounds} round(s) of {STEPS} local steps (batch {BATCH}, rows up to {SEQ}"
        f" tokens); accuracy on {DEV_ROWS} held-out sentences; logs in {folder}\n",
        flush=True,
    )
    engine, budgets = _federate(folder, rounds)
    history = [dict(h) for h in engine.history]
    table = _table(history, budgets)
    print(table)
    records = folder / "coordinator" / "deployments.json"
    deployments = json.loads(records.read_text(encoding="utf-8")) if records.is_file() else []
    deploy_table = _deploy_table(deployments)
    print(
        f"\nfederation and deployment: {time.monotonic() - started:.0f} s; what each device trains and now serves"
        " (exported to ONNX on the device, installed in models/<device>):\n"
    )
    print(deploy_table)
    deployed = [n for n in CLASSES if any(d["device_id"] == n and d["status"] == "ok" for d in deployments)]
    if CLASSES[0] not in deployed:
        raise EdgeFMError(f"{CLASSES[0]} did not install its inference model (see {records} and the device logs)")
    answer_table, right, asked = _answers(folder, deployed)
    sentence_line = f"the installed models (ONNX Runtime, no torch) label {right} of {asked} obvious sentences right"
    print(f"\n{sentence_line}:\n\n{answer_table}")
    report = folder / "summary.md"
    report.write_text(
        "# edge-fm demo\n\n"
        f"Budgets: device classes' usable training budgets x {BUDGET_SCALE} (simulated; not enforced here). "
        "Peak: each device process's measured peak RSS (runtime included).\n\n"
        f"{table}\n\nDeployed inference models:\n\n{deploy_table}\n\n{sentence_line}:\n\n{answer_table}\n\n"
        f"Rounds (JSON): {folder / 'rounds.json'}; deployments (JSON): {records}\n",
        encoding="utf-8",
    )
    (folder / "rounds.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    print(f"\nreport: {report}  ({time.monotonic() - started:.0f} s in all)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.demo", description="A small, real federation on this machine, then served models."
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"federated rounds (default {ROUNDS})")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_shown_by_progress)
    folder = Path.cwd() / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        run_demo(folder, args.rounds)
    except EdgeFMError as exc:
        print(f"demo failed: {exc} (logs in {folder})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
