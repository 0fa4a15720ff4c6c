"""Servers for the cloudstore contract: moto's S3 server and the GCS emulator, as child processes.

Each runs on an ephemeral 127.0.0.1 port while this package's tests run (package scope:
a full ``pytest tests`` run does not keep them, and their data, until the end), is
started with a bounded wait, and is stopped (terminate, then kill) at teardown. They run as separate
processes rather than threads so that the memory tests measure only the client side.
A missing package fails the tests (a skipped store test would prove nothing).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay_demo.network import LocalRelayNetwork
from tests.support.ports import free_port, wait_for_port

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 5
S3_BUCKET = "relay-spill-test"
GCS_BUCKET = "relay-spill-test"


def require_modules(*modules: str) -> None:
    """Fail (never skip) when the packages behind ``modules`` are not installed: they are what is tested."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        message = f"not installed: {', '.join(missing)} (pip install -e '.[test]')"
        pytest.fail(f"the cloudstore tests need their servers and SDKs; {message}", pytrace=False)


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)


def start_server(
    name: str, command: Callable[[int], list[str]], log_dir: Path, probe_path: str = "/", attempts: int = 3
) -> ServerProcess:
    """Start ``command(port)`` until it answers HTTP on 127.0.0.1 (a few ports tried: free_port races)."""
    failures = []
    for attempt in range(attempts):
        port = free_port()
        log = log_dir / f"{name}-{attempt}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command(port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = ServerProcess(name, process, port, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if wait_for_port(port, timeout=0.5):
                try:
                    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        server.url + probe_path, timeout=5
                    ):
                        return server
                except OSError:
                    time.sleep(0.1)
        server.stop()
        failures.append(f"port {port}: exit code {process.poll()}; log:\n{log.read_text(errors='replace')[-2000:]}")
    raise RuntimeError(f"{name} did not start within {START_TIMEOUT_S} s:\n" + "\n".join(failures))


@pytest.fixture(scope="package")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """moto's S3 server (``python -m moto.server``) with the bucket ``S3_BUCKET``."""
    require_modules("moto.server", "flask", "boto3")
    import boto3
    from botocore.config import Config

    server = start_server(
        "moto",
        lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        tmp_path_factory.mktemp("moto"),
        probe_path="/moto-api/",
    )
    try:
        admin = boto3.client(
            "s3",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}),
        )
        admin.create_bucket(Bucket=S3_BUCKET)
        admin.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """gcp-storage-emulator, in memory, with the bucket ``GCS_BUCKET``."""
    require_modules("gcp_storage_emulator", "google.cloud.storage")
    server = start_server(
        "gcs-emulator",
        lambda port: [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            GCS_BUCKET,
            "--quiet",
        ],
        tmp_path_factory.mktemp("gcs"),
    )
    try:
        yield server
    finally:
        server.stop()


AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def moto_env(moto_server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    """Environment for a bridge whose store is moto: test credentials only, no AWS config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS, AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    return env


@pytest.fixture
def network_factory(tmp_path: Path) -> Iterator[Callable[..., LocalRelayNetwork]]:
    """``network_factory(spill_section, env)`` -> a started bridge (TLS) with that [spill]; stopped at teardown."""
    started: list[LocalRelayNetwork] = []

    def make(spill: dict[str, object], env: dict[str, str] | None = None) -> LocalRelayNetwork:
        net = LocalRelayNetwork(tmp_path / f"relay{len(started) or ''}", env=env, bridge_spill=spill).start()
        started.append(net)
        return net

    yield make
    for net in started:
        net.stop()
