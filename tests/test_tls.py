"""TLS with a self-signed certificate made in the test (``cryptography`` if installed, else ``openssl``)."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
import transformers
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint
from coordinator.serve._security import server_ssl_context

from ._federation import coordinator as coordinator_process
from ._federation import data_slices, device, read_port, self_signed_certificate, write_config
from .models import minilm_dir, tiny_vocab_bert_config
from .test_server import Device, coordinator, run


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    made = self_signed_certificate(tmp_path)
    if made is None:
        pytest.skip("neither the cryptography package nor the openssl command is available")
    return made


def test_tls_refuses_wrong_tokens_and_untrusted_servers(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    trusted = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with coordinator(tmp_path, ["a"], ssl_context=server_ssl_context(cert, key)) as (srv, _):
            url = f"wss://127.0.0.1:{srv.port}"
            with pytest.raises(InvalidStatus) as caught:
                async with connect(url, ssl=trusted, additional_headers={"Authorization": "Bearer nope-nope"}):
                    pass
            assert caught.value.response.status_code == 401
            with pytest.raises(ssl.SSLCertVerificationError):
                async with connect(url, additional_headers={"Authorization": "Bearer token-of-a"}):
                    pass
            async with connect(
                url, ssl=trusted, additional_headers={"Authorization": "Bearer token-of-a"}, compression=None
            ) as ws:
                await Device(ws).hello()

    run(main())


@pytest.mark.slow
def test_a_device_process_trains_over_tls(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    # A tiny BERT with MiniLM's vocabulary, so that the packaged tokenizer applies.
    model_dir = tmp_path / "tiny-bert"
    config = tiny_vocab_bert_config()
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir, safe_serialization=True)
    shutil.copy(minilm_dir() / "tokenizer.json", model_dir / "tokenizer.json")
    run_toml = write_config(
        tmp_path,
        devices={"pi": "token-of-pi-1234"},
        model=str(model_dir),
        rounds=1,
        local_steps=2,
        seq_len=32,
        tls=certificate,
    )
    server = coordinator_process(run_toml, tmp_path / "coordinator.log")
    (data,) = data_slices(tmp_path, 1, 32)
    procs = [server]
    try:
        port = read_port(tmp_path, server)
        assert "listening on wss://" in server.text()
        client = device(
            f"wss://127.0.0.1:{port}",
            "token-of-pi-1234",
            data,
            "1GB",
            tmp_path / "pi.log",
            "--ca-file",
            str(certificate[0]),
            "--tokenizer",
            str(model_dir),
        )
        procs.append(client)
        assert server.wait() == 0, server.text()[-4000:]
        assert client.wait() == 0, client.text()[-4000:]
    finally:
        for proc in procs:
            proc.kill()
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
    (entry,) = state.history
    assert [(d["device_id"], d["status"]) for d in entry["devices"]] == [("pi", "ok")]
    assert entry["bytes_in"] > 0 and entry["bytes_out"] > 0
