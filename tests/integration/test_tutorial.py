"""The README's tutorial ("Connect two hospitals in five minutes"), run as a reader would run it.

Every fenced block of the tutorial is preceded by an HTML comment that says what to do with it
(invisible on GitHub):

    <!-- tutorial: run on=HOST[,HOST] [stdin=password] -->   run each command line, in order, on each host
    <!-- tutorial: file on=HOST path=PATH -->                  write the block to PATH on HOST
    <!-- tutorial: append on=HOST[,HOST] path=PATH -->         append it (the [[pin]] block; see PIN below)
    <!-- tutorial: output of="router add" -->                  an example of what `router add` prints
    <!-- tutorial: skip reason="..." -->                       not run (installation)

A `run` line ending in `serve` starts a daemon in the background; the test then waits until the
same command with `status` instead of `serve` exits 0 (the daemon serves; a router is signed on).
Any other line runs with `bash -e -o pipefail` and must exit 0. The programs are the real ones:
`relay-bridge` and `relay-router` of this virtualenv, linked into a directory first on `PATH` as the
README links them into /usr/local/bin (the virtualenv's bin directory itself is not on `PATH`: it
holds pynetdicom's echoscu/findscu/movescu, which would hide DCMTK's), Debian's `Orthanc`, and
DCMTK's `echoscu`, `findscu` and `movescu`.

All five hosts live on this machine. What differs from what a reader types is only this:

    /etc/dicom-relay        -> <tmp>/<host>/etc/dicom-relay (each host has its own tree; commands
                               run in <tmp>/<host>/home)
    bridge.example.org      -> localhost (the name is in the bridge's certificate, resolves to 127.0.0.1)
    10.a.b.c                -> 127.a.b.c (the LAN addresses of the tutorial, on the loopback interface)
    0.0.0.0 (listen)        -> the host's own address (bridge 127.0.0.1, routers 127.1.0.5, 127.2.0.5)
    ports 443, 11112, 11113, 4242 -> ephemeral ports from tests.support.ports.free_port, and the
    metrics ports 9464, 9465 -> one ephemeral port per host (both routers listen on 127.0.0.1 there)
    the example token, password, fingerprint placeholder and study UID (1.2.3.4)
                            -> the values the programs really printed earlier in the tutorial

What the tutorial leaves to the operator in prose, the test does between blocks: copying `ca.pem`
from the bridge to each router host, pasting each hospital's password (standard input of the
`stdin=password` block), reading each fingerprint to the other site (the [[pin]] block, mirrored for
hospital B), merging `pacs-config`'s output into Orthanc's configuration and restarting Orthanc.
Hospital B's archive holds a five-image CT study before the tutorial starts.

The test then checks what the tutorial promises: C-ECHO succeeds across sites, C-FIND lists the
study, C-MOVE delivers every image to the workstation with identical content, the status commands
show the sites signed on and the links up, the audit trails exist next to the configuration files,
and what the prose says commands print (`enroll`, `pacs-config`, `router add`, an unknown title's
rejection, `share list`) is what they print. A README command that is wrong fails the test: every
line really runs and must exit 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from tests.support.dcmtk import missing_tools
from tests.support.orthanc import OrthancProcess, orthanc_binary
from tests.support.ports import free_port
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Connect two hospitals in five minutes"
BIN = Path(sys.executable).parent  # relay-bridge and relay-router of this virtualenv

HOSTS = {  # tutorial host -> its address here (the tutorial's 10.a.b.c -> 127.a.b.c)
    "bridge": "127.0.0.1",
    "hospital-a": "127.1.0.5",
    "ws-a": "127.1.0.31",
    "hospital-b": "127.2.0.5",
}
SITES = ("hospital-a", "hospital-b")
EXAMPLE_PASSWORD = "s1ylrNhxAaS3j16ve0GyUQAY"
EXAMPLE_TOKEN = "4f2a5cc618b77993d44e94167edbca93c5bc7597c3016af7bb4a184a63e1484c"
EXAMPLE_STUDY = "1.2.3.4"
PIN = re.compile(r'fingerprint = "<[^">]*>"')
MARK = re.compile(r"<!-- tutorial: (?P<kind>\w[\w-]*)(?P<attrs>[^>]*?)-->\n```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
FENCE = re.compile(r"^```", re.M)


@dataclass(frozen=True)
class Block:
    kind: str
    attrs: dict[str, str]
    lang: str
    body: str

    @property
    def hosts(self) -> list[str]:
        return self.attrs.get("on", "").split(",") if self.attrs.get("on") else []


def tutorial_text() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def tutorial_blocks() -> list[Block]:
    return [
        Block(m["kind"], dict(a.split("=", 1) for a in shlex.split(m["attrs"])), m["lang"], m["body"])
        for m in MARK.finditer(tutorial_text())
    ]


def logical_lines(body: str) -> list[str]:
    """Shell command lines, backslash continuations joined, comments and blank lines dropped."""
    return [
        line for line in body.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_block_of_the_tutorial_is_executed_or_explicitly_skipped() -> None:
    text = tutorial_text()
    fences = len(FENCE.findall(text))
    blocks = tutorial_blocks()
    assert fences == 2 * len(blocks), "a fenced block in the README tutorial has no <!-- tutorial: ... --> mark"
    kinds = {b.kind for b in blocks}
    assert kinds <= {"run", "file", "append", "output", "skip"}, kinds
    assert [b.kind for b in blocks].count("skip") == 1  # the installation, only
    for block in blocks:
        assert set(block.hosts) <= set(HOSTS), block.hosts
        assert block.kind in ("skip", "output") or block.hosts, block
    commands = [line for b in blocks if b.kind == "run" for line in logical_lines(b.body)]
    assert any(line.endswith(" serve") for line in commands) and any(c.startswith("movescu") for c in commands)


# -- the run ------------------------------------------------------------------------------


@dataclass
class Tutorial:
    root: Path
    orthanc: OrthancProcess
    ports: dict[str, int]
    env: dict[str, str]
    passwords: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    study_uid: str | None = None
    outputs: list[tuple[str, str, str, str]] = field(default_factory=list)  # (host, README command, stdout, stderr)
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def tree(self, host: str) -> Path:
        return self.root / host / "etc" / "dicom-relay"

    def home(self, host: str) -> Path:
        path = self.root / host / "home"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def localize(self, text: str, host: str) -> str:
        """The README's text as it must read on this machine (see the module docstring)."""
        text = text.replace("/etc/dicom-relay", str(self.tree(host)))
        text = text.replace("bridge.example.org", "localhost")
        text = text.replace("0.0.0.0", HOSTS[host])
        text = re.sub(r"\b10\.(\d+)\.(\d+)\.(\d+)\b", r"127.\1.\2.\3", text)
        text = re.sub(r"\b(443|11112|11113|4242)\b", lambda m: str(self.ports[m[1]]), text)
        text = re.sub(r"\b(9464|9465)\b", lambda m: str(self.ports[f"{host}:metrics"]), text)
        if host in self.tokens:
            text = text.replace(EXAMPLE_TOKEN, self.tokens[host])
        if self.study_uid:
            text = text.replace(f"StudyInstanceUID={EXAMPLE_STUDY}", f"StudyInstanceUID={self.study_uid}")
        return text

    # -- what the operator does between blocks --

    def copy_ca(self, host: str) -> None:
        """'Copy /etc/dicom-relay/ca.pem to /etc/dicom-relay/ca.pem on both router hosts'."""
        target = self.tree(host)
        target.mkdir(parents=True, exist_ok=True)
        if not (target / "ca.pem").exists():
            shutil.copy(self.tree("bridge") / "ca.pem", target / "ca.pem")

    def harvest(self, host: str, command: str, output: str) -> None:
        """Remember what a reader would note down from a command's output."""
        words = shlex.split(command)
        if words[:1] == ["relay-bridge"] and words[-3:-1] == ["router", "add"]:
            fields = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
            self.passwords[words[-1]] = fields["password"].strip()
            self.tokens[words[-1]] = fields["enrollment token"].strip()
        elif words[-1:] == ["fingerprint"]:
            value = output.strip()
            assert re.fullmatch(r"[0-9a-f]{64}", value), output
            self.fingerprints[host] = value
        elif "pacs-config" in words:
            modalities = json.loads(output)["DicomModalities"]
            # 'merge it into Orthanc's DicomModalities and restart Orthanc'
            self.orthanc.stop()
            self.orthanc.modalities.update({name: tuple(entry) for name, entry in modalities.items()})
            self.orthanc.start()
        elif words[:1] == ["findscu"]:
            found = re.findall(r"\(0020,000d\) UI \[([0-9.]+)\]", output, re.I)
            assert found, f"findscu printed no StudyInstanceUID:\n{output}"
            self.study_uid = found[0]

    # -- the blocks --

    def run(self, block: Block) -> None:
        for host in block.hosts:
            if host in SITES:
                self.copy_ca(host)
            for line in logical_lines(block.body):
                command = self.localize(line, host)
                if shlex.split(line)[-1] == "serve":
                    self.start_daemon(host, line, command)
                    continue
                stdin = self.passwords[host] + "\n" if block.attrs.get("stdin") == "password" else None
                result = self.shell(host, command, stdin)
                assert result.returncode == 0, (
                    f"on {host}: {line}\n-> exit {result.returncode}\n{result.stdout}{result.stderr}"
                )
                self.outputs.append((host, line, result.stdout, result.stderr))
                # DCMTK logs to stderr; the relay programs print what to note down on stdout.
                self.harvest(host, line, result.stdout + result.stderr if line.startswith("findscu") else result.stdout)

    def shell(self, host: str, command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=self.home(host),
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def rerun(self, host: str, line: str) -> str:
        """A README command run again later (a reader would, to see a map refreshed once a second)."""
        result = self.shell(host, self.localize(line, host))
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def start_daemon(self, host: str, line: str, command: str) -> None:
        log = (self.root / host / f"{shlex.split(line)[0]}.log").open("ab")
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=self.home(host), env=self.env, stdout=log, stderr=log
        )
        log.close()
        self.daemons.append(proc)
        status = command[: -len("serve")] + "status"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (
                f"on {host}: {line} exited with {proc.returncode}:\n{self.daemon_log(host, line)}"
            )
            answer = subprocess.run(["bash", "-c", status], env=self.env, capture_output=True, text=True, timeout=30)
            if answer.returncode == 0:
                return
            assert time.monotonic() < deadline, (
                f"on {host}: {line} not ready:\n{answer.stdout}\n{self.daemon_log(host, line)}"
            )
            time.sleep(0.2)

    def daemon_log(self, host: str, line: str) -> str:
        return (self.root / host / f"{shlex.split(line)[0]}.log").read_text(errors="replace")[-4000:]

    def write(self, block: Block, *, append: bool) -> None:
        for host in block.hosts:
            text = self.localize(block.body, host)
            if append:  # the [[pin]] block: each site pins the other, with the fingerprint it was read
                peer = next(s for s in SITES if s != host)
                text = text.replace('"hospital-b"', f'"{peer}"')
                text, count = PIN.subn(f'fingerprint = "{self.fingerprints[peer]}"', text)
                assert count == 1, block.body
            path = Path(self.localize(block.attrs["path"], host))
            assert path.parent.is_dir(), f"{path.parent} does not exist on {host} when the README writes {path.name}"
            with path.open("a" if append else "w") as out:
                out.write(("\n" if append else "") + text)

    def check_example_output(self, block: Block) -> None:
        """The example output shows the same lines, in the same order, as the real one."""
        labels = [line.split(":", 1)[0] for line in block.body.splitlines() if line.strip()]
        shown = [out for _, cmd, out, _ in self.outputs if block.attrs["of"] in cmd]
        assert shown, block.attrs
        for out in shown:
            assert [line.split(":", 1)[0] for line in out.splitlines() if line.strip()] == labels, out
        assert EXAMPLE_PASSWORD in block.body and EXAMPLE_TOKEN in block.body
        assert all(len(t) == len(EXAMPLE_TOKEN) for t in self.tokens.values())

    def stop(self) -> None:
        for proc in reversed(self.daemons):  # routers first, then the bridge
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def tutorial(tmp_path: Path) -> Iterator[Tutorial]:
    missing = [] if orthanc_binary() else ["Orthanc"]
    missing += missing_tools(("echoscu", "findscu", "movescu"))
    missing += [name for name in ("relay-bridge", "relay-router") if not (BIN / name).exists()]
    assert not missing, f"the tutorial needs: {', '.join(missing)} (apt-get install -y orthanc dcmtk; pip install -e .)"
    ports = {name: free_port() for name in ("443", "11112", "11113", "4242", *(f"{h}:metrics" for h in HOSTS))}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    local_bin = tmp_path / "usr-local-bin"  # ln -s /opt/dicom-relay/bin/relay-bridge ... /usr/local/bin/
    local_bin.mkdir()
    for name in ("relay-bridge", "relay-router"):
        (local_bin / name).symlink_to(BIN / name)
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    env["PATH"] = os.pathsep.join([str(local_bin), *path])
    orthanc = OrthancProcess(tmp_path / "orthanc", aet="ORTHANC", dicom_port=ports["4242"])
    (tmp_path / "orthanc").mkdir()
    run = Tutorial(tmp_path, orthanc, ports, env)
    try:
        yield run
    finally:
        run.stop()
        orthanc.stop()


