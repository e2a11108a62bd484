"""Helpers for end-to-end tests: run configs, coordinator and device processes, log polling, certificates."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .models import SST2

TIMEOUT_S = 240.0  # bound on any single wait of an end-to-end test


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def data_slices(folder: Path, count: int, rows: int) -> list[Path]:
    """``count`` disjoint slices of the vendored SST-2 train set, ``rows`` examples each."""
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    paths = []
    for i in range(count):
        path = folder / f"train-{i}.tsv"
        path.write_text("\n".join([header, *body[i * rows : (i + 1) * rows]]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def write_config(
    folder: Path,
    *,
    devices: Mapping[str, str],
    model: str = "all-MiniLM-L6-v2",
    port: int = 0,
    rounds: int = 2,
    min_devices: int = 1,
    device_wait_s: float = 120,
    local_steps: int = 2,
    batch_size: int = 8,
    seq_len: int = 64,
    validation_rows: int = 32,
    tls: tuple[Path, Path] | None = None,
    levers: bool = True,
) -> Path:
    dev = folder / "dev.tsv"
    lines = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()
    dev.write_text("\n".join(lines[: validation_rows + 1]) + "\n", encoding="utf-8")
    tls_lines = f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n' if tls else ""
    device_lines = "".join(f'{name} = "{token}"\n' for name, token in devices.items())
    text = f"""
[model]
name = "{model}"

[federation]
rounds = {rounds}
min_devices = {min_devices}
device_wait_s = {device_wait_s}
round_deadline_s = 300

[training]
local_steps = {local_steps}
batch_size = {batch_size}
seq_len = {seq_len}
lr = 1e-4

[levers]
enabled = {"true" if levers else "false"}

[validation]
data = "dev.tsv"
limit = {validation_rows}

[server]
host = "127.0.0.1"
port = {port}
port_file = "port"
{tls_lines}
[devices]
{device_lines}
[run]
dir = "run"
"""
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


class Proc:
    """A child process whose stdout+stderr go to a log file that the test can poll."""

    def __init__(self, args: Sequence[str], log: Path, cwd: Path) -> None:
        self.log = log
        self.args = list(args)
        with log.open("ab") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=child_env())

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, needle: str, timeout: float = TIMEOUT_S, start: int = 0) -> int:
        """Poll the log until ``needle`` appears after offset ``start``; returns its offset."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.text().find(needle, start)
            if found >= 0:
                return found
            if self.popen.poll() is not None:
                found = self.text().find(needle, start)
                if found >= 0:
                    return found
                raise AssertionError(
                    f"{self.args[:4]} exited ({self.popen.returncode}) before logging {needle!r}:\n"
                    + self.text()[-4000:]
                )
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not logged within {timeout:.0f} s:\n" + self.text()[-4000:])

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.args[:4]} still running after {timeout:.0f} s:\n" + self.text()[-4000:]
            ) from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)


def coordinator(config: Path, log: Path, *, resume: bool = False) -> Proc:
    args = [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)]
    return Proc([*args, "--resume"] if resume else args, log, config.parent)


def device(
    url: str, token: str, data: Path, budget: str, log: Path, *extra: str, deploy_dir: Path | None = None
) -> Proc:
    """An ``edge-sdk join`` process; it refuses deploys unless ``deploy_dir`` is given (where it installs them)."""
    args = [
        sys.executable,
        "-m",
        "edge_sdk.cli",
        "join",
        url,
        "--token",
        token,
        "--data",
        str(data),
        "--memory-budget",
        budget,
        "--threads",
        "1",
        "--no-probe",
        "--retry-initial",
        "0.2",
        "--retry-max",
        "1",
        "--give-up-after",
        "180",
        # these runs test training unless asked; the demo's test covers deployment end to end
        *(["--deploy-dir", str(deploy_dir)] if deploy_dir is not None else ["--no-deploy"]),
        *extra,
    ]
    return Proc(args, log, data.parent)


def read_port(folder: Path, proc: Proc, timeout: float = TIMEOUT_S) -> int:
    proc.wait_for("listening on", timeout)
    return int((folder / "port").read_text().strip())


def self_signed_certificate(folder: Path) -> tuple[Path, Path] | None:
    """A certificate for localhost / 127.0.0.1 and its key (cryptography if installed, else openssl)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509  # type: ignore[import-not-found]
        from cryptography.hazmat.primitives import hashes, serialization  # type: ignore[import-not-found]
        from cryptography.hazmat.primitives.asymmetric import ec  # type: ignore[import-not-found]
        from cryptography.x509.oid import NameOID  # type: ignore[import-not-found]
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            return None
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key
