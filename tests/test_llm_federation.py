"""End to end: causal-LM fine-tuning of a Llama through the federation, a coordinator and three device
processes over websockets on 127.0.0.1, devices of three budgets (dense training, and LoRA of two
ranks on devices that cannot fit it), held-out response-token loss every round.

Budgets are found with the coordinator's own planner (the same ranked parent, workload and lever
policy): the largest budget at which each lever plan appears. "Within budget" compares as in
``test_federation_e2e`` (both sides leave the runtime footprint out; the margin is kept in reserve).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint
from coordinator.federation._config import FederationConfig
from coordinator.federation._planner import training_workload
from coordinator.federation._tables import TrainingConfig
from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling import LeverPolicy, ParentModel, Salience, param_count, plan_training, ranked_parent
from edge_sdk.scaling._lever_choice import LeverChooser
from edge_sdk.serving._install_lm import LM_PARITY_STEPS

from ._federation import TIMEOUT_S, coordinator, device, read_port
from ._llm import SST2_INSTRUCT, tiny_llama_dir
from .models import ROOT

MARGIN = FederationConfig().min_margin_bytes
TOKENS = {"small": "token-small-1111", "medium": "token-medium-2222", "large": "token-large-3333"}


def lever_budgets(
    parent: ParentModel, salience: Salience, training: TrainingConfig, policy: LeverPolicy
) -> dict[str, int]:
    """Planning budgets (bytes the planner may spend) at which the full model fits full fine-tuning
    ("large": plain training, no lever), with LoRA of the largest rank the policy allows ("medium")
    and with LoRA of its smallest ("small").

    The planner takes, among the lever sets that fit, the one of least accuracy cost (dense < frozen
    table < LoRA of a high rank < a low rank): LoRA of rank r is planned at a budget just below the
    least any set of lower cost needs, if a rank-r set fits there. Checked against the planner itself.
    """
    work = training_workload(parent.config, training, deltas=True)  # the run's default: int8+zstd deltas
    full = SubnetSpec.full(parent.dims)
    chooser = LeverChooser(parent, work, 0, policy)
    params = param_count(parent, full)
    need: dict[int, int] = {}  # LoRA rank (0: dense) -> the least any lever set of that rank needs
    for levers in chooser.candidates:
        total = chooser.price(full, params, levers).estimate.total
        need[levers.lora_rank] = min(total, need.get(levers.lora_rank, total))
    ranks = sorted(need, reverse=True)[:-1]  # LoRA ranks, largest first
    assert len(ranks) >= 2 and need[ranks[-1]] < need[ranks[0]] < need[0], need
    plain = chooser.price(full, params, Levers()).estimate.total  # full fine-tuning, no lever
    budgets = {"large": plain + (plain >> 4)}
    budgets["medium"] = need[0] - 1  # below every dense set (no rank above the largest)
    budgets["small"] = min(need[r] for r in (0, *ranks[:-1])) - 1  # below every set of a larger rank
    expected = {"large": 0, "medium": ranks[0], "small": ranks[-1]}
    for name, budget in budgets.items():
        plan = plan_training(parent, salience, budget, work, runtime=0, policy=policy)
        assert plan.params_fraction == 1 and plan.levers.lora_rank == expected[name], (name, plan.levers, need)
    return budgets


def write_llm_config(
    folder: Path,
    model: Path | str,
    *,
    training: TrainingConfig,
    ranks: list[int],
    dev_rows: int,
    deploy: bool = False,
) -> Path:
    device_lines = "".join(f'{name} = "{token}"\n' for name, token in TOKENS.items())
    text = f"""
[model]
name = "{model}"
task = "causal-lm"

[federation]
rounds = 2
min_devices = 3
device_wait_s = 300
round_deadline_s = 600

[training]
local_steps = {training.local_steps}
batch_size = {training.batch_size}
seq_len = {training.seq_len}
lr = {training.lr}

[levers]
lora_ranks = {ranks}

[validation]
data = "{SST2_INSTRUCT / "dev.jsonl"}"
limit = {dev_rows}
batch_size = 16

[server]
host = "127.0.0.1"
port = 0
port_file = "port"

[devices]
{device_lines}
[run]
dir = "run"

