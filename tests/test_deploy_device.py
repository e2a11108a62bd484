"""Deploying on the device: the handler alone (real torch, ONNX export, ONNX Runtime) and end to end over
real websockets on 127.0.0.1 with the in-process coordinator, after the last round and on demand.

The model is a tiny random BERT with MiniLM's vocabulary, so that the packaged tokenizer applies."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from coordinator.federation._config import DeployConfig, FederationConfig, ServerConfig, TrainingConfig
from coordinator.federation._deploy_plan import DeployOutcome
from coordinator.federation._engine import FederationEngine
from coordinator.serve._server import DEPLOYMENTS_FILE, CoordinatorServer
from edge_sdk import LabelMap
from edge_sdk._spec import SubnetSpec
from edge_sdk.client._backoff import Backoff
from edge_sdk.client._client import DeviceOptions, EdgeDevice
from edge_sdk.protocol import Deploy, DeployReceived, InferenceSettings, encode_tensors, torch_to_numpy
from edge_sdk.protocol._closecodes import CLOSE_RUN_COMPLETE
from edge_sdk.scaling._extract import extract
from edge_sdk.scaling._parent import ParentModel, parent_from_module
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import Salience, weight_l1
from edge_sdk.serving import _export_graph
from edge_sdk.serving._infer import MANIFEST_NAME, load, sha256_file
from edge_sdk.serving._install import Deployer
from edge_sdk.training._data import read_tsv
from edge_sdk.training._runner import TextDataset

from .models import SST2, tiny_vocab_bert_config
from .test_server import Device as HandDevice
from .test_server import dial

TIMEOUT = 120.0


def vocab_parent(seed: int = 0) -> tuple[ParentModel, Salience]:
    """A random 2-layer BERT (hidden 32, 4 heads of 8, FFN 64) with MiniLM's vocabulary, reordered."""
    torch.manual_seed(seed)
    config = tiny_vocab_bert_config()
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    parent = parent_from_module(model.eval())
    parent, salience, _ = reorder(parent, weight_l1(parent))
    return parent, salience


def local_data(rows: int = 48, holdout: int = 16) -> TextDataset:
    return TextDataset(read_tsv(SST2 / "train.tsv", limit=rows), None, holdout=holdout)


def deploy_message(
    parent: ParentModel, spec: SubnetSpec, round_: int, *, quantize: bool = False
) -> tuple[Deploy, dict[str, np.ndarray]]:
    tensors = torch_to_numpy(extract(parent, spec))
    manifest, _ = encode_tensors(tensors)
    config = json.loads(json.dumps(dict(parent.config), default=str))
    deploy = Deploy(
        task_id=f"d{round_}-test",
        round=round_,
        spec=spec.to_dict(),
        model_config=config,
        settings=InferenceSettings(batch_size=1, seq_len=64, quantize=quantize),
        weights=manifest,
    )
    return deploy, tensors


def files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def parent() -> tuple[ParentModel, Salience]:
    return vocab_parent()


# ------------------------------------------------------------------------------- the handler alone


