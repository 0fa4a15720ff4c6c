"""A child process for the spool's crash tests: the parent SIGKILLs it at a random moment.

python -m tests.support.spool_child write SPOOL_DIR FILE...      spool the files again and again,
                                                                  printing "committed <id> <uid>" after each commit
python -m tests.support.spool_child deliver SPOOL_DIR HOST PORT AET   deliver route "DEST" until killed
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from pynetdicom.dsutils import split_dataset

from relay_router.accel.delivery import DeliveryPool, Destination
from relay_router.accel.spool import Spool

ROUTE = "DEST"
CHUNK = 16 * 1024


def spool_file(spool: Spool, path: Path, route: str = ROUTE, *, deferred: bool = False) -> str:
    """Spool one Part 10 file as the DIMSE receiver would: the data set bytes, in chunks.

    `deferred`: commit as the acceptor does (the entry's own files written after commit returns)."""
    meta, offset = split_dataset(path)
    with spool.writer(
        route,
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax=str(meta.TransferSyntaxUID),
    ) as writer:
        with open(path, "rb") as source:
            source.seek(offset)
            while chunk := source.read(CHUNK):
                writer.write(chunk)
        return writer.commit(_nothing if deferred else None).id


def _nothing() -> None:
    pass


def main(argv: list[str]) -> int:
    mode, root = argv[0], Path(argv[1])
    spool = Spool(root, max_bytes=1 << 30)
    if mode == "write":
        files = [Path(p) for p in argv[2:]]
        while True:
            for path in files:
                entry_id = spool_file(spool, path, deferred=True)
                print(f"committed {entry_id} {path.name}", flush=True)
    if mode == "deliver":
        logging.basicConfig(level=logging.WARNING)
        pool = DeliveryPool(spool, ROUTE, Destination(argv[2], int(argv[3]), argv[4], "SPOOLCHILD"), associations=2)
        pool.start()
        print("delivering", flush=True)
        while True:
            time.sleep(1)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
