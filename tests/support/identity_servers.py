"""A PIX manager (HL7 v2 over MLLP, python-hl7) and a PIXm endpoint (FHIR over HTTP, aiohttp + fhir.resources).

Run as processes by the identity tests, each on an ephemeral loopback port:

    python -m tests.support.identity_servers pix  --persons persons.json --ready-file ready.json
    python -m tests.support.identity_servers pixm --persons persons.json --ready-file ready.json

persons.json: {"persons": [[["A-100", "HOSP_A"], ["B-900", "HOSP_B"]], ...], "domains": {"HOSP_A":
"1.2.3", ...}, "slow": {"SLOW-1": 5.0}}: each person is a list of (id, issuer); domains give each
issuer's OID (the PIX assigning authority "ISSUER&OID&ISO", the PIXm system "urn:oid:OID"); a
patient ID in "slow" is answered after that many seconds. Answers follow ITI-9 and ITI-83: found,
known without an ID in the asked domain (NF / empty Parameters), unknown patient (AE on QPD-3 /
404), unknown domain (AE on QPD-4 / 403).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.ports import wait_for_port

Person = list[tuple[str, str]]


@dataclass
class Registry:
    persons: list[Person]
    domains: dict[str, str]  # issuer -> OID
    slow: dict[str, float]
    patients: dict[str, dict[str, Any]]  # PIXm: FHIR Patient resources by logical id (= the Patient ID)

    @classmethod
    def load(cls, path: Path) -> Registry:
        raw = json.loads(path.read_text())
        persons = [[(i, s) for i, s in person] for person in raw["persons"]]
        slow = {k: float(v) for k, v in raw.get("slow", {}).items()}
        return cls(persons, dict(raw["domains"]), slow, dict(raw.get("patients", {})))

    def issuer_of_oid(self, oid: str) -> str | None:
        return next((issuer for issuer, o in self.domains.items() if o == oid), None)

    def find(self, patient_id: str, issuer: str) -> Person | None:
        return next((p for p in self.persons if (patient_id, issuer) in p), None)


# -- PIX manager (ITI-9) ------------------------------------------------------------------------


def pix_answer(registry: Registry, query: Any) -> str:
    from relay_router.identity import hl7util

    e = hl7util.escape
    msh, qpd = query.segment("MSH"), query.segment("QPD")
    control, tag = hl7util.value(msh, 10) or "", hl7util.value(qpd, 2) or ""
    patient_id = hl7util.value(qpd, 3, 1, 1) or ""
    source_oid, target_oid = hl7util.value(qpd, 3, 1, 4, 2) or "", hl7util.value(qpd, 4, 1, 4, 2) or ""
    source, target = registry.issuer_of_oid(source_oid), registry.issuer_of_oid(target_oid)
    sender = e(hl7util.value(msh, 3) or "")
    head = f"MSH|^~\\&|PIXMGR|MPI|{sender}||{hl7util.timestamp()}||RSP^K23^RSP_K23|R{control}|P|2.5"
    echo = f"QPD|IHE PIX Query|{e(tag)}|{e(patient_id)}^^^{e(source or '')}&{e(source_oid)}&ISO"
    person = registry.find(patient_id, source) if source else None
    if source is None or person is None:
        where = "QPD^1^3^1^1" if person is None and source is not None else "QPD^1^3^1^4"
        err = f"ERR||{where}|204^Unknown Key Identifier^HL70357|E"
        return "\r".join([head, f"MSA|AE|{e(control)}", err, f"QAK|{e(tag)}|AE", echo]) + "\r"
    if target is None:
        err = "ERR||QPD^1^4^1^4|204^Unknown Key Identifier^HL70357|E"
        return "\r".join([head, f"MSA|AE|{e(control)}", err, f"QAK|{e(tag)}|AE", echo]) + "\r"
    ids = [(i, s) for i, s in person if s == target]
    if not ids:
        return "\r".join([head, f"MSA|AA|{e(control)}", f"QAK|{e(tag)}|NF", echo]) + "\r"
    cx = "~".join(f"{e(i)}^^^{e(s)}&{registry.domains[s]}&ISO" for i, s in ids)
    return "\r".join([head, f"MSA|AA|{e(control)}", f"QAK|{e(tag)}|OK", echo, f"PID|||{cx}||~^^^^^S"]) + "\r"


def _server_tls(tls: tuple[Path, Path] | None) -> Any:
    if tls is None:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls[0]), str(tls[1]))
    return context


async def serve_pix(registry: Registry, ready: Path, tls: tuple[Path, Path] | None = None) -> None:
    import hl7
    from hl7.mllp import start_hl7_server

    async def client(reader: Any, writer: Any) -> None:
        try:
            while True:
                block = await reader.readblock()
                query = hl7.parse(block.decode())
                delay = registry.slow.get(_qpd_id(query), 0.0)
                await asyncio.sleep(delay)
                writer.writeblock(pix_answer(registry, query).encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    tasks: set[asyncio.Task[None]] = set()

    def accept(reader: Any, writer: Any) -> None:
        task = asyncio.get_running_loop().create_task(client(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await start_hl7_server(accept, "127.0.0.1", 0, ssl=_server_tls(tls))
    _announce(ready, server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _announce(ready: Path, port: int) -> None:
    partial = ready.with_suffix(".tmp")
    partial.write_text(json.dumps({"port": port}))
    partial.replace(ready)  # the test never reads half a file


def _qpd_id(query: Any) -> str:
    from relay_router.identity import hl7util

    return hl7util.value(query.segment("QPD"), 3, 1, 1) or ""


# -- PIXm endpoint (ITI-83) ---------------------------------------------------------------------


async def serve_pixm(registry: Registry, ready: Path, tls: tuple[Path, Path] | None = None) -> None:
    from aiohttp import web
    from fhir.resources.R4B.identifier import Identifier
    from fhir.resources.R4B.operationoutcome import OperationOutcome, OperationOutcomeIssue
    from fhir.resources.R4B.parameters import Parameters, ParametersParameter
    from fhir.resources.R4B.patient import Patient
    from fhir.resources.R4B.reference import Reference

    def issuer_of_system(system: str) -> str | None:
        return registry.issuer_of_oid(system.removeprefix("urn:oid:")) if system.startswith("urn:oid:") else None

    def outcome(status: int, code: str, text: str) -> web.Response:
        body = OperationOutcome(issue=[OperationOutcomeIssue(severity="error", code=code, diagnostics=text)])
        return web.Response(status=status, text=body.model_dump_json(), content_type="application/fhir+json")

    async def ihe_pix(request: web.Request) -> web.Response:
        system, _, patient_id = request.query.get("sourceIdentifier", "").partition("|")
        await asyncio.sleep(registry.slow.get(patient_id, 0.0))
        source, target = issuer_of_system(system), issuer_of_system(request.query.get("targetSystem", ""))
        if source is None or target is None:
            return outcome(403, "code-invalid", "sourceIdentifier or targetSystem domain not recognized")
        person = registry.find(patient_id, source)
        if person is None:
            return outcome(404, "not-found", "sourceIdentifier Patient Identifier not found")
        parameter = []
        for i, s in person:
            if s == target:
                system = f"urn:oid:{registry.domains[s]}"
                parameter.append(
                    ParametersParameter(name="targetIdentifier", valueIdentifier=Identifier(system=system, value=i))
                )
                if i in registry.patients:
                    parameter.append(
                        ParametersParameter(name="targetId", valueReference=Reference(reference=f"Patient/{i}"))
                    )
        body = Parameters(parameter=parameter or None)
        return web.Response(text=body.model_dump_json(), content_type="application/fhir+json")

    async def patient(request: web.Request) -> web.Response:
        logical_id = request.match_info["id"]
        if logical_id not in registry.patients:
            return outcome(404, "not-found", f"Patient/{logical_id} not found")
        body = Patient.model_validate({"resourceType": "Patient", "id": logical_id, **registry.patients[logical_id]})
        return web.Response(text=body.model_dump_json(), content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/fhir/Patient/$ihe-pix", ihe_pix)
    app.router.add_get("/fhir/Patient/{id}", patient)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_tls(tls))
    await site.start()
    port = runner.addresses[0][1]
    _announce(ready, port)
    await asyncio.Event().wait()


# -- process control for the tests --------------------------------------------------------------


class IdentityServerProcess:
    """One server process; `port` once it listens. Stopped with stop() (SIGTERM, then kill)."""

    def __init__(
        self, kind: str, persons: dict[str, Any], workdir: Path, *, tls: tuple[Path, Path] | None = None
    ) -> None:
        """`tls`: (certificate, key) to serve MLLP over TLS / HTTPS."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.persons_file = workdir / f"{kind}-persons.json"
        self.persons_file.write_text(json.dumps(persons))
        self.ready = workdir / f"{kind}{'-tls' if tls else ''}-ready.json"
        self.ready.unlink(missing_ok=True)
        self.log = (workdir / f"{kind}{'-tls' if tls else ''}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.identity_servers", kind, "--persons", str(self.persons_file),
             "--ready-file", str(self.ready), *(["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else [])],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.ready.exists() or not self.ready.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {kind} test server did not start; see {self.log.name}")
            time.sleep(0.05)
        self.port = int(json.loads(self.ready.read_text())["port"])
        if not wait_for_port(self.port):
            raise RuntimeError(f"the {kind} test server does not accept connections on {self.port}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["pix", "pixm"])
    parser.add_argument("--persons", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    args = parser.parse_args(argv)
    registry = Registry.load(args.persons)
    serve = serve_pix if args.kind == "pix" else serve_pixm
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        asyncio.run(serve(registry, args.ready_file, tls))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