def test_a_deploy_is_exported_checked_and_installed_with_its_manifest(
    tmp_path: Path, parent: tuple[ParentModel, Salience]
) -> None:
    model, _ = parent
    spec = SubnetSpec.uniform(model.dims, heads=3, ffn=48)
    data = local_data()
    assert len(data) == 32 and len(data.held_out) == 16  # the held-back slice is never trained on
    out = tmp_path / "model"
    deploy, tensors = deploy_message(model, spec, 4, quantize=True)
    result = Deployer(out, data, threads=1, method="torch").deploy(deploy, tensors, run_id="run-1")
    assert result.ok, result.message
    m = result.metrics
    assert 0 <= m["parity_max_abs_diff"] <= 1e-4
    assert m["params"] == sum(t.size for t in tensors.values() if t.dtype.kind == "f")
    assert m["onnx_bytes"] == (out / "model.onnx").stat().st_size
    assert m["int8_bytes"] == (out / "model_quantized.onnx").stat().st_size
    assert m["drift_rows"] == 16 and 0 <= m["drift_agreement"] <= 1 and "drift_accuracy_drop" in m
    assert m["export_s"] > 0 and m["latency_ms"] > 0 and m["seconds"] >= m["export_s"]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"] == {"run_id": "run-1", "round": 4, "task_id": "d4-test"}
    assert manifest["spec"] == spec.to_dict()
    assert [w["heads"] for w in manifest["model"]["layer_widths"]] == [3, 3]
    assert manifest["parity"]["max_abs_diff"] == m["parity_max_abs_diff"]
    assert manifest["drift"]["n"] == 16 and manifest["drift_slice"] == {"rows": 16, "held_out": True}
    assert manifest["max_length"] == 64 and manifest["inference"]["quantize"] is True
    (prediction,) = load(out).predict(["a gorgeous , witty , seductive movie ."])
    assert prediction.label in ("LABEL_0", "LABEL_1")


def test_a_model_that_fails_parity_is_refused_and_the_previous_one_kept(
    tmp_path: Path, parent: tuple[ParentModel, Salience], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = parent
    spec = SubnetSpec.uniform(model.dims, heads=2, ffn=32)
    out = tmp_path / "model"
    deployer = Deployer(out, local_data(), threads=1, method="torch")
    first = deployer.deploy(*deploy_message(model, spec, 1), run_id="run-1")
    assert first.ok, first.message
    before = files(out)

    real_export = _export_graph.export_torch

    def export_a_different_model(module: torch.nn.Module, path: Path, opset: int) -> None:
        skewed = copy.deepcopy(module)
        with torch.no_grad():
            skewed.classifier.bias += 1e-2  # a graph that no longer matches the module
        real_export(skewed, path, opset)

    monkeypatch.setattr(_export_graph, "export_torch", export_a_different_model)
    second = deployer.deploy(*deploy_message(model, SubnetSpec.full(model.dims), 2), run_id="run-1")
    assert not second.ok
    assert "parity check failed" in second.message and "previously installed model is kept" in second.message
    assert files(out) == before
    assert json.loads((out / MANIFEST_NAME).read_text())["source"]["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder left behind
    load(out).predict(["still served"])


def test_corrupt_weights_or_a_foreign_folder_answer_not_ok(
    tmp_path: Path, parent: tuple[ParentModel, Salience]
) -> None:
    model, _ = parent
    spec = SubnetSpec.uniform(model.dims, heads=2, ffn=32)
    out = tmp_path / "model"
    deployer = Deployer(out, local_data(), threads=1, method="torch")
    assert deployer.deploy(*deploy_message(model, spec, 1)).ok
    before = files(out)

    deploy, tensors = deploy_message(model, spec, 2)
    name = next(n for n in tensors if n.endswith("intermediate.dense.weight"))
    tensors[name] = tensors[name][:-1]  # one row short: these weights are not the spec's sub-network
    result = deployer.deploy(deploy, tensors)
    assert not result.ok and "SpecError" in result.message and name in result.message
    assert files(out) == before

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"not a model")
    refused = Deployer(foreign, local_data(), method="torch").deploy(*deploy_message(model, spec, 3))
    assert not refused.ok and "not empty" in refused.message
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]


# ---------------------------------------------------------------------------- over real websockets


