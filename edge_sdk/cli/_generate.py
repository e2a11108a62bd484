"""``edge-sdk generate``: greedy text generation with an exported decoder LLM, on ONNX Runtime, without torch.

    edge-sdk generate --model DIR [--max-new-tokens N] [--threads N] [--int8] [--json] "prompt"

The prompt is the argument (or stdin when it is ``-`` or absent). The text is streamed to stdout as the
tokens are produced, then a line on stderr gives the prompt's tokens, the prefill time and tokens per
second. ``--json`` prints nothing while generating and one JSON object at the end: ``{"model", "threads",
"load_ms", "text", "prompt_tokens", "token_ids", "stop", "prefill_ms", "decode_ms", "tokens_per_s",
"decode_tokens_per_s"}`` (``tokens_per_s``: new tokens per second from the prompt's start;
``decode_tokens_per_s``: tokens per second of the cached steps after the first token).

The fp32 graph is served by default (its tokens match torch's); ``--int8`` serves
``model_quantized.onnx`` when the folder has one. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from edge_sdk._errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "generate",
        help="generate text with an exported decoder LLM (ONNX Runtime, no torch)",
        description="Load an exported LLM folder (model.onnx / model_quantized.onnx with a key/value cache, "
        "config.json, tokenizer.json) and stream its greedy continuation of the prompt.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="exported LLM folder")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="stop after N tokens (64)")
    parser.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads")
    parser.add_argument("--int8", action="store_true", help="serve model_quantized.onnx when there is one")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (default or '-': stdin)")
    return parser


def run(args: argparse.Namespace) -> int:
    from edge_sdk.serving._generate import load_generator  # onnxruntime loads here, not when the CLI lists commands

    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if not prompt:
        raise ConfigError("no prompt: pass it as an argument or on stdin")
    started = time.perf_counter()
    generator = load_generator(args.model, threads=args.threads, prefer_quantized=args.int8)
    load_ms = (time.perf_counter() - started) * 1e3
    stream = generator.stream(prompt, max_new_tokens=args.max_new_tokens)
    for token in stream:
        if not args.json and token.text:
            sys.stdout.write(token.text)
            sys.stdout.flush()
    result = stream.result
    if args.json:
        doc = {"threads": generator.threads, "load_ms": load_ms, **result.to_dict()}
        print(json.dumps(doc, indent=2))
        return 0
    sys.stdout.write(stream.remainder + "\n")
    sys.stdout.flush()  # the text ends before the summary on stderr
    print(
        f"# {len(result.prompt_ids)} prompt tokens, prefill {result.prefill_ms:.0f} ms; {len(result.token_ids)}"
        f" new tokens at {result.tokens_per_s:.1f} tokens/s ({result.decode_tokens_per_s:.1f} after the first);"
        f" stop: {result.stop}; {generator.model_path.name}, loaded in {load_ms:.0f} ms",
        file=sys.stderr,
    )
    return 0
