"""The data the WAN benchmark sends: deterministic, generated with relay_demo.datasets.

    ct          N x 512x512 16-bit CT slices, uncompressed (Explicit VR LE), ~0.5 MB each
    mr          N x 256x256 16-bit MR slices, uncompressed, ~0.13 MB each (many small images)
    compressed  N x 512x512 CT slices in JPEG 2000 lossless (~0.2 MB each; Pillow's OpenJPEG
                encoder); where Pillow cannot write JPEG 2000, pydicom's JPEG 2000 sample file
                replicated with new UIDs
    small       N x 160x160 16-bit CT slices, ~51 KB each (small objects: key images, reports, SR-sized)
    crdx        N x 3400x2800 16-bit DX images, uncompressed, 19 MB each (a CR/DX study: few, large images,
                each above the routers' default 8 MiB spill threshold)

Files are written once per parameter set into a cache directory and reused.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from relay_demo.datasets import (
    _uid,
    fingerprints,
    generate_ct_series,
    generate_dx_series,
    generate_mr_series,
    write_series,
)


@dataclass(frozen=True)
class Workload:
    name: str
    files: tuple[Path, ...]
    description: str

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def storescu_args(self) -> list[str]:
        """storescu's proposal for these files: by default it offers only uncompressed syntaxes."""
        ts = str(pydicom.dcmread(self.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        return {"1.2.840.10008.1.2.4.90": ["-xv"], "1.2.840.10008.1.2.4.91": ["-xw"]}.get(ts, [])


def _j2k_codestream(pixels: bytes, rows: int, cols: int) -> bytes | None:
    try:
        from PIL import Image, features
    except ImportError:
        return None
    if not features.check("jpg_2000"):
        return None
    image = Image.frombytes("I;16", (cols, rows), pixels)
    out = io.BytesIO()
    image.save(out, format="JPEG2000", irreversible=False, no_jp2=True)  # reversible 5/3: lossless
    return out.getvalue()


def _compressed(n: int, directory: Path) -> str:
    datasets = generate_ct_series(n, patient_id="RELAY-J2K-0001", patient_name="Demo^J2k", seed=7)
    if datasets and _j2k_codestream(datasets[0].PixelData[: 64 * 64 * 2], 64, 64) is not None:
        for ds in datasets:
            stream = _j2k_codestream(ds.PixelData, ds.Rows, ds.Columns)
            assert stream is not None
            ds.PixelData = encapsulate([stream])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        write_series(datasets, directory)
        return f"{n} x 512x512 CT, JPEG 2000 lossless (1.2.840.10008.1.2.4.90), encoded with Pillow/OpenJPEG"
    # Fallback: pydicom's own JPEG 2000 sample, replicated with new UIDs.
    from pydicom.data import get_testdata_file

    sample = get_testdata_file("JPEG2000.dcm", download=False)
    if not isinstance(sample, str):
        raise FileNotFoundError("pydicom's JPEG2000.dcm test file is not installed")
    for i in range(n):
        ds = pydicom.dcmread(sample)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid("j2k-sample", i)
        ds.StudyInstanceUID = _uid("j2k-sample-study")
        ds.SeriesInstanceUID = _uid("j2k-sample-series")
        ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    ts = pydicom.dcmread(sample, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return f"{n} x pydicom's JPEG2000.dcm sample ({ts}), replicated with new UIDs"


def build(name: str, n: int, cache: Path) -> Workload:
    directory = cache / f"{name}-{n}"
    marker = directory / ".complete"
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        if name == "ct":
            write_series(generate_ct_series(n), directory)
            text = f"{n} x 512x512 16-bit CT, uncompressed (Explicit VR LE)"
        elif name == "mr":
            write_series(generate_mr_series(n), directory)
            text = f"{n} x 256x256 16-bit MR, uncompressed (Explicit VR LE)"
        elif name == "small":
            series = generate_ct_series(n, rows=160, cols=160, patient_id="RELAY-SMALL-0001", seed=3)
            write_series(series, directory)
            text = f"{n} x 160x160 16-bit CT (small objects, < 64 KB each), uncompressed"
        elif name == "crdx":
            write_series(generate_dx_series(n), directory)
            text = f"{n} x 3400x2800 16-bit DX (chest PA), uncompressed, 19 MB each (above the 8 MiB spill threshold)"
        elif name == "compressed":
            text = _compressed(n, directory)
        else:
            raise ValueError(f"unknown workload {name!r}")
        marker.write_text(text)
    files = tuple(sorted(p for p in directory.glob("*.dcm")))
    return Workload(name, files, marker.read_text())


def arrival_times(received: Path, since_ns: int) -> tuple[float, float]:
    """Seconds from `since_ns` (wall clock, time.time_ns()) until the first and the last file in `received` was
    complete. storescp receives a data set in memory and writes its file at the end of the C-STORE, in one go,
    before it answers: a file's mtime (the kernel's coarse clock, a few ms of resolution) is the moment that
    instance was stored. Polling for the first file would race with its write; the mtimes do not."""
    stamps = [p.stat().st_mtime_ns for p in received.glob("*.dcm")]
    if not stamps:
        raise RuntimeError(f"no file arrived in {received}")
    return (min(stamps) - since_ns) / 1e9, (max(stamps) - since_ns) / 1e9


def check_arrival(what: str, received: Path, sent: tuple[Path, ...], verify: bool) -> None:
    """Every file of `sent` arrived in `received` (and, with `verify`, with the same pixels); else RuntimeError."""
    got = sorted(received.glob("*.dcm"))
    if len(got) != len(sent):
        raise RuntimeError(f"{what}: the receiver got {len(got)} of {len(sent)} files")
    if verify and fingerprints(got) != fingerprints(sent):
        raise RuntimeError(f"{what}: what arrived differs from what was sent")