@contextlib.asynccontextmanager
async def coordinator(
    tmp_path: Path,
    names: list[str],
    parent: tuple[ParentModel, Salience],
    labels: tuple[str, ...] = (),
    **deploy: Any,
) -> AsyncIterator[CoordinatorServer]:
    model, salience = parent
    if labels:  # the run's label map, in the model config every task and deploy carries (as serve sets it)
        model = dataclasses.replace(model, config=LabelMap.from_config(list(labels)).apply_to(model.config))
    federation = FederationConfig(
        rounds=1, min_devices=len(names), device_wait_s=60, round_deadline_s=60, min_margin_bytes=0
    )
    training = TrainingConfig(local_steps=1, lr=1e-3, batch_size=4, seq_len=16)
    engine = FederationEngine(model, salience, federation, training, devices=names)
    srv = CoordinatorServer(
        engine,
        ServerConfig(host="127.0.0.1", port=0, hello_timeout_s=10.0),
        {name: f"token-of-{name}" for name in names},
        run_dir=tmp_path / "run",
        deploy=DeployConfig(**{"seq_len": 32, "timeout_s": TIMEOUT, **deploy}),
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def device(srv: CoordinatorServer, name: str, deploy_dir: Path | None) -> EdgeDevice:
    options = DeviceOptions(
        url=f"ws://127.0.0.1:{srv.port}",
        token=f"token-of-{name}",
        memory_budget="2GB",
        probe=False,
        threads=1,
        backoff=Backoff(initial_s=0.05, max_s=0.2, give_up_s=30),
        deploy_dir=deploy_dir,
    )
    return EdgeDevice(options, local_data(rows=24, holdout=0))


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT * 2)

    return asyncio.run(bounded())


async def legacy_device(srv: CoordinatorServer, name: str) -> None:
    """A device of an SDK that does not deploy: driven by hand, it sends back the weights it was sent."""
    async with dial(srv, name) as ws:
        legacy = HandDevice(ws)
        await legacy.hello()
        event = await legacy.task()
        legacy.conn.send_update(
            task_id=event.task.task_id,
            tensors=dict(event.tensors),
            num_samples=5,
            metrics={"loss": 0.5},
            peak_rss_bytes=1,
            step_time_s=0.1,
            train_time_s=0.1,
            encoding="weights",
        )
        await legacy.flush()
        code, _ = await legacy.closed()
        assert code == CLOSE_RUN_COMPLETE


def test_after_the_last_round_every_deploying_device_installs_its_inference_model(
    tmp_path: Path, parent: tuple[ParentModel, Salience]
) -> None:
    folder = tmp_path / "served"

    async def main() -> tuple[list[DeployOutcome], int]:
        async with coordinator(tmp_path, ["new", "old"], parent, labels=("negative", "positive")) as srv:
            new = device(srv, "new", folder)
            runs = [asyncio.ensure_future(new.run_async()), asyncio.ensure_future(legacy_device(srv, "old"))]
            await asyncio.wait_for(srv.run(), TIMEOUT)
            done, _ = await asyncio.wait_for(asyncio.gather(*runs), 30)
            assert new.deploys_done == 1
            return srv.deployments, done

    deployments, done = run(main())
    assert done == 1  # one training task; the deploy is not a task
    by_device = {d.device_id: d for d in deployments}
    new, old = by_device["new"], by_device["old"]
    assert new.status == "ok", new.reason
    assert old.status == "skipped" and "no 'deploy' capability" in old.reason
    assert new.round == 1 and new.params >= new.train_params and new.metrics["parity_max_abs_diff"] <= 1e-4
    assert new.bytes_out > 4 * new.params and new.metrics["onnx_bytes"] == (folder / "model.onnx").stat().st_size
    records = json.loads((tmp_path / "run" / DEPLOYMENTS_FILE).read_text())
    assert sorted(r["device_id"] for r in records) == ["new", "old"]
    assert next(r for r in records if r["device_id"] == "new")["metrics"] == new.metrics
    (prediction,) = load(folder).predict(["a gorgeous , witty , seductive movie ."])
    assert prediction.label in ("negative", "positive")  # the run's labels reach the served model


