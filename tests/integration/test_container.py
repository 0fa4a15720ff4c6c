"""The bridge container image, built and run as a site would: `make wheelhouse`-style release, the
image from deploy/container/Containerfile (deploy/container/build.sh: a debootstrap base imported
locally, buildah --isolation chroot), run with podman (runc, cgroupfs) as a non-root user listening
on port 443 by capability, its state in a volume. Two routers (host processes) relay a C-ECHO and a
C-STORE through it, and the image's health check reports it healthy.

Needs root, podman, buildah, runc and debootstrap (Debian packages); without them the test skips, and
fails under CI=true. The base image is built once and kept (localhost/dicom-relay-base:bookworm).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.release import REPO, VERSION, build_wheelhouse, run
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
BRIDGE_ADDRESS = "127.43.0.1"  # a loopback address of its own, so that port 443 is free whatever else runs
CONTAINER = REPO / "deploy" / "container"
IMAGE = "localhost/dicom-relay-bridge:smoke-test"
PODMAN_ENV = {"CONTAINERS_CONF": str(CONTAINER / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if check:
        return run(["podman", *args], timeout=timeout, env=PODMAN_ENV)
    env = {**os.environ, **PODMAN_ENV}
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def bridge_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    missing = [tool for tool in ("podman", "buildah", "runc", "debootstrap") if shutil.which(tool) is None]
    problem = f"missing {' '.join(missing)} (apt-get install -y podman buildah runc debootstrap)" if missing else None
    if os.geteuid() != 0:
        problem = "building and running the image needs root"
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(problem)
        pytest.skip(problem)
    house = build_wheelhouse(tmp_path_factory.mktemp("release"))
    run([str(CONTAINER / "build.sh")], timeout=900, env={**PODMAN_ENV, "WHEELHOUSE": str(house), "IMAGE": IMAGE})
    yield IMAGE
    podman("rmi", "--force", IMAGE, check=False)


def test_bridge_container_relays_echo_and_store(
    bridge_image: str,
    tmp_path: Path,
    archive_factory: Callable[..., DemoArchive],
    ct_series: list[Path],
    ct_fingerprints: dict[str, str],
) -> None:
    # The routers' side: CA and certificates from `relay-bridge init` on the host (routers verify the
    # name "localhost", which the development certificate carries).
    net = LocalRelayNetwork(tmp_path / "net", bridge_host=BRIDGE_ADDRESS).start(bridge=False)
    # The bridge's volume: configuration, certificate, key; the database and audit are created inside.
    volume = tmp_path / "bridge-volume"
    volume.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(net.workdir / name, volume / name)
    (volume / "bridge.toml").write_text(
        f'[server]\nlisten = "{BRIDGE_ADDRESS}:443"\ntls_cert = "server.pem"\ntls_key = "server.key"\n\n'
        '[storage]\ndatabase = "bridge.sqlite3"\n\n[metrics]\nlisten = ""\n'
    )
    for path in [volume, *volume.iterdir()]:
        os.chown(path, 999, 999)  # the image's dicom-relay user
    volume.chmod(0o750)

    name = f"relay-bridge-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "--detach", "--name", name, "--network", "host", "--health-interval", "disable",
        "--volume", f"{volume}:/var/lib/dicom-relay", bridge_image,
    )  # fmt: skip
    try:

        def bridge_admin(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            cmd = ["exec", "-i", name, "/opt/dicom-relay/bin/relay-bridge", "-c", "/var/lib/dicom-relay/bridge.toml"]
            return podman(*cmd, *args, check=False)

        def healthy() -> bool:
            return podman("healthcheck", "run", name, check=False).returncode == 0

        assert wait_until(healthy, timeout=60, what="the container's health check"), podman("logs", name).stderr
        status = json.loads(bridge_admin("status", "--json").stdout)
        assert status["running"] and status["version"] == VERSION and status["listen"] == f"{BRIDGE_ADDRESS}:443"
        # Non-root, yet listening on 443: the capability, nothing else.
        top = podman("top", name, "user", "args").stdout
        assert "dicom-relay" in top and "root" not in top, top
        assert (volume / "bridge.sqlite3").stat().st_uid == 999  # state in the volume, owned by the service user

        net.bridge_port = 443
        net.bridge_admin = bridge_admin  # type: ignore[method-assign]  # accounts are made inside the container
        archive = archive_factory("ARCHIVE_B")
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
        net.wait_connected()

        ae = AE(ae_title="WS_A")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(HOST, net.sites["site-a"].port, ae_title="ARCHIVE_B")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0
            for path in ct_series:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        finally:
            assoc.release()
        assert archive.fingerprints() == ct_fingerprints  # byte for byte through the containerised bridge
        # The bridge's own record (its status file is rewritten every second): one association relayed.
        wait_until(
            lambda: json.loads(bridge_admin("status", "--json").stdout)["recent"]["counts"].get("relayed") == 1,
            what="the relayed association in the bridge's status",
        )
    finally:
        logs = podman("logs", name, check=False)
        podman("rm", "--force", "--time", "5", name, check=False)
        net.stop()
        if logs.returncode == 0:
            (tmp_path / "bridge-container.log").write_text(logs.stdout + logs.stderr)
