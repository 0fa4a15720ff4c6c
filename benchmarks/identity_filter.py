"""CPU cost of patient identity coercion at a router, in process (no sockets).

The same P-DATA stream (C-STOREs of one size, cut into 16 KiB PDUs as DCMTK sends them) goes
through three things a router may do with it:

* ``dimse-parse``: the DIMSE receiver alone (the floor: finding message boundaries);
* ``identity``: the identity filter relabelling every C-STORE (an in-memory mapping source,
  so the lookup cost is the resolver's cache, as on a retrieval of many images of one patient),
  re-fragmented within 16 KiB;
* ``identity-deflated``: the same with Deflated Explicit VR Little Endian data sets
  (inflate, rewrite, deflate again).

Reported: MB/s of data set bytes per core (process CPU time). The transparent relay does
none of this work, so these figures bound what an identity route costs beyond it.

    python -m benchmarks.identity_filter --instance-kib 512 --count 200 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import zlib
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from benchmarks.common import write_results
from relay_router.dimse import DimseReceiver, DimseSender, c_store_rq
from relay_router.identity.coerce import Domain, RouteIdentity
from relay_router.identity.filter import Flow, IdentityFilter
from relay_router.identity.model import PatientRef
from relay_router.identity.resolver import MemorySource, Resolver

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"
CONTEXTS = {1: (CT, EXPLICIT), 3: (CT, DEFLATED)}
PDU = 16384
NIBBLE = bytes(i & 0x0F for i in range(256))


def data_set(size: int, uid: str, syntax: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid
    ds.PatientName = "PARTNER^NAME"
    ds.PatientID = "B-777"
    ds.StudyInstanceUID = "1.2.3.4"
    # 4 bits of noise per byte: deflate halves it, about what it does to CT pixels.
    ds.PixelData = random.Random(uid).randbytes(size).translate(NIBBLE)
    ds["PixelData"].VR = "OB"
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    if syntax != DEFLATED:
        return fp.getvalue()
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = deflater.compress(fp.getvalue()) + deflater.flush()
    return out + b"\0" * (len(out) % 2)


def plain_size(size: int) -> int:
    return len(data_set(size, "1.2.3.4.1", EXPLICIT))


def stream(count: int, size: int, context: int) -> tuple[list[bytes], int]:
    """The PDUs of `count` C-STOREs, and the bytes on the wire."""
    sender = DimseSender(PDU)
    pdus: list[bytes] = []
    for n in range(count):
        uid = f"1.2.3.4.{n + 1}"
        body = data_set(size, uid, CONTEXTS[context][1])
        pdus += list(sender.message(context, c_store_rq(n + 1, CT, uid), body))
    return pdus, sum(map(len, pdus))


def parse_only(pdus: list[bytes]) -> None:
    receiver = DimseReceiver(CONTEXTS)
    for pdu in pdus:
        receiver.feed(pdu)


def through_filter(pdus: list[bytes]) -> None:
    resolver = Resolver([MemorySource([(PatientRef("A-123", "HOSP-A"), PatientRef("B-777", "HOSP-B"))])])
    route = RouteIdentity(Domain("HOSP-A"), "HOSP-B")
    filt = IdentityFilter(
        route, resolver, contexts=lambda: CONTEXTS, max_pdu=lambda flow: PDU, audit=lambda *a, **k: None
    )

    async def go() -> None:
        for pdu in pdus:
            await filt.process(Flow.ARRIVING, pdu)

    asyncio.run(go())


def cpu(fn: Callable[[], None]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance-kib", type=int, default=512, help="Pixel Data per instance (KiB)")
    parser.add_argument("--count", type=int, default=200, help="instances per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="print only; write nothing to benchmarks/results")
    args = parser.parse_args(argv)
    size = args.instance_kib * 1024
    plain, plain_wire = stream(args.count, size, 1)
    deflated, deflated_wire = stream(args.count, size, 3)
    content = args.count * plain_size(size)  # data set bytes before deflate: the same in every case
    cases = {
        "dimse-parse": (lambda: parse_only(plain), plain_wire),
        "identity": (lambda: through_filter(plain), plain_wire),
        "identity-deflated": (lambda: through_filter(deflated), deflated_wire),
    }
    rows: dict[str, dict[str, float]] = {}
    for name, (fn, wire) in cases.items():
        samples = [cpu(fn) for _ in range(args.repeats)]
        median = statistics.median(samples)
        rows[name] = {
            "cpu_s_median": median,
            "wire_mb": wire / 1e6,
            "content_mb": content / 1e6,
            "content_mb_per_cpu_s": content / 1e6 / median,
        }
    title = (
        f"# Identity filter: {args.count} C-STOREs of {args.instance_kib} KiB, 16 KiB PDUs, "
        f"CPU time median of {args.repeats}"
    )
    head = "| path | MB on the wire | CPU s | data set MB per CPU s |"
    lines = [title, "", head, "|---|---:|---:|---:|"]
    for name, row in rows.items():
        cells = f"{row['wire_mb']:.1f} | {row['cpu_s_median']:.3f} | {row['content_mb_per_cpu_s']:.0f}"
        lines.append(f"| {name} | {cells} |")
    lines += [
        "",
        f"Throughput counts the data sets' bytes before deflate ({content / 1e6:.1f} MB in every case). "
        "Command: `python -m benchmarks.identity_filter "
        f"--instance-kib {args.instance_kib} --count {args.count} --repeats {args.repeats}`.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_save:
        config = {"instance_kib": args.instance_kib, "count": args.count, "repeats": args.repeats, "pdu": PDU}
        paths = write_results("identity-filter", {"config": config, "results": rows}, table)
        print("wrote", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
