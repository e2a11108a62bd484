"""The public API, locked: a change to what the packages export must change this file too."""

import subprocess
import sys

import coordinator
import edge_sdk
import edge_sdk.protocol

EDGE_SDK = {
    "SPEC_VERSION", "AggregationError", "BudgetError", "ConfigError", "DeviceClass", "DeviceOptions",
    "DeviceProfile", "EdgeDevice", "TextDataset",
    "EdgeFMError", "ExportError", "ExportReport", "LayerSpec", "MemoryBudget", "MemoryEstimate",
    "ModelLoadError", "ParentDims", "Prediction", "Predictor", "ProfileError", "ProtocolError", "SpecError",
    "SubnetSpec", "TrainConfig", "TrainResult", "UnsupportedModelError", "Workload", "__version__",
    "build_model", "compute_budget", "detect_profile", "evaluate", "export_onnx", "format_bytes",
    "inference_estimate", "list_device_classes", "load", "load_device_class", "parse_size", "proximal_term",
    "train_local", "training_estimate",
    # the device's data pipeline and task runner (the coordinator's simulator and validator use them too)
    "Encoded", "TextExample", "encode", "iter_batches", "load_tokenizer", "read_tsv", "TaskRunner",
    "prepare_runtime",
    # image folders for ViT (image classification)
    "ImageDataset", "ImageProcessing", "image_seq_len", "read_image_folder",
    # files of any common format, and the run's label map
    "DataFile", "DataFormat", "LabelMap", "read_rows",
    # causal-LM prompt/response records
    "PromptDataset", "encode_prompts", "is_prompt_file", "read_prompts",
    # a websocket's messages as the protocol takes them (the SDK client and the coordinator's server)
    "websocket_messages",
    # the data channel for tensor chunks beside the websocket (both ends)
    "DataChannel", "serve_data_channels",
}  # fmt: skip

COORDINATOR = {
    "ClientUpdate", "CoordinatorServer", "FedAdam", "FedAvg", "FederationEngine", "RunConfig", "build_engine",
    "load_config", "run_coordinator", "ParentModel", "Plan", "Reordering", "Salience", "ServerOptimizer",
    "activation_aware", "aggregate", "apply_reordering", "extract", "load_parent", "merge_deltas",
    "param_count", "parent_from_module", "plan_inference", "plan_reordering", "plan_training", "reorder",
    "resolve_model_dir", "weight_l1",
}  # fmt: skip


def test_edge_sdk_exports_exactly_its_api() -> None:
    assert set(edge_sdk.__all__) == EDGE_SDK
    for name in EDGE_SDK:
        assert getattr(edge_sdk, name) is not None


def test_coordinator_exports_exactly_its_api() -> None:
    assert set(coordinator.__all__) == COORDINATOR
    for name in COORDINATOR:
        assert getattr(coordinator, name) is not None


def test_protocol_names_resolve() -> None:
    for name in edge_sdk.protocol.__all__:
        assert getattr(edge_sdk.protocol, name) is not None


def test_every_error_is_an_edge_fm_error() -> None:
    errors = [getattr(edge_sdk, n) for n in EDGE_SDK if n.endswith("Error")]
    assert len(errors) == 10
    assert all(issubclass(e, edge_sdk.EdgeFMError) for e in errors)


def test_importing_the_sdk_and_its_protocol_does_not_import_torch() -> None:
    code = "import sys, edge_sdk, edge_sdk.protocol; edge_sdk.SubnetSpec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_private_modules_stay_private() -> None:
    assert all(not n.startswith("_") or n == "__version__" for n in EDGE_SDK | COORDINATOR)
