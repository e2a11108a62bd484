"""bench/llm.py's ``accuracy`` section: SmolLM2-135M's SST-2 label accuracy before and after federated LoRA.

For each of the 200 rows of ``examples/data/sst2-instruct/dev.jsonl`` ("Review: <sentence>\\nSentiment:"),
the model greedily generates :data:`NEW_TOKENS` tokens (torch ``generate``, KV cache, batches of
:data:`BATCH` prompts padded on the left: 200 prompts take seconds, and the "after" model comes from
the checkpoint as torch weights); a row is correct
when the generated text, stripped of spaces, starts with its label word (``positive`` / ``negative``),
and counted as *neither* when it starts with no label word (the control: a model that answers nothing
useful cannot look better than chance by accident). The chance line is the majority label's share of
the dev rows.

"Before" is the base model (the packaged GGUF, dequantized). "After" is the global model of a short
real federation: ``edge-coordinator serve`` with ``examples/llm-federation.toml``'s model, task and
LoRA ranks, and three ``edge-sdk join`` processes with the example's budgets (3 GB, 2 GB, 900 MB) on
``train-0/1/2.jsonl``, over websockets on 127.0.0.1, as ``tests/test_llm_federation.py`` runs them; its
final checkpoint's weights (reordered: the same function) are loaded into the model. The federation's
rounds and local steps are :data:`ROUNDS` and ``--local-steps``, chosen so the run takes about ten
minutes on a 2-core machine; the section prints its wall time. Each ``--seed`` runs one federation
(``[model] seed``: the devices' batch order); with two seeds the paired differences are printed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "sst2-instruct"
LABELS = ("positive", "negative")
NEW_TOKENS = 3
BATCH = 20  # prompts generated together (left-padded): 200 rows in seconds
ROUNDS = 2
BUDGETS = {"laptop": "3GB", "board-8gb": "2GB", "board-small": "900MB"}  # examples/llm-federation.toml's
TOKENS = {name: f"bench-token-{name}-0123456789" for name in BUDGETS}


def dev_rows() -> list[dict[str, str]]:
    lines = (DATA / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def label_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, str]], batch: int = BATCH) -> dict[str, Any]:
    """Greedy :data:`NEW_TOKENS` tokens per row (batches of ``batch`` prompts, padded on the left and
    masked); correct / neither counts and the first few answers."""
    import torch

    correct = neither = 0
    answers: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        encoded = tokenizer.ids([row["prompt"] for row in chunk])
        width = max(map(len, encoded))
        ids = torch.tensor([[tokenizer.pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad
            )
        for row, new in zip(chunk, out[:, width:].tolist(), strict=True):
            text = tokenizer.tokenizer.decode(new).strip().lower()
            word = next((w for w in LABELS if text.startswith(w)), None)
            correct += word is not None and word == row["response"].strip().lower()
            neither += word is None
            answers.append(text)
    n = len(rows)
    return {
        "accuracy": correct / n,
        "correct": correct,
        "neither": neither,
        "rows": n,
        "seconds": time.perf_counter() - started,
        "first_answers": answers[:5],
    }


def _config(folder: Path, seed: int, local_steps: int) -> Path:
    devices = "".join(f'{name} = "{token}"\n' for name, token in TOKENS.items())
    text = f"""
[model]
name = "SmolLM2-135M"
task = "causal-lm"
seed = {seed}

[federation]
rounds = {ROUNDS}
min_devices = 3
device_wait_s = 600
round_deadline_s = 1800

[training]
local_steps = {local_steps}
lr = 1e-4
batch_size = 4
seq_len = 64

[levers]
lora_ranks = [16, 8, 4]

[validation]
data = "{DATA / "dev.jsonl"}"
limit = 32
batch_size = 16

[server]
host = "127.0.0.1"
port = 0
port_file = "port"

[devices]
{devices}
[run]
dir = "run"

