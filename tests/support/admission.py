"""Helpers for the router admission tests: router.toml sections LocalRelayNetwork does not write.

`AdmissionNetwork` appends raw TOML (`[[local]]`, `[[pin]]`) to a site's router.toml, so tests
run the same `relay-router serve` a hospital runs, with the keys under test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from relay_demo.network import LocalRelayNetwork, Site


class AdmissionNetwork(LocalRelayNetwork):
    """A LocalRelayNetwork whose router.toml files end with `extra_toml[site]`."""

    def __init__(self, workdir: Path, **kwargs: object) -> None:
        super().__init__(workdir, **kwargs)  # type: ignore[arg-type]
        self.extra_toml: dict[str, str] = {}

    def write_router_config(self, site: Site) -> Path:
        path = super().write_router_config(site)
        extra = self.extra_toml.get(site.name)
        if extra:
            path.write_text(path.read_text() + "\n" + extra.strip() + "\n")
        return path

    def fingerprint(self, name: str) -> str:
        """The site's identity fingerprint, as `relay-router fingerprint` prints it for peers to pin."""
        out = subprocess.run(
            [self.python, "-m", "relay_router.cli", "--config", str(self.router_config_path(name)), "fingerprint"],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
            cwd=self.workdir,
        ).stdout.strip()
        assert len(out) == 64, out
        return out

    def audit_events(self, name: str) -> list[dict[str, object]]:
        path = self.workdir / f"audit-{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def local_entries(*entries: tuple[str, list[str]]) -> str:
    """`[[local]]` tables for (AE title, addresses)."""
    lines: list[str] = []
    for title, addresses in entries:
        lines += ["[[local]]", f"ae_title = {json.dumps(title)}"]
        if addresses:
            lines.append(f"addresses = {json.dumps(addresses)}")
        lines.append("")
    return "\n".join(lines)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
