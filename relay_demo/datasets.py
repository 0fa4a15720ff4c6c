"""Deterministic sample DICOM data for the demo, the benchmarks and the tests.

Why generate instead of shipping files: the relay must be shown to move images
*byte for byte*, at realistic sizes (a 512x512 CT slice is 512 KiB), and in
volumes that a repository should not carry. Everything here is deterministic
from a seed, so two runs (or two processes) produce the same UIDs and the same
pixel bytes, and a test can compare what arrived against what it generated.

The pixel data is a smooth phantom (body ellipse, organs, bone ring) plus
Gaussian noise, so that it compresses roughly like real CT/MR (zstd ratio
around 2-3), not like an all-zero buffer that would flatter the spill path.

``fingerprint`` is the "byte-identical" check every test uses: the SOP
Instance UID and a SHA-256 of the raw Pixel Data value. It deliberately ignores
the header, which archives legitimately rewrite (Orthanc adds its own private
tags, DCMTK rewrites the file meta information).
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

__all__ = [
    "SAMPLE_FILE_NAMES",
    "DatasetSource",
    "fingerprint",
    "fingerprints",
    "generate_ct_series",
    "generate_dx_series",
    "generate_mr_series",
    "sample_files",
    "write_series",
]

#: Test files shipped inside the pydicom wheel (no download needed). Chosen so
#: that their SOP Instance UIDs are distinct (the MR_small_* variants all share
#: one UID, so only one of them may be stored in the same archive) and so that
#: they cover uncompressed, JPEG 2000 and RLE transfer syntaxes.
SAMPLE_FILE_NAMES: Final[tuple[str, ...]] = (
    "CT_small.dcm",  # CT, Explicit VR Little Endian
    "MR_small.dcm",  # MR, Explicit VR Little Endian
    "JPEG2000.dcm",  # Secondary Capture, JPEG 2000
    "SC_rgb_rle.dcm",  # Secondary Capture, RGB, RLE Lossless
)

#: Anything ``fingerprint`` accepts: a dataset, a file path, or a whole file's bytes.
DatasetSource = Dataset | str | os.PathLike[str] | bytes

_STUDY_DATE: Final = "20240115"
_STUDY_TIME: Final = "093000"
_UID_NAMESPACE: Final = uuid.UUID("6f1d2c3e-8b7a-5e4f-9a0b-1c2d3e4f5a6b")


def _uid(*parts: object) -> str:
    """A deterministic UUID-derived UID (``2.25.<int>``, PS3.5 B.2) from ``parts``.

    Not ``generate_uid(prefix=None, entropy_srcs=...)``: with ``prefix=None``
    pydicom ignores the entropy sources and returns a random UUID.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(repr, parts))).int}"


def _phantom(rows: int, cols: int, z: float) -> np.ndarray:
    """A smooth head/body-like phantom in Hounsfield units at slice height ``z``.

    ``z`` in [0, 1] makes the organs grow and shrink along the series, so the
    slices differ from each other (a series of identical slices would
    deduplicate unrealistically well).
    """
    y, x = np.mgrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : cols * 1j]
    hu = np.full((rows, cols), -1000.0)  # air
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2
    hu[body <= 1.0] = 40.0  # soft tissue
    ring = (body <= 1.0) & (body >= 0.88)
    hu[ring] = 700.0  # bone-like shell
    shrink = 0.6 + 0.4 * np.sin(np.pi * z)
    for cx, cy, rx, ry, value in (
        (-0.35, 0.0, 0.22, 0.3, -800.0),  # lung
        (0.35, 0.0, 0.22, 0.3, -800.0),  # lung
        (0.0, -0.3, 0.12, 0.1, 60.0),  # liver-ish
        (0.0, 0.35, 0.06, 0.06, 300.0),  # contrast vessel
    ):
        mask = ((x - cx) / (rx * shrink)) ** 2 + ((y - cy) / (ry * shrink)) ** 2 <= 1.0
        hu[mask] = value
    # A gentle gradient so neighbouring pixels are correlated, as in real data.
    hu += 30.0 * np.cos(3.0 * x + 2.0 * z) * np.sin(2.0 * y)
    return hu


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOM_RELAY_DEMO"
    return meta