[deploy]
enabled = false
"""
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _spawn(args: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)


def federate(folder: Path, seed: int, local_steps: int, timeout: float = 1800) -> Path:
    """Run the federation; the final checkpoint's weights file."""
    config = _config(folder, seed, local_steps)
    procs = [
        _spawn([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)], folder / "c.log", folder)
    ]
    try:
        deadline = time.monotonic() + timeout
        while not (folder / "port").is_file() or not (folder / "port").read_text().strip():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((folder / "c.log").read_text()[-3000:])
            time.sleep(0.2)
        url = f"ws://127.0.0.1:{int((folder / 'port').read_text())}"
        for k, (name, budget) in enumerate(BUDGETS.items()):
            args = [sys.executable, "-m", "edge_sdk.cli", "join", url, "--token", TOKENS[name]]
            args += ["--data", str(DATA / f"train-{k}.jsonl"), "--memory-budget", budget, "--tokenizer", "SmolLM2-135M"]
            args += ["--threads", "1", "--no-probe", "--no-deploy"]
            procs.append(_spawn(args, folder / f"{name}.log", folder))
        for proc in procs:
            if proc.wait(max(1.0, deadline - time.monotonic())) != 0:
                raise RuntimeError((folder / "c.log").read_text()[-3000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    from coordinator.federation._checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(folder / "run")
    if checkpoint is None:
        raise RuntimeError("the run left no checkpoint")
    return checkpoint / "weights.safetensors"


def section_accuracy(args: Any) -> dict[str, Any]:
    import safetensors.torch
    import torch
    from transformers import LlamaForCausalLM

    from edge_sdk.scaling._models import resolve_model_dir
    from edge_sdk.training._prompts import PromptTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    folder = resolve_model_dir("SmolLM2-135M")
    tokenizer = PromptTokenizer(folder)
    rows = dev_rows()
    counts = {w: sum(r["response"].strip().lower() == w for r in rows) for w in LABELS}
    base = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    before = label_accuracy(base, tokenizer, rows)
    print(f"before: {before['accuracy']:.3f} in {before['seconds']:.0f} s", file=sys.stderr, flush=True)
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="edge-fm-bench-acc-") as tmp:
            started = time.perf_counter()
            weights = federate(Path(tmp), seed, args.local_steps)
            seconds = time.perf_counter() - started
            log = (Path(tmp) / "c.log").read_text(encoding="utf-8", errors="replace")
            state = safetensors.torch.load_file(weights)
        model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        after = label_accuracy(model, tokenizer, rows)
        rounds = [line.split(": ", 1)[1][:240] for line in log.splitlines() if "updates merged" in line]
        runs.append({"seed": seed, "federation_seconds": seconds, "rounds": rounds, "after": after})
    diffs = [r["after"]["accuracy"] - before["accuracy"] for r in runs]
    return {
        "model": "SmolLM2-135M-Instruct",
        "engine": f"torch generate (greedy, KV cache, batches of {BATCH} left-padded prompts)",
        "new_tokens": NEW_TOKENS,
        "federation": f"{ROUNDS} rounds x {args.local_steps} local steps of 4 rows (<= 64 tokens), budgets "
        + ", ".join(BUDGETS.values()),
        "dev_rows": len(rows),
        "majority_share": max(counts.values()) / len(rows),
        "label_counts": counts,
        "before": before,
        "runs": runs,
        "paired_diff_mean": statistics.mean(diffs),
    }


def print_accuracy(doc: dict[str, Any]) -> None:
    print(
        f"{doc['model']} on {doc['dev_rows']} SST-2 dev rows, {doc['engine']}, {doc['new_tokens']} new tokens;"
        f" chance (majority share) {doc['majority_share']:.3f} {doc['label_counts']}"
    )
    print(f"federation: {doc['federation']}")
    b = doc["before"]
    print(f"{'model':<22} {'accuracy':>8} {'correct':>7} {'neither':>7}  first answers")
    print(f"{'before (base)':<22} {b['accuracy']:>8.3f} {b['correct']:>7} {b['neither']:>7}  {b['first_answers']}")
    for r in doc["runs"]:
        a = r["after"]
        name = f"after (seed {r['seed']})"
        print(f"{name:<22} {a['accuracy']:>8.3f} {a['correct']:>7} {a['neither']:>7}  {a['first_answers']}")
        print(f"  federation {r['federation_seconds']:.0f} s; " + "; ".join(r["rounds"]))
    diffs = [r["after"]["accuracy"] - b["accuracy"] for r in doc["runs"]]
    print(f"paired differences (after - before): {[round(d, 3) for d in diffs]}, mean {doc['paired_diff_mean']:+.3f}")