def test_the_readme_tutorial_connects_two_sites(tutorial: Tutorial, tmp_path: Path) -> None:
    # Hospital B's archive: Debian's default title and Orthanc's defaults (no DicomAlwaysAllowFind/Move),
    # already holding a study.
    originals = write_series(generate_ct_series(5), tmp_path / "study")
    tutorial.orthanc.start()
    tutorial.orthanc.upload_many(originals)
    expected_study = str(pydicom.dcmread(originals[0]).StudyInstanceUID)

    for block in tutorial_blocks():
        if block.kind == "run":
            tutorial.run(block)
        elif block.kind in ("file", "append"):
            tutorial.write(block, append=block.kind == "append")
        elif block.kind == "output":
            tutorial.check_example_output(block)

    # What the tutorial promises.
    by_command = {(host, cmd.split()[0]): out + err for host, cmd, out, err in tutorial.outputs}
    statuses = {host: cmd for host, cmd, _, _ in tutorial.outputs if cmd.endswith(" status")}
    assert set(statuses) == {"hospital-a", "bridge"}
    wait_until(
        lambda: (
            "PACS_B            -> ORTHANC at hospital-b           online"
            in tutorial.rerun("hospital-a", statuses["hospital-a"])
        ),
        what="PACS_B online in hospital A's status",
    )
    links = re.compile(r"hospital-a -> hospital-b +ORTHANC +up\s.*hospital-b -> hospital-a +WS_A +up", re.S)
    wait_until(lambda: links.search(tutorial.rerun("bridge", statuses["bridge"])), what="both links up on the map")
    # What the README says these commands print.
    prose = tutorial_text()
    for host, cmd, out, _ in tutorial.outputs:
        if " enroll " in cmd:
            assert out.startswith(f"enrolled {host}; identity fingerprint {tutorial.fingerprints[host]}"), out
            assert "`enrolled hospital-a; identity fingerprint " in prose
        if "pacs-config" in cmd:
            claimed = re.search(r"This prints `(\{.*?\})`", prose)
            assert claimed and json.loads(out) == json.loads(tutorial.localize(claimed[1], host)), out
    echoed = next(out for host, cmd, out, _ in tutorial.outputs if cmd.endswith("devices --echo"))
    assert re.search(r"PACS_B +hospital-b +ORTHANC +online +ok, \d+ ms", echoed), echoed
    assert "Received Echo Response (Success)" in by_command[("ws-a", "echoscu")]
    # What the README states in prose after step 9: unknown called and calling titles are rejected; share list.
    echo = next(cmd for host, cmd, _, _ in tutorial.outputs if cmd.startswith("echoscu"))
    nope = tutorial.shell("ws-a", tutorial.localize(echo.replace("-aec PACS_B", "-aec NOPE"), "ws-a"))
    assert nope.returncode != 0 and "Called AE Title Not Recognized" in nope.stdout + nope.stderr, nope.stderr
    nobody = tutorial.shell("ws-a", tutorial.localize(echo.replace("-aet WS_A", "-aet NOBODY"), "ws-a"))
    assert nobody.returncode != 0 and "Calling AE Title Not Recognized" in nobody.stdout + nobody.stderr, nobody.stderr
    shares = tutorial.rerun("bridge", "relay-bridge -c /etc/dicom-relay/bridge.toml share list")
    assert re.search(r"hospital-b +ORTHANC +shared with: hospital-a", shares), shares
    assert tutorial.study_uid == expected_study
    assert "Received Final Move Response (Success)" in by_command[("ws-a", "movescu")], by_command[("ws-a", "movescu")]
    received = sorted((tutorial.home("ws-a") / "received").iterdir())
    assert len(received) == len(originals)
    assert fingerprints(received) == fingerprints(originals)  # pixel data, byte for byte, by SOP Instance UID
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, originals)}
    for path in received:
        ds = pydicom.dcmread(path)
        assert ds == sent[str(ds.SOPInstanceUID)]  # every element equal, not only the pixels
    for site in SITES:
        assert (tutorial.tree(site) / "state" / "identity.key").stat().st_mode & 0o777 == 0o600
        pins = (tutorial.tree(site) / "router.toml").read_text()
        assert tutorial.fingerprints[next(s for s in SITES if s != site)] in pins
    # The audit trails the README promises, next to each configuration file.
    for host in ("bridge", *SITES):
        events = [json.loads(line) for line in (tutorial.tree(host) / "audit.jsonl").read_text().splitlines()]
        assert events, host


def test_a_wrong_command_in_the_tutorial_fails_the_run(tutorial: Tutorial) -> None:
    """The runner is not lenient: a mistyped option, or a daemon that cannot start, fails it."""
    bridge_block = next(b for b in tutorial_blocks() if b.kind == "run" and b.hosts == ["bridge"])
    typo = Block("run", {"on": "bridge"}, "sh", bridge_block.body.replace("--listen", "--lisen", 1))
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        tutorial.run(typo)
    broken = Block("run", {"on": "bridge"}, "sh", "relay-bridge -c /etc/dicom-relay/missing.toml serve\n")
    with pytest.raises(AssertionError, match="exited with 2"):
        tutorial.run(broken)
