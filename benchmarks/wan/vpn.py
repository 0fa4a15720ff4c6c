"""The baseline: a real site-to-site OpenVPN 2.6 tunnel between site A and site B, through the hub.

Point-to-point over UDP with TLS: a throwaway CA and P-256 certificates made
with `cryptography`, `tls-crypt`, `data-ciphers AES-256-GCM`, `disable-dco`
(this kernel has no DCO module). Tunnel addresses 127.20.0.1 (A) and
127.20.0.2 (B); the UDP packets take the same emulated links as everything
else (A <-> hub <-> B). No name is ever resolved (numeric addresses only).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from benchmarks.wan.topology import A_ADDR, B_ADDR, NS_A, NS_B, VPN_A_ADDR, VPN_B_ADDR, WanLab, sh

PORT = 1194


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_pki(directory: Path) -> None:
    """ca.pem, site-a.pem/.key (TLS client), site-b.pem/.key (TLS server), tls-crypt.key."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("drwan benchmark CA"))
        .issuer_name(_name("drwan benchmark CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, usage in (("site-a", ExtendedKeyUsageOID.CLIENT_AUTH), ("site-b", ExtendedKeyUsageOID.SERVER_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True
            )  # digitalSignature, keyAgreement
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, directory / f"{name}.key")
    sh(["openvpn", "--genkey", "secret", str(directory / "tls-crypt.key")])


def config(directory: Path, site: str) -> Path:
    a = site == "a"
    local, remote = (A_ADDR, B_ADDR) if a else (B_ADDR, A_ADDR)
    here, there = (VPN_A_ADDR, VPN_B_ADDR) if a else (VPN_B_ADDR, VPN_A_ADDR)
    lines = [
        "dev tun",
        "proto udp",
        f"local {local}",
        f"lport {PORT}",
        f"remote {remote} {PORT}",
        f"ifconfig {here} {there}",
        "tls-client" if a else "tls-server",
        *(["remote-cert-tls server"] if a else ["dh none"]),
        f"ca {directory / 'ca.pem'}",
        f"cert {directory / f'site-{site}.pem'}",
        f"key {directory / f'site-{site}.key'}",
        f"tls-crypt {directory / 'tls-crypt.key'}",
        "data-ciphers AES-256-GCM",
        "disable-dco",
        "keepalive 5 30",
        "script-security 1",
        "verb 3",
        f"writepid {directory / f'openvpn-{site}.pid'}",
    ]
    path = directory / f"site-{site}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


class Vpn:
    """Start with `start()`, stop with `stop()`; `wait_up()` waits for both ends and a packet through."""

    def __init__(self, lab: WanLab, directory: Path) -> None:
        self.lab = lab
        self.directory = directory
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, site: str) -> str:
        path = self.directory / f"openvpn-{site}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 30.0) -> Vpn:
        make_pki(self.directory)
        for site, ns in (("b", NS_B), ("a", NS_A)):
            conf = config(self.directory, site)
            self.procs[site] = self.lab.popen(
                ns,
                ["openvpn", "--config", str(conf)],
                stdout=(self.directory / f"openvpn-{site}.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for site, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"openvpn at site {site} exited ({proc.returncode}):\n{self.log(site)[-3000:]}")
            if all("Initialization Sequence Completed" in self.log(s) for s in self.procs):
                return self
            time.sleep(0.2)
        raise TimeoutError("the VPN did not come up:\n" + "\n".join(self.log(s)[-2000:] for s in self.procs))

    def describe(self) -> dict[str, object]:
        lines = self.log("a").splitlines()
        cipher = next((line.split("Data Channel:")[-1].strip() for line in lines if "Data Channel:" in line), "")
        control = next((line.split("Control Channel:")[-1].strip() for line in lines if "Control Channel:" in line), "")
        version = sh(["openvpn", "--version"], check=False).stdout.splitlines()
        return {
            "software": version[0] if version else "openvpn",
            "mode": "point-to-point, UDP, TLS (P-256), tls-crypt, disable-dco",
            "data_channel": cipher,
            "control_channel": control,
            "tunnel": {"a": VPN_A_ADDR, "b": VPN_B_ADDR},
        }

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
