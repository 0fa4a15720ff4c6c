"""A whole relay network on this machine: one bridge and several routers as real processes.

Used by `make demo`, the integration tests and the benchmarks, so that all of
them exercise the same command-line entry points a hospital runs. Everything
listens on 127.0.0.1 with ephemeral ports; TLS uses a fresh development CA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Shared:
    ae_title: str
    host: str
    port: int
    share_with: list[str] = field(default_factory=lambda: ["*"])
    services: list[str] | None = None  # service groups (None: the router's default)
    grants: dict[str, list[str]] = field(default_factory=dict)  # site -> service groups
    patient_issuer: str = ""  # set: patient_identity = true with this partner issuer (docs/patient-identity.md)
    accelerate: bool = False  # takes accelerated transfers (relay_router.accel)

    def granted_to(self, site: str) -> bool:
        """Whether `site` may use any service (the bridge lists the device to it only then)."""
        if "*" not in self.share_with and site not in self.share_with:
            return False
        if site in self.grants:
            return bool(self.grants[site])
        return self.services is None or bool(self.services)


@dataclass
class Remote:
    ae_title: str
    site: str
    remote_ae_title: str | None = None
    patient_issuer: str = ""  # set: patient_identity = true with this partner issuer (docs/patient-identity.md)
    accelerate: bool = False  # accelerated storage route (relay_router.accel)


@dataclass
class Site:
    name: str
    shared: list[Shared] = field(default_factory=list)
    remote: list[Remote] = field(default_factory=list)
    password: str = ""
    enrollment_token: str = ""
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    extra_dicom: dict[str, object] = field(default_factory=dict)
    extra_bridge: dict[str, object] = field(default_factory=dict)
    # [metrics] listen for this router ("127.0.0.1:0" picks a free port); None: the router's default.
    metrics_listen: str | None = None
    # [identity] keys (patient identity, docs/patient-identity.md); empty: no [identity] section.
    identity: dict[str, object] = field(default_factory=dict)
    # [accelerate] keys (relay_router.accel), written when not empty.
    extra_accelerate: dict[str, object] = field(default_factory=dict)


def _identity_keys(issuer: str) -> list[str]:
    return ["patient_identity = true", f"patient_issuer = {_toml_value(issuer)}"] if issuer else []


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (e.g. [accelerate] commitment_requester entries)
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _wait_ready(ready: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            return int(json.loads(ready.read_text())["port"])
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{proc.args} was not ready within {timeout} s; log:\n{log.read_text()[-3000:]}")


class LocalRelayNetwork:
    """Start with `start()`, add sites with `add_site()`, stop with `stop()` (or use as a context manager)."""

    def __init__(
        self,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        bridge_spill: dict[str, object] | None = None,
        bridge_host: str = "127.0.0.1",
        command_prefix: Mapping[str, Sequence[str]] | None = None,
        approve_peers: bool = True,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sites: dict[str, Site] = {}
        self.bridge: subprocess.Popen[bytes] | None = None
        self.bridge_port: int | None = None
        self.env = {**os.environ, **(env or {})}
        self.python = sys.executable
        # Keys of the bridge's [spill] section (cloud spill store), written into bridge.toml by start().
        self.bridge_spill = bridge_spill
        # Where the bridge listens and the routers reach it (the WAN benchmark puts it in another namespace).
        self.bridge_host = bridge_host
        # Per process ("bridge" or a site name): words put before its command, e.g. ["ip", "netns", "exec", "ns"].
        self.command_prefix = {k: list(v) for k, v in (command_prefix or {}).items()}
        # Play the operators who compare fingerprints by telephone: each new site's identity is made
        # before its router starts, and every pair of sites approves each other's key (what
        # `relay-router peers approve` writes). False: sites stay unapproved, as on a real network
        # until the operators act (the tests of that refusal).
        self.approve_peers = approve_peers
        self.fingerprints: dict[str, str] = {}

    # -- bridge --------------------------------------------------------------
    def _bridge_cmd(self, *args: str) -> list[str]:
        return [self.python, "-m", "relay_bridge.cli", "--config", str(self.workdir / "bridge.toml"), *args]

    def start(self, *, bridge: bool = True) -> LocalRelayNetwork:
        """Create the CA and bridge.toml, then start the bridge (unless the caller runs its own)."""
        if not (self.workdir / "bridge.toml").exists():
            subprocess.run(
                [self.python, "-m", "relay_bridge.cli", "init", "--dir", str(self.workdir), "--listen", "127.0.0.1:0"],
                check=True,
                capture_output=True,
                env=self.env,
            )
            if self.bridge_spill:
                with (self.workdir / "bridge.toml").open("a") as toml:
                    toml.write(
                        "\n[spill]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.bridge_spill.items())
                    )
        if bridge:
            self.start_bridge()
        return self

    def start_bridge(self) -> None:
        ready = self.workdir / "bridge.ready"
        ready.unlink(missing_ok=True)
        listen = f"{self.bridge_host}:{self.bridge_port or 0}"
        log = self.workdir / "bridge.log"
        self.bridge = subprocess.Popen(
            self.command_prefix.get("bridge", [])
            + self._bridge_cmd("serve", "--listen", listen, "--ready-file", str(ready)),
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            env=self.env,
        )
        self.bridge_port = _wait_ready(ready, self.bridge, log)

    def bridge_admin(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._bridge_cmd(*args), input=stdin, capture_output=True, text=True, env=self.env, timeout=60
        )

    # -- routers -------------------------------------------------------------
    def add_site(
        self,
        name: str,
        *,
        shared: list[Shared] = (),
        remote: list[Remote] = (),  # type: ignore[assignment]
        start: bool = True,
        metrics_listen: str | None = None,
        identity: dict[str, object] | None = None,
        accelerate: Mapping[str, object] | None = None,  # the [accelerate] section's keys
        **dicom: object,
    ) -> Site:
        result = self.bridge_admin("router", "add", name, "--json")
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        account = json.loads(result.stdout)
        site = Site(name, list(shared), list(remote), password=account["password"], extra_dicom=dict(dicom))
        site.enrollment_token = account["enrollment_token"]
        site.metrics_listen = metrics_listen
        site.identity = dict(identity or {})
        site.extra_accelerate = dict(accelerate or {})
        self.sites[name] = site
        self.write_router_config(site)
        if self.approve_peers:
            self.approve_each_other(name)
        if start:
            self.start_router(name)
        return site

    def state_dir(self, name: str) -> Path:
        return self.workdir / f"state-{name}"

    def identity_fingerprint(self, name: str) -> str:
        """The site's identity fingerprint (`relay-router fingerprint`), creating the identity if needed."""
        from relay_router.seal import Identity

        if name not in self.fingerprints:
            self.fingerprints[name] = Identity.load_or_create(self.state_dir(name) / "identity.key").public.fingerprint
        return self.fingerprints[name]

    def approve(self, at: str, site: str, fingerprint: str | None = None) -> str:
        """`relay-router peers approve SITE` on router `at` (running or not: it reads the file at its next use)."""
        from relay_router.approvals import ApprovalStore

        return ApprovalStore(self.state_dir(at)).approve(site, fingerprint or self.identity_fingerprint(site))

    def approve_each_other(self, name: str) -> None:
        for other in self.sites:
            if other != name:
                self.approve(other, name)
                self.approve(name, other)

    def router_config_path(self, name: str) -> Path:
        return self.workdir / f"router-{name}.toml"

    def write_router_config(self, site: Site) -> Path:
        lines = [
            "[router]",
            f"name = {_toml_value(site.name)}",
            f"state_dir = {_toml_value('state-' + site.name)}",
            "",
            "[audit]",
            f"file = {_toml_value('audit-' + site.name + '.jsonl')}",
            "",
            *([] if site.metrics_listen is None else ["[metrics]", f"listen = {_toml_value(site.metrics_listen)}", ""]),
            "[bridge]",
            f'address = "{self.bridge_host}:{self.bridge_port}"',
            'ca_file = "ca.pem"',
            'server_name = "localhost"',
            f"password = {_toml_value(site.password)}",
            "reconnect_min_s = 0.2",
            "reconnect_max_s = 2.0",
            *(f"{k} = {_toml_value(v)}" for k, v in site.extra_bridge.items()),
            "",
            "[dicom]",
            f'listen = "127.0.0.1:{site.port or 0}"',
        ]
        lines += [f"{k} = {_toml_value(v)}" for k, v in site.extra_dicom.items()]
        for d in site.shared:
            lines += [
                "",
                "[[shared]]",
                f"ae_title = {_toml_value(d.ae_title)}",
                f"host = {_toml_value(d.host)}",
                f"port = {d.port}",
                f"share_with = {_toml_value(d.share_with)}",
                *([] if d.services is None else [f"services = {_toml_value(d.services)}"]),
                *_identity_keys(d.patient_issuer),
            ]
            if d.accelerate:
                lines.append("accelerate = true")
            for grant_site, groups in d.grants.items():
                lines += ["[[shared.grant]]", f"site = {_toml_value(grant_site)}", f"services = {_toml_value(groups)}"]
        for r in site.remote:
            lines += ["", "[[remote]]", f"ae_title = {_toml_value(r.ae_title)}", f"site = {_toml_value(r.site)}"]
            if r.remote_ae_title:
                lines.append(f"remote_ae_title = {_toml_value(r.remote_ae_title)}")
            lines += _identity_keys(r.patient_issuer)
            if r.accelerate:
                lines.append("accelerate = true")
        if site.identity:
            flat = {k: v for k, v in site.identity.items() if k != "source"}
            lines += ["", "[identity]", *(f"{k} = {_toml_value(v)}" for k, v in flat.items())]
            for source in site.identity.get("source", []):  # type: ignore[attr-defined]
                lines += ["", "[[identity.source]]", *(f"{k} = {_toml_value(v)}" for k, v in source.items())]
        if site.extra_accelerate:
            lines += ["", "[accelerate]", *(f"{k} = {_toml_value(v)}" for k, v in site.extra_accelerate.items())]
        path = self.router_config_path(site.name)
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_router(self, name: str) -> int:
        site = self.sites[name]
        ready = self.workdir / f"router-{name}.ready"
        ready.unlink(missing_ok=True)
        log = self.workdir / f"router-{name}.log"
        site.process = subprocess.Popen(
            [
                *self.command_prefix.get(name, []),
                self.python,
                "-m",
                "relay_router.cli",
                "--config",
                str(self.router_config_path(name)),
                "serve",
                "--ready-file",
                str(ready),
                "--status-file",
                str(self.status_path(name)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            env=self.env,
        )
        site.port = _wait_ready(ready, site.process, log)
        # Keep the port across restarts: local archives are configured with it.
        self.write_router_config(site)
        return site.port

    def status_path(self, name: str) -> Path:
        return self.workdir / f"router-{name}.status.json"

    def status(self, name: str) -> dict[str, object]:
        try:
            return json.loads(self.status_path(name).read_text())
        except (OSError, ValueError):
            return {}

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Wait until every running router is signed on and sees every route it is configured with online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._site_ready(n) for n, s in self.sites.items() if s.process and s.process.poll() is None):
                return
            time.sleep(0.1)
        raise TimeoutError(
            "routers did not come up:\n"
            + "\n".join(f"{n}: {self.status(n)}\n{self.log(n)[-1500:]}" for n in self.sites)
        )

    def _site_ready(self, name: str) -> bool:
        status = self.status(name)
        if not status.get("connected"):
            return False
        online = {(d["site"], d["ae_title"]) for d in status.get("directory", []) if d["online"]}  # type: ignore[union-attr, index]
        return self._expected_online(name) <= online

    def _expected_online(self, name: str) -> set[tuple[str, str]]:
        """Remote devices `name` is configured for that their running site really shares with it."""
        expected = set()
        for remote in self.sites[name].remote:
            owner = self.sites.get(remote.site)
            if owner is None or owner.process is None or owner.process.poll() is not None:
                continue
            title = remote.remote_ae_title or remote.ae_title
            if any(d.ae_title == title and d.granted_to(name) for d in owner.shared):
                expected.add((remote.site, title))
        return expected

    def log(self, name: str) -> str:
        path = self.workdir / (f"router-{name}.log" if name != "bridge" else "bridge.log")
        return path.read_text(errors="replace") if path.exists() else ""

    # -- stopping ------------------------------------------------------------
    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None, *, kill: bool = False, timeout: float = 15.0) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_router(self, name: str, *, kill: bool = False) -> None:
        self._stop(self.sites[name].process, kill=kill)

    def stop_bridge(self, *, kill: bool = False) -> None:
        self._stop(self.bridge, kill=kill)

    def stop(self) -> None:
        for name in self.sites:
            self.stop_router(name)
        self.stop_bridge()

    def __enter__(self) -> LocalRelayNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
