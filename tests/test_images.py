"""Image folders for ViT: the reader and its preprocessing (checked against transformers'
ViTImageProcessor), clear errors for corrupt images and mismatched sizes, the planner's sequence for
a ViT, a real federation (``edge-coordinator serve`` and two ``edge-sdk join --data DIR`` over
websockets on 127.0.0.1) and the simulator, all on a folder of tiny PNGs written by the tests."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint
from coordinator.federation._config import load_config
from coordinator.federation._engine import FederationEngine
from coordinator.federation._tables import FederationConfig, TrainingConfig
from coordinator.serve._run import _validator, run_labels
from coordinator.serve._validation import ImageValidator, calibration_batches
from coordinator.simulation._config import parse_simulation_config
from coordinator.simulation._executor import LocalExecutor
from coordinator.simulation._run import run_simulation
from edge_sdk import (
    ConfigError,
    ImageDataset,
    ImageProcessing,
    SpecError,
    SubnetSpec,
    Workload,
    build_model,
    image_seq_len,
    read_image_folder,
)
from edge_sdk._levers import Levers
from edge_sdk.scaling import extract, load_parent, parent_from_module, ranked_parent, weight_l1
from edge_sdk.scaling._memory import activation_bytes
from edge_sdk.training._levers import trained_tensors
from edge_sdk.training._train import TrainConfig, train_local

from ._federation import Proc, read_port
from .models import image_folder, tiny_vit_dir
from .test_simulation import toml_text

ROUND_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vit_dir(tmp_path_factory.mktemp("vit") / "tiny-vit")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images") / "colours", per_class=8)


def test_preprocessing_matches_transformers_vit_image_processor(vit: Path, images: Path) -> None:
    from PIL import Image
    from transformers import ViTImageProcessor

    reference = ViTImageProcessor.from_pretrained(vit)
    processing = ImageProcessing.from_model_dir(vit)
    assert processing.size == (32, 32)
    for path in sorted(images.glob("*/*.png"))[:4]:  # sizes 20-40 px, not square: resized both ways
        with Image.open(path) as image:
            expected = reference(image, return_tensors="np")["pixel_values"][0]
            got = processing.apply(image)
        assert got.dtype == np.float32 and got.shape == (3, 32, 32)
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_classes_are_sorted_sub_folders_and_batches_hold_pixels_and_labels(vit: Path, images: Path) -> None:
    data = ImageDataset.from_folder(images, vit, holdout=2)
    assert data.classes == ("blue", "red") and len(data) == 14 and len(data.held_out) == 2
    assert sorted(data.labels().tolist()) == [0] * 8 + [1] * 6
    batch = next(data.batches(4, 999, seed=3))  # the sequence length is the model's: ignored
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == np.float32
    assert batch["labels"].dtype == np.int64
    again = next(data.batches(4, 0, seed=3))
    np.testing.assert_array_equal(batch["pixel_values"], again["pixel_values"])  # a seed fixes the batches
    # colour decides the class: red images have a larger red than blue channel, after normalisation
    red = batch["pixel_values"][:, 0].mean(axis=(1, 2)) > batch["pixel_values"][:, 2].mean(axis=(1, 2))
    assert red.astype(np.int64).tolist() == batch["labels"].tolist()
    assert sum(len(b["labels"]) for b in data.eval_batches(5)) == 14
    cut = read_image_folder(images, limit=3)  # a limit keeps every class
    assert sorted(label for _, label in cut.files) == [0, 0, 1]


def test_a_corrupt_image_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "imgs", per_class=2)
    bad = folder / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ConfigError, match=r"cannot read the image .*broken\.png"):
        ImageDataset.from_folder(folder)
    good = (folder / "blue" / "img0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated: the header reads, the pixels do not
    with pytest.raises(ConfigError, match=r"broken\.png"):
        read_image_folder(folder)
    bad.unlink()
    from PIL import Image

    jpeg = folder / "red" / "photo.JPG"  # extensions in any case; a truncated JPEG passes PIL's verify()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(jpeg, format="JPEG")
    assert len(read_image_folder(folder).files) == 5
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    with pytest.raises(ConfigError, match=r"photo\.JPG: OSError: "):
        read_image_folder(folder)
    jpeg.unlink()
    (folder / "green").mkdir()  # an empty class keeps the labels of the others: blue 0, green 1, red 2
    assert read_image_folder(folder).classes == ("blue", "green", "red")
    assert sorted(set(read_image_folder(folder).labels().tolist())) == [0, 2]
    for path in folder.glob("*/*.png"):
        path.unlink()
    with pytest.raises(ConfigError, match="no images in its class sub-folders"):
        read_image_folder(folder)


def test_a_device_with_images_refuses_a_deploy_with_a_clear_reason(tmp_path: Path, images: Path) -> None:
    from edge_sdk.serving._install import Deployer

    deployer = Deployer(tmp_path / "deploy", ImageDataset.from_folder(images))
    with pytest.raises(ConfigError, match="image folder: deploying image-classification models is not supported"):
        deployer._examples()


def test_the_model_decides_the_size_and_a_mismatch_is_refused(vit: Path, images: Path) -> None:
    config = json.loads((vit / "config.json").read_text())
    data = ImageDataset(read_image_folder(images), ImageProcessing())  # no processor file: defaults
    data.fit_model(config)
    assert data.processing.size == (32, 32)
    with pytest.raises(SpecError, match="preprocessed to 32x32 but the model takes 16x16"):
        data.fit_model({**config, "image_size": 16})
    with pytest.raises(SpecError, match="2 classes but the model has 1 labels"):
        data.fit_model({**config, "num_labels": 1})
    with pytest.raises(SpecError, match="takes no images"):
        data.fit_model({"vocab_size": 50})


def test_the_planner_counts_a_vits_patches_not_the_text_seq_len(vit: Path) -> None:
    parent = load_parent(vit, task="image-classification")
    assert image_seq_len(parent.config) == 17  # (32 / 8)^2 patches + [CLS]
    assert image_seq_len({"vocab_size": 50}) is None
    training = TrainingConfig(local_steps=1, batch_size=4, seq_len=128)
    engine = FederationEngine(parent, weight_l1(parent), FederationConfig(rounds=1), training, devices=["a"])
    assert engine.planner.work.seq == 17
    assert engine.planner.work.dropout is False  # a ViT's dropout probabilities are 0: no masks saved
    with_dropout = dataclasses.replace(training, dropout=0.1)
    engine = FederationEngine(parent, weight_l1(parent), FederationConfig(rounds=1), with_dropout, devices=["a"])
    assert engine.planner.work.dropout is True


def test_the_memory_model_predicts_a_vits_activations() -> None:
    """What autograd saves for a ViT (pre-LN, 64 patches + [CLS]) is the text encoder's formula at
    seq = patches + 1, without dropout masks: within 3 % (ViT-tiny at 224 px, 197 tokens: -1.3 %)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=96, num_attention_heads=3, intermediate_size=384, num_hidden_layers=4, image_size=64, patch_size=8
    )
    config._attn_implementation = "eager"
    parent = parent_from_module(transformers.ViTForImageClassification(config))
    spec = SubnetSpec.full(parent.dims)
    model = build_model(spec, parent.config, extract(parent, spec))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(pixel_values=torch.randn(4, 3, 64, 64), labels=torch.zeros(4, dtype=torch.long))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in storages.items() if ptr not in params)
    seq = image_seq_len(parent.config)
    assert seq == 65
    predicted = activation_bytes(spec, Workload(4, seq, dropout=False))
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