[deploy]
enabled = {str(deploy).lower()}
seq_len = 64
timeout_s = 300
"""
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_federation(
    folder: Path,
    config: Path,
    budgets: dict[str, int],
    tokenizer: str,
    *,
    rows: int,
    timeout: float = TIMEOUT_S,
    deploy: bool | frozenset[str] = False,
) -> list[dict[str, Any]]:
    """Serve ``config`` to three ``edge-sdk join`` processes (their budgets: ``MARGIN + budgets``;
    with ``deploy`` (True: every device, or the names of those that deploy), each installs its model in
    ``folder/deployed-NAME``; the others refuse deploys); the run's history (one entry per round) once
    every process has exited cleanly."""
    deploying = frozenset(TOKENS) if deploy is True else frozenset(deploy or ())
    server = coordinator(config, folder / "coordinator.log")
    devices = {}
    try:
        port = read_port(folder, server, timeout)
        for k, (name, token) in enumerate(TOKENS.items()):
            data = SST2_INSTRUCT / f"train-{k}.jsonl"
            extra = ("--tokenizer", tokenizer, "--limit", str(rows))
            budget = str(MARGIN + budgets[name])
            log, target = folder / f"{name}.log", folder / f"deployed-{name}" if name in deploying else None
            devices[name] = device(f"ws://127.0.0.1:{port}", token, data, budget, log, *extra, deploy_dir=target)
        assert server.wait(timeout) == 0, server.text()[-4000:]
        for name, proc in devices.items():
            assert proc.wait(timeout) == 0, f"{name}:\n{proc.text()[-3000:]}"
    finally:
        for proc in [server, *devices.values()]:
            proc.kill()
    log = server.text()
    assert "round 1/2: 3/3 updates merged" in log and "round 2/2: 3/3 updates merged" in log, log[-3000:]
    assert "perplexity" in log
    final = load_checkpoint(latest_checkpoint(folder / "run"))  # type: ignore[arg-type]
    assert final.round == 2 and len(final.history) == 2
    return list(final.history)


def check_devices(entry: dict[str, Any], budgets: dict[str, int]) -> dict[str, Levers]:
    """Every device trained within its budget; the levers each one trained with."""
    got = {d["device_id"]: d for d in entry["devices"]}
    assert {n: d["status"] for n, d in got.items()} == dict.fromkeys(TOKENS, "ok"), entry
    for name, d in got.items():
        assert d["usable_bytes"] == MARGIN + budgets[name]
        assert d["predicted_bytes"] <= d["usable_bytes"] - MARGIN, d
        assert 0 < d["runtime_bytes"] < d["peak_rss_bytes"], d
        assert d["peak_rss_bytes"] - d["runtime_bytes"] <= d["usable_bytes"], d
    metrics = entry["metrics"]
    assert math.isfinite(metrics["loss"]) and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert "accuracy" not in metrics and metrics["tokens"] > 0
    return {name: Levers.parse(d["levers"]) for name, d in got.items()}


def test_a_tiny_llama_fine_tunes_through_the_federation_with_lora_of_two_ranks(tmp_path: Path) -> None:
    model = tiny_llama_dir(tmp_path / "model")
    training = TrainingConfig(local_steps=2, batch_size=4, seq_len=48, lr=1e-3)
    ranks = [8, 4, 2]
    parent, salience = ranked_parent(model, task="causal-lm")
    budgets = lever_budgets(parent, salience, training, LeverPolicy(lora_ranks=tuple(ranks)))
    config = write_llm_config(tmp_path, model, training=training, ranks=ranks, dev_rows=32, deploy=True)
    history = run_federation(tmp_path, config, budgets, str(model), rows=48, deploy=True)
    for entry in history:
        levers = check_devices(entry, budgets)
        assert levers["large"].lora_rank == 0  # it fits dense training
        assert 0 < levers["small"].lora_rank < levers["medium"].lora_rank  # the other two cannot: LoRA
        assert entry["metrics"]["tokens"] == 32 * 2  # " positive" / " negative" is one token here, + eos
    check_deployed(tmp_path, n_layers=2)


def check_deployed(folder: Path, *, n_layers: int) -> None:
    """After the rounds every device installed its LLM (checked against torch on its own prompts), and
    ``edge-sdk generate --json`` (a fresh process that never imports torch) generates from it."""
    deployed = {d["device_id"]: d for d in json.loads((folder / "run" / "deployments.json").read_text())}
    assert "generates" in (folder / "coordinator.log").read_text(encoding="utf-8")  # the deploy's log line
    assert sorted(deployed) == sorted(TOKENS)
    for name, d in deployed.items():
        check_installed(folder, name, d, n_layers=n_layers)


def check_installed(folder: Path, name: str, d: dict[str, Any], *, n_layers: int) -> dict[str, Any]:
    """``name``'s deploy record says ok, its folder is installed for a 64-token context, and
    ``edge-sdk generate --json`` generates from it in a process that never imports torch; its output."""
    assert d["status"] == "ok" and d["fits"], d
    assert d["metrics"]["parity_tokens_equal"] == LM_PARITY_STEPS and d["metrics"]["tokens_per_s"] > 0, d
    served = folder / f"deployed-{name}"
    manifest = json.loads((served / "edge_manifest.json").read_text())
    assert len(manifest["spec"]["layers"]) == n_layers
    # the deploy's seq_len is the served context (the KV cache was planned for it): generation stops there
    assert manifest["inference"]["context"] == 64
    assert json.loads((served / "config.json").read_text())["max_position_embeddings"] == 64
    code = (
        "import sys; from edge_sdk.cli import main; "
        f"rc = main(['generate', '--model', {str(served)!r}, '--max-new-tokens', '6', '--json', "
        "'Review: a gorgeous, witty movie.\\nSentiment:']); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.stdout)
    assert 1 <= len(result["token_ids"]) <= 6 and result["tokens_per_s"] > 0, result
    return dict(result)


def held_out_losses(log: str, history: list[dict[str, Any]]) -> list[float]:
    """The held-out loss of the starting model (its round-0 log line), then of every round."""
    start = re.search(r"round 0 \(pre-trained model\): loss ([0-9.]+)", log)
    assert start is not None, log[-3000:]
    return [float(start.group(1))] + [float(entry["metrics"]["loss"]) for entry in history]


@pytest.mark.slow
def test_smollm2_fine_tunes_with_lora_on_three_budgets_and_its_held_out_loss_falls(tmp_path: Path) -> None:
    """The real SmolLM2-135M (the packaged GGUF), SST-2 as instructions: one device fits full
    fine-tuning, two cannot and train LoRA of ranks 16 and 4; the held-out response loss falls.

    Then the deploys, to the two devices whose budget is not the largest (the dense device's export
    fitted before as well; leaving it out keeps one SmolLM2 export, about a minute of CPU, out of the
    suite): the LoRA r16 device's budget (2.37 GB, too small for the old 20 B/param export) holds the
    export of what it trains, it installs its ONNX model and ``edge-sdk generate`` generates from it
    without torch; the LoRA r4 device's budget holds none: it is skipped, and its record says why."""
    from edge_sdk.scaling import resolve_model_dir

    model = resolve_model_dir("SmolLM2-135M")  # converted once into edge-fm's cache folder
    training = TrainingConfig(local_steps=2, batch_size=4, seq_len=32, lr=1e-4)
    ranks = [16, 8, 4]
    parent, salience = ranked_parent(model, task="causal-lm", cache=True)
    budgets = lever_budgets(parent, salience, training, LeverPolicy(lora_ranks=tuple(ranks)))
    del parent, salience
    config = write_llm_config(tmp_path, "SmolLM2-135M", training=training, ranks=ranks, dev_rows=32, deploy=True)
    deploying = frozenset({"medium", "small"})
    history = run_federation(tmp_path, config, budgets, "SmolLM2-135M", rows=32, timeout=900, deploy=deploying)
    for entry in history:
        levers = check_devices(entry, budgets)
        assert levers["large"].lora_rank == 0 and not levers["large"].costs_accuracy  # full fine-tuning fits it
        assert (levers["medium"].lora_rank, levers["small"].lora_rank) == (16, 4)  # they cannot: LoRA
    losses = held_out_losses((tmp_path / "coordinator.log").read_text(encoding="utf-8"), history)
    print("held-out response-token loss (round 0, 1, 2):", losses)
    for entry in history:
        print(
            {
                d["device_id"]: (d["levers"], d["predicted_bytes"], d["peak_rss_bytes"] - d["runtime_bytes"])
                for d in entry["devices"]
            }
        )
    assert losses[2] < losses[1] < losses[0]
    check_smollm2_deploys(tmp_path, budgets)


