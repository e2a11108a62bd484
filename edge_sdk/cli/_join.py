"""``edge-sdk join``: take part in a federated run with this device's local data.

    edge-sdk join wss://HOST:PORT --token T --data FILE|IMAGE_DIR [--memory-budget SIZE | --profile NAME]
                  [--format csv|tsv|jsonl|parquet] [--delimiter C] [--text-column NAME ...]
                  [--text-pair-column NAME] [--label-column NAME] [--prompt-column NAME]
                  [--response-column NAME] [--image-processor DIR]
                  [--tokenizer DIR] [--ca-file PEM] [--threads N] [--limit N] [--device-id NAME]
                  [--retry-initial S] [--retry-max S] [--give-up-after S] [--no-probe]
                  [--no-data-channel] [--deploy-dir DIR | --no-deploy] [--holdout N]

``--data`` is a CSV, TSV, JSON Lines or Parquet file (docs/data.md); its columns are read when the
device starts. A file with prompt and response columns (or ``--prompt-column`` / ``--response-column``)
holds causal-LM records: it trains a decoder's responses (``[model] task = "causal-lm"``; pass the
model's tokenizer, e.g. ``--tokenizer SmolLM2-135M``). Otherwise its rows are labelled texts, and
its labels are mapped through the run's label map when the first task brings it (a label outside
the map fails the task, untrained, naming the file, line and label).

When the run finishes the coordinator sends the device a larger, inference-sized sub-network: it is
exported to ONNX, checked, and installed in ``--deploy-dir`` (default ``./edge-fm-model``), where
``edge-sdk infer --model DIR`` serves it; a causal LM (prompt/response records) is exported with its
key/value cache, checked on the device's prompts, and ``edge-sdk generate --model DIR "prompt"``
serves it. A failed export keeps the previously installed model.

Tensors travel on a data channel beside the websocket (a second TCP connection, to the port the
coordinator's Welcome names) when the coordinator offers one; a device that cannot reach that port
falls back to the websocket after logging why, and ``--no-data-channel`` declines it outright (only the
websocket's port is reachable, e.g. behind an HTTP proxy).

While a training task runs, its steps are shown: a bar in a terminal, a log line every tenth of the
task otherwise (and the coordinator's status page shows them too).

Exit codes: 0 when the run is complete, 2 on a refusal (token, budget) or a bad argument, or when the
coordinator stayed unreachable for ``--give-up-after`` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk._errors import ConfigError
from edge_sdk._units import parse_size
from edge_sdk.client._backoff import Backoff

if TYPE_CHECKING:
    from edge_sdk.client._client import DeviceOptions

__all__ = ["DEFAULT_DEPLOY_DIR", "add_parser", "run"]

DEFAULT_DEPLOY_DIR = "edge-fm-model"
_DATA_HELP = (
    "local training data: a CSV, TSV, JSON Lines or Parquet file, or a folder of images with one sub-folder per class"
)
_PROCESSOR_HELP = (
    "for an image folder: the model folder (or file) with preprocessor_config.json"
    " (default: ViT's defaults at the size the model takes)"
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "join",
        help="join a coordinator's federated run and train on local data",
        description="Report this device's memory budget, receive the sub-network that fits it, train it on "
        "local data, send the update; reconnects by itself until the run is complete.",
    )
    p.add_argument("url", help="the coordinator, ws://HOST:PORT or wss://HOST:PORT")
    p.add_argument(
        "--token",
        default=os.environ.get("EDGE_FM_TOKEN"),
        help="this device's bearer token (default: $EDGE_FM_TOKEN)",
    )
    p.add_argument("--data", required=True, type=Path, help=_DATA_HELP)
    add_data_options(p)
    p.add_argument("--limit", type=int, default=None, help="use at most this many examples of --data")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--memory-budget", metavar="SIZE", help="training budget instead of detection (e.g. 1.5GB)")
    source.add_argument("--profile", metavar="NAME", help="budget of a named device class (or a .toml file)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="folder with the model's tokenizer.json, or a packaged model name"
        " (default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument("--image-processor", type=Path, default=None, metavar="DIR", help=_PROCESSOR_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    p.add_argument("--device-id", default=None, help="a name for logs (the token decides the identity)")
    add_connection_options(p)
    p.add_argument("--no-probe", action="store_true", help="skip the ~1 s compute probe")
    deploy = p.add_mutually_exclusive_group()
    deploy.add_argument(
        "--deploy-dir",
        type=Path,
        default=Path(DEFAULT_DEPLOY_DIR),
        help=f"where deployed inference models are installed (default ./{DEFAULT_DEPLOY_DIR})",
    )
    deploy.add_argument("--no-deploy", action="store_true", help="refuse deployed models")
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        metavar="N",
        help="hold the last N examples of --data back from training; a deployed int8 model's accuracy"
        " drift is measured on them (default 0: on the last local examples)",
    )
    return p


def add_connection_options(p: argparse.ArgumentParser) -> None:
    """How the device reaches the coordinator: TLS trust, reconnection, the data channel."""
    p.add_argument("--ca-file", type=Path, default=None, help="PEM certificate(s) to trust for wss://")
    p.add_argument("--retry-initial", type=float, default=0.5, help="first reconnection delay, s (default 0.5)")
    p.add_argument("--retry-max", type=float, default=30.0, help="longest reconnection delay, s (default 30)")
    p.add_argument(
        "--give-up-after",
        type=float,
        default=3600.0,
        help="stop after this many seconds without a working connection (default 3600)",
    )
    p.add_argument(
        "--no-data-channel",
        action="store_true",
        help="keep tensors on the websocket even when the coordinator offers a data channel (a second TCP"
        " connection to its data port: decline it where only the websocket's port is reachable)",
    )


def add_data_options(p: argparse.ArgumentParser) -> None:
    """How ``--data`` is read: --format, --delimiter, --text-column, --text-pair-column, --label-column."""
    p.add_argument("--format", choices=("csv", "tsv", "jsonl", "parquet"), help="default: from the file's suffix")
    p.add_argument("--delimiter", help="csv/tsv field delimiter, one character ('tab' for a tab)")
    p.add_argument(
        "--text-column",
        action="append",
        metavar="NAME",
        help="the column holding the text; repeat it to join several (title, description) with a space"
        " (default: sentence, text or content; sentence1 + sentence2 for pairs)",
    )
    p.add_argument("--text-pair-column", metavar="NAME", help="the second text of a sentence pair")
    p.add_argument("--label-column", metavar="NAME", help="default: label, labels, Quality or Class Index")
    p.add_argument(
        "--prompt-column",
        metavar="NAME",
        help="causal-LM records: the prompt column (default: prompt, instruction, input or question)",
    )
    p.add_argument(
        "--response-column",
        metavar="NAME",
        help="causal-LM records: the response column (default: response, completion, output or answer)",
    )


def data_format(args: argparse.Namespace) -> Any:
    """The DataFormat the data options name."""
    from edge_sdk.training._formats import DataFormat

    delimiter = args.delimiter
    if delimiter is not None and delimiter.lower() in ("tab", "\\t"):
        delimiter = "\t"
    return DataFormat(
        format=args.format,
        delimiter=delimiter,
        text_column=tuple(args.text_column or ()),
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        prompt_column=getattr(args, "prompt_column", None),
        response_column=getattr(args, "response_column", None),
    )


def run(args: argparse.Namespace) -> int:
    from edge_sdk.device._allocator import tune_allocator

    tune_allocator()  # before anything large is allocated (see edge_sdk.device._allocator)
    from edge_sdk.client._client import EdgeDevice
    from edge_sdk.client._progress import step_display
    from edge_sdk.training._formats import read_rows
    from edge_sdk.training._images import ImageDataset
    from edge_sdk.training._prompts import PromptDataset, is_prompt_file, read_prompts
    from edge_sdk.training._runner import TextDataset, resolve_tokenizer_dir

    if not args.token:
        raise ConfigError("a token is required: --token T or EDGE_FM_TOKEN")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    options = device_options(args)
    if args.data.is_dir():  # an image folder (ImageFolder layout), for an image-classification model
        data: Any = ImageDataset.from_folder(args.data, args.image_processor, limit=args.limit, holdout=args.holdout)
    elif is_prompt_file(args.data, data_format(args)):  # prompt/response records, for a causal-LM run
        records = read_prompts(args.data, data_format(args), limit=args.limit)
        data = PromptDataset(records, resolve_tokenizer_dir(args.tokenizer), holdout=args.holdout)
    else:
        rows = read_rows(args.data, data_format(args), limit=args.limit)
        data = TextDataset(rows, args.tokenizer, holdout=args.holdout)
    EdgeDevice(options, data, on_progress=step_display(sys.stderr)).run()
    return 0


def device_options(args: argparse.Namespace) -> DeviceOptions:
    """The :class:`~edge_sdk.client.DeviceOptions` of a ``join`` command line."""
    from edge_sdk.client._client import DeviceOptions

    return DeviceOptions(
        url=args.url,
        token=args.token,
        memory_budget=parse_size(args.memory_budget) if args.memory_budget is not None else None,
        profile_name=args.profile,
        ca_file=args.ca_file,
        threads=args.threads,
        probe=not args.no_probe,
        data_channel=not args.no_data_channel,
        deploy_dir=None if args.no_deploy else args.deploy_dir.expanduser().absolute(),
        backoff=Backoff(
            initial_s=args.retry_initial,
            max_s=max(args.retry_max, args.retry_initial),
            give_up_s=args.give_up_after,
        ),
        **({"device_id": args.device_id} if args.device_id else {}),
    )