@pytest.mark.parametrize(
    "levers",
    [Levers(attention="sdpa"), Levers(checkpointing=True), Levers(micro_batches=2), Levers(lora_rank=4)],
    ids=lambda v: v.describe(),
)
def test_every_lever_a_vit_has_trains_on_image_batches(levers: Levers, vit: Path, images: Path) -> None:
    """The planner offers a ViT no embedding lever (no token table); the others train on pixel batches."""
    parent = load_parent(vit, task="image-classification")
    spec = SubnetSpec.full(parent.dims)
    received = extract(parent, spec)
    model = build_model(spec, parent.config, received, attn_implementation=levers.attention, task=parent.task)
    result = train_local(model, ImageDataset.from_folder(images, vit).batches(4), TrainConfig(steps=2, levers=levers))
    assert np.isfinite(result.loss) and result.samples == 8
    assert trained_tensors(model, received)  # something trained, under the lever's names


def _run_config(folder: Path, vit: Path, images: Path) -> Path:
    text = f"""
[model]
name = "{vit}"
task = "image-classification"

[federation]
rounds = 1
min_devices = 2
device_wait_s = 120
round_deadline_s = 300

[training]
local_steps = 2
batch_size = 4
lr = 1e-3

[validation]
data = "{images}"

[server]
host = "127.0.0.1"
port = 0
port_file = "port"

[devices]
a = "token-of-a"
b = "token-of-b"

[run]
dir = "run"

[deploy]
enabled = false
"""
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_run_config_validates_on_an_image_folder(tmp_path: Path, vit: Path, images: Path) -> None:
    config = load_config(_run_config(tmp_path, vit, images))
    labels = run_labels(config)  # the folder's class names, sorted
    assert labels.names == ("blue", "red")
    validator = _validator(config, vit, labels)
    assert isinstance(validator, ImageValidator) and len(validator.data) == 16
    metrics = validator(load_parent(vit, task="image-classification"))
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["samples"] == 16
    # activation salience calibrates on the folder's pixel batches
    parent, _ = ranked_parent(
        vit, salience="activation", calibration=lambda: calibration_batches(validator), task="image-classification"
    )
    assert validator(parent)["accuracy"] == metrics["accuracy"]  # reordering preserves the function
    with pytest.raises(SpecError, match="no 'text-classification' head \\(its tasks: 'image-classification'"):
        load_parent(vit, task="text-classification")  # a ViT named with the default task: the fix is named