def check_smollm2_deploys(folder: Path, budgets: dict[str, int]) -> None:
    """Of the deploying devices, a deploy was sent exactly where the plan's export fits the device's
    deploy budget; each sent one generates; the others are skipped with the reason, nothing installed."""
    deployed = {d["device_id"]: d for d in json.loads((folder / "run" / "deployments.json").read_text())}
    assert sorted(deployed) == sorted(TOKENS)
    large = deployed.pop("large")  # it refuses deploys (no --deploy-dir): never planned nor sent
    assert large["status"] == "skipped" and "does not deploy models" in large["reason"], large
    for name, d in sorted(deployed.items()):
        print(name, d["status"], d["predicted_bytes"], d["budget_bytes"], d["reason"] or d["metrics"])
        assert d["fits"] == (d["predicted_bytes"] <= d["budget_bytes"]), d
        if d["fits"]:
            check_installed(folder, name, d, n_layers=30)
            continue
        assert d["status"] == "skipped" and d["reason"].startswith("its budget fits no deploy: "), d
        assert "above its deploy budget of" in d["reason"] and not (folder / f"deployed-{name}").exists()
        assert f"deploy {d['task_id']} to {name} (round 2): skipped (its budget fits no deploy" in (
            folder / "coordinator.log"
        ).read_text(encoding="utf-8")
    # the LoRA r16 device deploys now that the export needs 11, not 20, bytes a parameter; r4 cannot
    assert deployed["medium"]["status"] == "ok" and deployed["medium"]["predicted_bytes"] < budgets["medium"]
    assert deployed["small"]["status"] == "skipped"