def _base_dataset(
    *,
    sop_class: str,
    sop_instance: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    patient_id: str,
    patient_name: str,
    modality: str,
    index: int,
    rows: int,
    cols: int,
    spacing: float,
    thickness: float,
) -> Dataset:
    """Patient, study, series and image-plane attributes common to CT and MR."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = _STUDY_DATE
    ds.SeriesDate = _STUDY_DATE
    ds.ContentDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.SeriesTime = _STUDY_TIME
    ds.ContentTime = _STUDY_TIME
    ds.AccessionNumber = f"ACC{abs(_hash_int(study_uid)) % 10**8:08d}"
    ds.Modality = modality
    ds.Manufacturer = "dicom-relay demo"
    ds.InstitutionName = "Demo Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"Demo {modality} study"
    ds.SeriesDescription = f"Demo {modality} series"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = f"{thickness:g}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    z = round(index * thickness, 3)
    ds.ImagePositionPatient = [
        f"{-spacing * cols / 2:g}",
        f"{-spacing * rows / 2:g}",
        f"{z:g}",
    ]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def _hash_int(text: str) -> int:
    """A stable (not per-process salted, unlike ``hash``) integer digest of ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _pixels(rows: int, cols: int, z: float, rng: np.random.Generator, noise: float, scale: float) -> bytes:
    """Stored values (12 bits in 16) of the phantom: ``(HU + 1024) * scale`` plus noise."""
    values = (_phantom(rows, cols, z) + 1024.0) * scale
    values += rng.normal(0.0, noise, size=values.shape)
    return np.clip(values, 0, 4095).astype("<u2").tobytes()


def _generate_series(
    n: int,
    *,
    modality: str,
    sop_class: str,
    rows: int,
    cols: int,
    patient_id: str,
    patient_name: str,
    study_uid: str | None,
    seed: int,
    spacing: float,
    thickness: float,
    attributes: dict[str, object],
    rng_tag: int,
    noise: float,
    scale: float,
) -> list[Dataset]:
    """The series both generators share: deterministic UIDs, one phantom slice per instance."""
    if n < 0:
        raise ValueError("n must be >= 0")
    study = study_uid or _uid("study", modality, patient_id, seed)
    series = _uid("series", modality, study, seed)
    frame = _uid("frame", modality, study, seed)
    result: list[Dataset] = []
    for i in range(n):
        ds = _base_dataset(
            sop_class=sop_class,
            sop_instance=_uid("instance", series, i),
            study_uid=study,
            series_uid=series,
            frame_uid=frame,
            patient_id=patient_id,
            patient_name=patient_name,
            modality=modality,
            index=i,
            rows=rows,
            cols=cols,
            spacing=spacing,
            thickness=thickness,
        )
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        rng = np.random.default_rng([seed, i, rng_tag])
        ds.PixelData = _pixels(rows, cols, i / max(n - 1, 1), rng, noise=noise, scale=scale)
        result.append(ds)
    return result