def http_get(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_an_operator_deploys_to_one_connected_device_on_demand(
    tmp_path: Path, parent: tuple[ParentModel, Salience]
) -> None:
    folder = tmp_path / "served"
    operator = "operator-token-1234"

    async def get(srv: CoordinatorServer, path: str, token: str | None = operator) -> tuple[int, dict[str, Any]]:
        return await asyncio.to_thread(http_get, f"http://127.0.0.1:{srv.port}{path}", token)

    async def main() -> None:
        async with coordinator(tmp_path, ["pi"], parent, operator_token=operator) as srv:
            pi = device(srv, "pi", folder)
            joined = asyncio.ensure_future(pi.run_async())
            for _ in range(600):  # no round runs here: the device joins and waits
                if srv._idle() == ["pi"]:
                    break
                await asyncio.sleep(0.05)
            assert await get(srv, "/deploy/pi", None) == (401, {"error": "bad operator token"})
            assert (await get(srv, "/deploy/pi", "token-of-pi"))[0] == 401  # a device's token is not enough
            assert (await get(srv, "/deploy/nobody"))[0] == 404
            status, body = await get(srv, "/deploy/pi")
            assert status == 202 and body["device"] == "pi" and body["round"] == 0, body
            busy, why = await get(srv, "/deploy/pi")
            assert busy == 409 and "already running" in why["error"]
            records: list[dict[str, Any]] = []
            for _ in range(1200):
                status, listing = await get(srv, "/deployments")
                records = [r for r in listing["deployments"] if r["task_id"] == body["task_id"]]
                if records:
                    break
                await asyncio.sleep(0.1)
            (record,) = records
            assert status == 200 and record["status"] == "ok", record
            assert record["round"] == 0 and record["metrics"]["parity_max_abs_diff"] <= 1e-4
            await srv.stop(CLOSE_RUN_COMPLETE, "done")
            assert await asyncio.wait_for(joined, 30) == 0

    run(main())
    assert json.loads((folder / MANIFEST_NAME).read_text())["source"]["round"] == 0
    load(folder).predict(["fine"])


async def train_then_misbehave(srv: CoordinatorServer, name: str, vanish: bool) -> None:
    """A hand-driven device that announces 'deploy', trains, then vanishes or never answers its Deploy."""
    async with dial(srv, name) as ws:
        hand = HandDevice(ws)
        hand.conn.send_hello(
            device_id=name,
            sdk_version="0",
            profile={"budget": {"usable": 10**10}},
            capabilities=("train", "evaluate", "deploy"),
        )
        await hand.flush()
        await hand.events()  # Welcome
        event = await hand.task()
        hand.conn.send_update(
            task_id=event.task.task_id,
            tensors=dict(event.tensors),
            num_samples=5,
            metrics={},
            peak_rss_bytes=1,
            step_time_s=0.1,
            train_time_s=0.1,
            encoding="weights",
        )
        await hand.flush()
        events = await hand.events()  # the update is refused (its rows are missing): an Error says so first
        while not any(isinstance(e, DeployReceived) for e in events):
            events += await hand.events()
        deploy = next(e for e in events if isinstance(e, DeployReceived))
        assert deploy.deploy.settings.seq_len == 32
        if vanish:
            await ws.close(1001, "gone")
            return
        code, _ = await hand.closed()  # never answers: the coordinator gives up and ends the run
        assert code == CLOSE_RUN_COMPLETE


def test_a_device_that_vanishes_or_never_answers_costs_only_its_own_deploy(
    tmp_path: Path, parent: tuple[ParentModel, Salience]
) -> None:
    async def main() -> list[DeployOutcome]:
        async with coordinator(tmp_path, ["gone", "silent"], parent, timeout_s=3.0) as srv:
            devices = [train_then_misbehave(srv, "gone", True), train_then_misbehave(srv, "silent", False)]
            running = asyncio.gather(*devices)
            await asyncio.wait_for(srv.run(), TIMEOUT)  # the run ends normally
            await asyncio.wait_for(running, 30)
            return srv.deployments

    got = {d.device_id: d for d in run(main())}
    assert got["gone"].status == "failed" and "disconnected" in got["gone"].reason, got["gone"]
    assert got["silent"].status == "timeout" and "no answer within 3 s" in got["silent"].reason
    assert got["silent"].bytes_out > 4 * got["silent"].params
    state = json.loads((tmp_path / "run" / DEPLOYMENTS_FILE).read_text())
    assert sorted((r["device_id"], r["status"]) for r in state) == [("gone", "failed"), ("silent", "timeout")]
    assert (tmp_path / "run" / "checkpoints" / "LATEST").is_file()  # the run's final state is saved


def test_a_finished_run_resumed_waits_for_its_devices_and_deploys_to_them(
    tmp_path: Path, parent: tuple[ParentModel, Salience]
) -> None:
    model, salience = parent
    federation = FederationConfig(rounds=1, min_devices=1, device_wait_s=30, min_margin_bytes=0)
    training = TrainingConfig(local_steps=1, batch_size=4, seq_len=16)
    engine = FederationEngine(model, salience, federation, training, devices=["pi"], completed_rounds=1)
    assert engine.finished

    async def answer_the_deploy(srv: CoordinatorServer) -> None:
        async with dial(srv, "pi") as ws:
            hand = HandDevice(ws)
            hand.conn.send_hello(
                device_id="pi", sdk_version="0", profile={"budget": {"usable": 10**10}}, capabilities=("deploy",)
            )
            await hand.flush()
            await hand.events()  # Welcome
            (deploy,) = await hand.events()
            assert isinstance(deploy, DeployReceived) and deploy.deploy.round == 1
            hand.conn.send_deploy_result(
                task_id=deploy.deploy.task_id, ok=True, metrics={"parity_max_abs_diff": 1e-7}, message="fine"
            )
            await hand.flush()
            code, _ = await hand.closed()
            assert code == CLOSE_RUN_COMPLETE

    async def main() -> list[DeployOutcome]:
        srv = CoordinatorServer(
            engine,
            ServerConfig(host="127.0.0.1", port=0, hello_timeout_s=10.0),
            {"pi": "token-of-pi"},
            deploy=DeployConfig(seq_len=32),
        )
        await srv.start()
        running = asyncio.ensure_future(srv.run())
        await asyncio.sleep(0.5)  # the device comes back after the coordinator restarted
        await asyncio.wait_for(answer_the_deploy(srv), TIMEOUT)
        await asyncio.wait_for(running, TIMEOUT)
        return srv.deployments

    (record,) = run(main())
    assert (record.device_id, record.status, record.round) == ("pi", "ok", 1)
    assert record.metrics == {"parity_max_abs_diff": 1e-7} and record.params >= record.train_params


def test_a_device_whose_budget_fits_no_deploy_is_skipped_with_the_reason(
    tmp_path: Path, parent: tuple[ParentModel, Salience], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan whose export fits not even the training sub-network (``fits`` False) is not sent: the
    record and the log say why (before, it was sent anyway and the device could run out of memory)."""
    from coordinator.serve import _deploys

    real = _deploys.make_order

    def too_small(*args: Any, **kwargs: Any) -> Any:
        order = real(*args, **kwargs)
        return dataclasses.replace(order, plan=dataclasses.replace(order.plan, fits=False))

    monkeypatch.setattr(_deploys, "make_order", too_small)
    folder = tmp_path / "served"

    async def main() -> list[DeployOutcome]:
        async with coordinator(tmp_path, ["new"], parent) as srv:
            new = device(srv, "new", folder)
            runs = asyncio.ensure_future(new.run_async())
            await asyncio.wait_for(srv.run(), TIMEOUT)
            await asyncio.wait_for(runs, 30)
            assert new.deploys_done == 0
            return srv.deployments

    (skipped,) = run(main())
    assert skipped.status == "skipped" and not skipped.fits and skipped.bytes_out == 0
    assert skipped.reason.startswith("its budget fits no deploy: ") and "above its deploy budget of" in skipped.reason
    assert skipped.predicted_bytes > 0 and skipped.log_line().endswith(f"skipped ({skipped.reason})")
    (record,) = json.loads((tmp_path / "run" / DEPLOYMENTS_FILE).read_text())
    assert record["status"] == "skipped" and record["reason"] == skipped.reason
    assert not folder.exists()