def _join(url: str, token: str, data: Path, vit: Path, log: Path) -> Proc:
    args = [sys.executable, "-m", "edge_sdk.cli", "join", url, "--token", token, "--data", str(data)]
    args += ["--image-processor", str(vit), "--memory-budget", "2GB", "--threads", "1", "--no-probe"]
    args += ["--retry-initial", "0.2", "--retry-max", "1", "--give-up-after", "180", "--no-deploy"]
    return Proc(args, log, data.parent)


def test_a_real_federation_round_trains_a_vit_on_image_folders(tmp_path: Path, vit: Path) -> None:
    """edge-coordinator serve (validation on an image folder) and two edge-sdk join --data DIR."""
    shards = [image_folder(tmp_path / f"device-{i}", per_class=4, seed=10 + i) for i in range(2)]
    dev = image_folder(tmp_path / "dev", per_class=4, seed=99)
    config = _run_config(tmp_path, vit, dev)
    server = Proc(
        [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)], tmp_path / "c.log", tmp_path
    )
    devices: list[Proc] = []
    try:
        url = f"ws://127.0.0.1:{read_port(tmp_path, server)}"
        devices = [
            _join(url, f"token-of-{n}", shard, vit, tmp_path / f"{n}.log")
            for n, shard in zip("ab", shards, strict=True)
        ]
        assert server.wait(ROUND_TIMEOUT_S) == 0, server.text()
        for proc in devices:
            assert proc.wait(ROUND_TIMEOUT_S) == 0, proc.text()
    finally:
        for proc in (server, *devices):
            proc.kill()
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
    (entry,) = state.history
    assert [d["status"] for d in entry["devices"]] == ["ok", "ok"], entry
    assert sorted(d["num_samples"] for d in entry["devices"]) == [8, 8]
    assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0  # validated on the dev image folder


def test_the_simulator_runs_a_vit_federation_on_an_image_folder(tmp_path: Path, vit: Path, images: Path) -> None:
    data = {
        "model": {"name": str(vit), "task": "image-classification"},
        "data": {"kind": "images", "train": str(images), "dev": str(images), "min_shard": 4},
        "devices": {"raspberry-pi-4-2gb": 2},
        "federation": {"rounds": 1, "fraction": 1.0, "min_devices": 1},
        "training": {"local_steps": 2, "batch_size": 4, "lr": 1e-3},
        "simulation": {"engine": "local", "max_workers": 1, "threads": 1},
        "run": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "sim.toml").write_text(toml_text(data), encoding="utf-8")  # the file a user would write
    config = parse_simulation_config(data, base=tmp_path)
    assert config.data.kind == "images"
    executor = LocalExecutor(max_workers=1, threads=1)
    try:
        result = run_simulation(config, executor=executor)
    finally:
        executor.close()
    (record,) = result.rounds
    assert [d["status"] for d in record["devices"]] == ["ok", "ok"]
    assert 0.0 <= record["accuracy"] <= 1.0 and sum(d["samples"] for d in result.devices) == 16
    with pytest.raises(ConfigError, match="unknown key"):
        parse_simulation_config({**data, "data": {**data["data"], "colour_mode": "rgb"}}, base=tmp_path)
    broken = image_folder(tmp_path / "broken", per_class=2)
    (broken / "red" / "x.png").write_bytes(b"not a png")
    bad = parse_simulation_config({**data, "data": {**data["data"], "train": str(broken)}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"x\.png"):
        run_simulation(bad, executor=LocalExecutor(max_workers=1, threads=1), run_dir=tmp_path / "bad")


def test_image_labels_follow_the_runs_label_map(tmp_path: Path) -> None:
    """A device's class sub-folders are numbered as the run's label map names them (by folder name),
    not by the device's own sort; a folder with images outside the map fails before training."""
    from edge_sdk import LabelMap

    folder = image_folder(tmp_path / "imgs", per_class=2)  # blue/ (0 by sort), red/ (1 by sort)
    data = ImageDataset.from_folder(folder)
    assert sorted({int(x) for x in data.labels()}) == [0, 1]
    blue = {int(label) for path, label in data.files if path.parent.name == "blue"}
    assert blue == {0}
    data.use_labels(LabelMap.from_config(["red", "green", "blue"]))  # the run's order: red=0, green=1, blue=2
    assert {int(label) for path, label in data.files if path.parent.name == "blue"} == {2}
    assert {int(label) for path, label in data.files if path.parent.name == "red"} == {0}
    assert data.classes == ("red", "green", "blue")
    with pytest.raises(ConfigError, match=r"class folder 'blue' is not one of the run's 2 labels"):
        ImageDataset.from_folder(folder).use_labels(LabelMap.from_config(["red", "green"]))
