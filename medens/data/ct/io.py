"""Reading CT scans (MetaImage, NIfTI, DICOM series) into one geometry-aware in-memory form.

Every reader returns a :class:`Scan` whose array is indexed ``[i, j, k]`` in ITK index order (the
order of `DimSize` in a `.mhd` header, and of columns, rows, slices in DICOM), together with the
origin, spacing and direction that map an index to LPS world millimetres, the frame LUNA16's
`coordX/Y/Z` use. Bad files raise :class:`~medens.errors.DataError` naming the file and the problem,
so a truncated `.raw` or a folder that mixes two DICOM series never becomes a silently wrong patch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medens.errors import DataError

SCAN_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz")

# Bytes per element of the MetaImage element types we check the `.raw` size against.
_MET_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
}


@dataclass
class Scan:
    """A 3-D CT volume in HU with the geometry that maps voxel indices to LPS world mm.

    ``world = origin + direction @ (spacing * index)``; the columns of ``direction`` are the world
    directions of the i, j and k axes.
    """

    array: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    path: Path
    series_uid: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


def scan_stem(path: Path) -> str:
    """File name without its scan suffix (``uid.nii.gz`` -> ``uid``), used as the series UID."""
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_metaimage_header(path: Path) -> dict[str, str]:
    """The `key = value` pairs of a MetaImage header (text up to `ElementDataFile`)."""
    header: dict[str, str] = {}
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                line = raw.decode("latin-1").strip()
                if not line or "=" not in line:
                    continue
                key, value = (part.strip() for part in line.split("=", 1))
                header[key] = value
                if key == "ElementDataFile":
                    break
    except OSError as exc:
        raise DataError(f"{path}: cannot read MetaImage header ({exc})") from exc
    return header


def check_metaimage(path: Path) -> None:
    """Check a `.mhd` header against its data file so a truncated `.raw` fails with a clear message.

    SimpleITK's own error for a short `.raw` is a misleading "No such file or directory".
    """
    path = Path(path)
    header = read_metaimage_header(path)
    if "DimSize" not in header or "ElementType" not in header:
        raise DataError(f"{path}: MetaImage header lacks DimSize or ElementType")
    try:
        dims = [int(v) for v in header["DimSize"].split()]
    except ValueError as exc:
        raise DataError(f"{path}: unreadable DimSize {header['DimSize']!r}") from exc
    if len(dims) != 3:
        raise DataError(f"{path}: expected a 3-D scan, DimSize is {dims}")
    data_file = header.get("ElementDataFile", "")
    if data_file.upper() == "LOCAL" or not data_file:
        return  # data follows the header (.mha); SimpleITK checks it
    if data_file.upper() == "LIST" or "%" in data_file:
        return  # multi-file data: left to SimpleITK
    raw = path.parent / data_file
    if not raw.is_file():
        raise DataError(f"{path}: its data file {raw} does not exist")
    if header.get("CompressedData", "False").lower() == "true":
        return  # .zraw: size cannot be predicted
    nbytes = _MET_BYTES.get(header["ElementType"].upper())
    if nbytes is None:
        return
    channels = int(header.get("ElementNumberOfChannels", "1"))
    expected = int(np.prod(dims)) * nbytes * channels
    actual = raw.stat().st_size
    header_size = int(header.get("HeaderSize", "0"))
    if header_size == -1:
        if actual < expected:
            raise DataError(f"{raw}: truncated, {actual} bytes but the header {path.name} needs {expected}")
        return
    if actual < expected + header_size:
        raise DataError(
            f"{raw}: truncated, {actual} bytes but the header {path.name} "
            f"(DimSize {dims}, {header['ElementType']}) needs {expected + header_size}"
        )
    if actual > expected + header_size:
        raise DataError(
            f"{raw}: {actual} bytes, more than the {expected + header_size} its header {path.name} "
            f"(DimSize {dims}, {header['ElementType']}) describes; header and data do not match"
        )


def _from_sitk(image, path: Path, series_uid: str | None) -> Scan:  # noqa: ANN001 (SimpleITK image)
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3-D scan, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32, copy=False)
    return Scan(
        array=np.ascontiguousarray(array),
        origin=np.asarray(image.GetOrigin(), dtype=np.float64),
        spacing=np.asarray(image.GetSpacing(), dtype=np.float64),
        direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        path=path,
        series_uid=series_uid,
    )


def read_image_file(path: str | os.PathLike) -> Scan:
    """Read a `.mhd`/`.mha`/`.nii(.gz)` volume through SimpleITK (LPS world frame, as LUNA16)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: scan file does not exist")
    if path.name.lower().endswith(".mhd"):
        check_metaimage(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise DataError(f"{path}: SimpleITK cannot read it ({first[-1] if first else exc})") from exc
    scan = _from_sitk(image, path, scan_stem(path))
    if not np.all(np.isfinite(scan.array)):
        raise DataError(f"{path}: contains NaN or infinite voxels")
    return scan


# ----------------------------------------------------------------------------------------------- DICOM


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_dicom_headers(folder: Path, with_pixels: bool) -> list[tuple[Path, object]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for p in _dicom_files(folder):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=not with_pixels)
        except InvalidDicomError:
            if p.suffix.lower() == ".dcm":
                raise DataError(f"{p}: not a valid DICOM file") from None
            continue  # README, DICOMDIR-less extras, ...
        except Exception as exc:  # pydicom raises a variety of errors on damaged files
            raise DataError(f"{p}: cannot read DICOM ({exc})") from exc
        out.append((p, ds))
    return out


def dicom_series_patients(folder: str | os.PathLike) -> dict[str, tuple[list[Path], str | None]]:
    """Per series UID in a folder: its files and the DICOM PatientID (0010,0020), None where empty.

    A series whose slices name two patients is refused: its patient-level split would be a guess.
    """
    folder = Path(folder)
    files: dict[str, list[Path]] = {}
    patients: dict[str, set[str]] = {}
    for p, ds in _read_dicom_headers(folder, with_pixels=False):
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            raise DataError(f"{p}: DICOM file has no SeriesInstanceUID")
        files.setdefault(uid, []).append(p)
        pid = str(getattr(ds, "PatientID", "") or "").strip()
        patients.setdefault(uid, set()).update([pid] if pid else [])
    for uid, pids in patients.items():
        if len(pids) > 1:
            raise DataError(f"{folder}: series {uid} names several PatientIDs {sorted(pids)}")
    return {uid: (fs, next(iter(patients[uid]), None)) for uid, fs in files.items()}


def _floats(ds, tag: str, n: int, path: Path) -> np.ndarray:  # noqa: ANN001
    value = getattr(ds, tag, None)
    if value is None:
        raise DataError(f"{path}: DICOM slice lacks {tag}, needed for the scan geometry")
    arr = np.asarray([float(v) for v in value], dtype=np.float64)
    if arr.shape != (n,):
        raise DataError(f"{path}: {tag} has {arr.size} values, expected {n}")
    return arr


def read_dicom_series(folder: str | os.PathLike) -> Scan:
    """Read one DICOM series from a folder: slices sorted by position, rescale slope/intercept applied.

    Refuses (DataError) a folder that mixes series, slices of different size or orientation,
    duplicate positions, or uneven slice gaps (a missing slice would otherwise shift every
    world-to-voxel lookup beyond it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder does not exist")
    slices = _read_dicom_headers(folder, with_pixels=True)
    if not slices:
        raise DataError(f"{folder}: no DICOM files in this folder")
    uids = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices})
    if len(uids) != 1:
        raise DataError(
            f"{folder}: the folder mixes {len(uids)} DICOM series ({', '.join(uids)}); "
            "put each series in its own folder"
        )
    first_path, first = slices[0]
    orient = _floats(first, "ImageOrientationPatient", 6, first_path)
    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(f"{first_path}: ImageOrientationPatient {orient.tolist()} is not orthonormal")
    pixel_spacing = _floats(first, "PixelSpacing", 2, first_path)
    shape2d = (int(first.Rows), int(first.Columns))
    entries = []
    for p, ds in slices:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, p), orient, atol=1e-4):
            raise DataError(f"{p}: slice orientation differs from {first_path.name} in the same series")
        if (int(ds.Rows), int(ds.Columns)) != shape2d:
            raise DataError(f"{p}: slice is {ds.Rows}x{ds.Columns}, others are {shape2d[0]}x{shape2d[1]}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, p), pixel_spacing, atol=1e-4):
            raise DataError(f"{p}: PixelSpacing differs from {first_path.name} in the same series")
        pos = _floats(ds, "ImagePositionPatient", 3, p)
        entries.append((float(pos @ normal), pos, p, ds))
    entries.sort(key=lambda e: e[0])
    positions = np.asarray([e[0] for e in entries])
    if len(entries) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < 1e-3):
            i = int(np.argmin(gaps))
            raise DataError(
                f"{folder}: slices {entries[i][2].name} and {entries[i + 1][2].name} share position "
                f"{positions[i]:.3f} mm (duplicate slice)"
            )
        dz = float(np.median(gaps))
        if np.max(np.abs(gaps - dz)) > max(0.01 * dz, 1e-3):
            raise DataError(
                f"{folder}: uneven slice spacing (gaps {np.round(gaps, 3).tolist()} mm); "
                "a slice is missing or two series are interleaved"
            )
    else:
        dz = float(getattr(first, "SliceThickness", 1.0) or 1.0)
    volume = np.empty((shape2d[1], shape2d[0], len(entries)), dtype=np.float32)
    for k, (_, _, p, ds) in enumerate(entries):
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # missing/short PixelData, unsupported compression
            raise DataError(f"{p}: cannot decode pixel data ({exc})") from exc
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        volume[:, :, k] = (pixels * slope + intercept).T  # pixel_array is [row, column] = [j, i]
    direction = np.stack([row_cos, col_cos, normal], axis=1)
    return Scan(
        array=volume,
        origin=entries[0][1].astype(np.float64),
        spacing=np.asarray([pixel_spacing[1], pixel_spacing[0], dz], dtype=np.float64),
        direction=direction,
        path=folder,
        series_uid=uids[0],
        meta={"n_slices": len(entries)},
    )


def read_scan(path: str | os.PathLike) -> Scan:
    """Read any supported scan: a folder is a DICOM series, a file a MetaImage or NIfTI volume."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.name.lower().endswith(SCAN_SUFFIXES):
        raise DataError(
            f"{path}: not a supported scan (expected {', '.join(SCAN_SUFFIXES)} or a DICOM folder)"
        )
    return read_image_file(path)