def generate_ct_series(
    n: int,
    *,
    rows: int = 512,
    cols: int = 512,
    patient_id: str = "RELAY-CT-0001",
    patient_name: str = "Demo^Ct",
    study_uid: str | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """``n`` slices of a synthetic CT series (CT Image Storage, Explicit VR LE, 16 bit).

    UIDs are derived from ``seed`` and the patient ID, so calling this twice
    with the same arguments returns identical data; pass a different ``seed``
    for a different series (in the same study when ``study_uid`` is given).
    """
    attributes = {
        "KVP": "120",
        "ConvolutionKernel": "STANDARD",
        "RescaleIntercept": "-1024",
        "RescaleSlope": "1",
        "RescaleType": "HU",
        "WindowCenter": "40",
        "WindowWidth": "400",
    }
    return _generate_series(
        n,
        modality="CT",
        sop_class=CTImageStorage,
        rows=rows,
        cols=cols,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        seed=seed,
        spacing=0.7,
        thickness=1.25,
        attributes=attributes,
        rng_tag=1,
        noise=12.0,
        scale=1.0,
    )


def generate_mr_series(
    n: int,
    *,
    rows: int = 256,
    cols: int = 256,
    patient_id: str = "RELAY-MR-0001",
    patient_name: str = "Demo^Mr",
    study_uid: str | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """``n`` slices of a synthetic MR series (MR Image Storage, Explicit VR LE, 16 bit).

    Same determinism rules as :func:`generate_ct_series`; the intensities are
    MR-like (no Hounsfield rescale, dark air, noisy background).
    """
    attributes = {
        "ScanningSequence": "SE",
        "SequenceVariant": "NONE",
        "ScanOptions": "",
        "MRAcquisitionType": "2D",
        "RepetitionTime": "500",
        "EchoTime": "15",
        "EchoTrainLength": 1,
        "MagneticFieldStrength": "1.5",
        "ImagingFrequency": "63.87",
        "WindowCenter": "600",
        "WindowWidth": "1200",
    }
    return _generate_series(
        n,
        modality="MR",
        sop_class=MRImageStorage,
        rows=rows,
        cols=cols,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        seed=seed,
        spacing=0.9,
        thickness=5.0,
        attributes=attributes,
        rng_tag=2,
        noise=20.0,
        scale=0.5,
    )


def generate_dx_series(
    n: int,
    *,
    rows: int = 3400,
    cols: int = 2800,
    patient_id: str = "RELAY-DX-0001",
    patient_name: str = "Demo^Dx",
    study_uid: str | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """``n`` large projection images of a synthetic CR/DX study (Digital X-Ray, For Presentation, 16 bit).

    The default 3400x2800 is a typical 35x43 cm flat-panel detector at 0.139 mm, 19 MB per image
    uncompressed: big enough to cross the routers' default spill threshold (8 MiB). Same determinism
    rules as :func:`generate_ct_series`; the noise is a little stronger than CT's (quantum noise of
    a radiograph), so zstd gets a realistic ratio (about 2x, like the CT series), not a drawing's.
    """
    attributes = {
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "PresentationIntentType": "FOR PRESENTATION",
        "BodyPartExamined": "CHEST",
        "ViewPosition": "PA",
        "KVP": "125",
        "ImagerPixelSpacing": ["0.139", "0.139"],
        "WindowCenter": "1024",
        "WindowWidth": "2048",
    }
    return _generate_series(
        n,
        modality="DX",
        sop_class=DigitalXRayImageStorageForPresentation,
        rows=rows,
        cols=cols,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        seed=seed,
        spacing=0.139,
        thickness=1.0,
        attributes=attributes,
        rng_tag=3,
        noise=16.0,
        scale=1.0,
    )


def write_series(datasets: Iterable[Dataset], directory: str | os.PathLike[str]) -> list[Path]:
    """Save each dataset as ``<SOPInstanceUID>.dcm`` in ``directory`` (created if needed).

    Files are written in the DICOM file format (preamble, file meta) as pydicom
    3 requires with ``enforce_file_format=True``; returns the paths in input order.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sample_files() -> list[Path]:
    """Small real-world files that ship inside pydicom (see :data:`SAMPLE_FILE_NAMES`).

    Asks pydicom for one name at a time with ``download=False``: asking for
    all test files, or for one that is not in the wheel, goes to the network.
    """
    paths: list[Path] = []
    for name in SAMPLE_FILE_NAMES:
        found = get_testdata_file(name, download=False)
        if not isinstance(found, str):
            raise FileNotFoundError(f"pydicom test file {name!r} is not installed")
        paths.append(Path(found))
    return paths


def _load(source: DatasetSource) -> Dataset:
    if isinstance(source, Dataset):
        return source
    if isinstance(source, bytes | bytearray):
        return pydicom.dcmread(io.BytesIO(source), force=True)
    return pydicom.dcmread(os.fspath(source), force=True)


def fingerprint(source: DatasetSource) -> tuple[str, str]:
    """``(SOPInstanceUID, sha256 hex of the raw Pixel Data value)``.

    The raw value is what travelled on the wire (native or encapsulated), so
    equal fingerprints mean the image arrived bit for bit. Instances without
    Pixel Data hash the empty string; compare such objects some other way.
    """
    ds = _load(source)
    elem = ds.get((0x7FE0, 0x0010))
    value = b"" if elem is None or elem.value is None else bytes(elem.value)
    return str(ds.SOPInstanceUID), hashlib.sha256(value).hexdigest()


def fingerprints(sources: Iterable[DatasetSource]) -> dict[str, str]:
    """``{SOPInstanceUID: pixel sha256}`` for many datasets, paths or file bytes."""
    return dict(fingerprint(s) for s in sources)


def describe(paths: Sequence[Path]) -> str:
    """One line per file (transfer syntax, SOP class, UID), for failure messages."""
    lines = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        ts = getattr(ds.file_meta, "TransferSyntaxUID", None)
        lines.append(f"{path.name}: {ts} {ds.get('SOPClassUID', '?')} {ds.get('SOPInstanceUID')}")
    return "\n".join(lines)
