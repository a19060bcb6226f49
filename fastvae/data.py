"""MNIST-style datasets: find or download the IDX files, verify them, load them as arrays.

Checksums are of the decompressed IDX bytes, so a recompressed copy (such as
Debian's Fashion-MNIST package) verifies the same as the upstream .gz files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from fastvae.errors import DataError

IDX_UBYTE_CODE = 0x08
SPLITS = ("train", "test")
DOWNLOAD_TIMEOUT_S = 30
CHUNK_BYTES = 1 << 20
REDOWNLOAD_ADVICE = "delete it and run again to re-download, or replace it with a good copy"
FOLDER_ADVICE = "pass `data_dir` or set FASTVAE_DATA to a folder that has the files"


@dataclass(frozen=True)
class IdxFile:
    """One IDX file: its name without .gz, the md5 of its decompressed bytes, and their count
    (when known: a file is never decompressed past it, so a gzip bomb is not inflated)."""

    name: str
    md5: str
    size: int | None = None


@dataclass(frozen=True)
class SplitFiles:
    """The image and label files of one split."""

    images: IdxFile
    labels: IdxFile


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files come from and what they must hash to."""

    train: SplitFiles
    test: SplitFiles
    mirrors: tuple[str, ...]
    local_dirs: tuple[str, ...] = ()
    install_hint: str = ""

    def split(self, name: str) -> SplitFiles:
        """The files of split `name`, which must be "train" or "test"."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: choose 'train' or 'test'")
        return getattr(self, name)

    @property
    def files(self) -> tuple[IdxFile, ...]:
        """All four files, train before test, images before labels."""
        return (self.train.images, self.train.labels, self.test.images, self.test.labels)


def _mnist_style_split(prefix: str, count: int, images_md5: str, labels_md5: str) -> SplitFiles:
    """The conventional `<prefix>-images-idx3-ubyte` / `<prefix>-labels-idx1-ubyte` pair of
    `count` 28 x 28 images (IDX headers of 16 and 8 bytes)."""
    return SplitFiles(
        images=IdxFile(f"{prefix}-images-idx3-ubyte", images_md5, 16 + count * 28 * 28),
        labels=IdxFile(f"{prefix}-labels-idx1-ubyte", labels_md5, 8 + count),
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        train=_mnist_style_split(
            "train", 60000, "6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624"
        ),
        test=_mnist_style_split(
            "t10k", 10000, "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        train=_mnist_style_split(
            "train", 60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9"
        ),
        test=_mnist_style_split(
            "t10k", 10000, "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        local_dirs=("/usr/share/datasets/fashion-mnist",),
        install_hint="run `apt-get install dataset-fashion-mnist`",
    ),
}

_md5_by_file_state: dict[tuple[str, int, int], str] = {}


def _dataset_spec(dataset: str) -> DatasetSpec:
    """The spec registered under `dataset`, or a DataError listing the known names."""
    if dataset not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"unknown dataset {dataset!r}: choose one of {known}")
    return DATASETS[dataset]


def _open_idx(path: Path):
    """A binary reader of the IDX bytes, decompressing when the name ends in .gz."""
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as error:
        raise DataError(f"cannot open {path} ({error}): check that it exists and is readable") from error


def _too_large(path: Path, limit: int) -> DataError:
    return DataError(f"{path} holds more than the {limit} bytes its file has (it was not "
                     f"decompressed further): it is not that file; {REDOWNLOAD_ADVICE}")


def _read_chunks(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """The decompressed content of `path` in chunks, with decoding failures as DataError;
    DataError as soon as more than `limit` bytes come out (or the file is larger)."""
    if limit is not None and path.is_file() and path.stat().st_size > limit:
        raise _too_large(path, limit)
    total = 0
    with _open_idx(path) as stream:
        try:
            while chunk := stream.read(CHUNK_BYTES):
                total += len(chunk)
                if limit is not None and total > limit:
                    raise _too_large(path, limit)
                yield chunk
        except EOFError as error:
            raise DataError(f"{path} is truncated (the gzip stream ends early): {REDOWNLOAD_ADVICE}") from error
        except (gzip.BadGzipFile, zlib.error) as error:
            raise DataError(f"{path} is not a valid gzip file ({error}): {REDOWNLOAD_ADVICE}") from error
        except OSError as error:
            raise DataError(f"cannot read {path} ({error}): check the file and its permissions") from error


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The whole decompressed content of `path` (at most `limit` bytes)."""
    return b"".join(_read_chunks(path, limit))


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """The uint8 array encoded by IDX bytes `raw` read from `path`."""
    if len(raw) < 4:
        raise DataError(f"{path} is truncated (only {len(raw)} bytes, no IDX header): {REDOWNLOAD_ADVICE}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise DataError(
            f"{path} has wrong magic number 0x{raw[:4].hex()} (an IDX file starts with two zero bytes): "
            f"it is not an IDX file, {REDOWNLOAD_ADVICE}"
        )
    if dtype_code != IDX_UBYTE_CODE:
        raise DataError(
            f"{path} has unsupported dtype code 0x{dtype_code:02x} (only 0x08, unsigned byte, is supported): "
            "use an unsigned-byte IDX file"
        )
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DataError(f"{path} is truncated (its {ndim}-dimension header is incomplete): {REDOWNLOAD_ADVICE}")
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    expected = int(np.prod(shape, dtype=np.int64))
    found = len(raw) - header_bytes
    if found < expected:
        raise DataError(
            f"{path} is truncated (expected {expected} bytes of data for shape {shape}, got {found}): "
            f"{REDOWNLOAD_ADVICE}"
        )
    if found > expected:
        raise DataError(
            f"{path} has {found - expected} bytes of extra data after the {expected} its header declares: "
            f"{REDOWNLOAD_ADVICE}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape).copy()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The uint8 array stored in IDX file `path` (gzip-compressed when it ends in .gz)."""
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Store a uint8 array as an IDX file, gzip-compressed when `path` ends in .gz."""
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx stores uint8 arrays only, got {array.dtype}")
    header = struct.pack(f">HBB{array.ndim}I", 0, IDX_UBYTE_CODE, array.ndim, *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as stream:
        stream.write(header)
        stream.write(np.ascontiguousarray(array).tobytes())


def default_data_dir() -> Path:
    """$FASTVAE_DATA if set, else $XDG_CACHE_HOME/fastvae, else ~/.cache/fastvae."""
    if os.environ.get("FASTVAE_DATA"):
        return Path(os.environ["FASTVAE_DATA"]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "fastvae"


def _file_state_key(path: Path) -> tuple[str, int, int]:
    """Path, size and mtime of a file: a cheap stand-in for its content when memoising md5s."""
    resolved = path.resolve()
    state = resolved.stat()
    return (str(resolved), state.st_size, state.st_mtime_ns)


def raw_md5(path: str | os.PathLike, raw: bytes | None = None, limit: int | None = None) -> str:
    """MD5 of the decompressed content of `path`, memoised by path, size and mtime.

    Pass `raw` when the content is already in memory to avoid reading it again; `limit`
    refuses content larger than that many bytes.
    """
    path = Path(path)
    key = _file_state_key(path)
    if key not in _md5_by_file_state:
        digest = hashlib.md5()
        for chunk in [raw] if raw is not None else _read_chunks(path, limit):
            digest.update(chunk)
        _md5_by_file_state[key] = digest.hexdigest()
    return _md5_by_file_state[key]


def _owner(md5: str) -> str | None:
    """The registered dataset one of whose files hashes to `md5`, or None."""
    for name, spec in DATASETS.items():
        if any(idx_file.md5 == md5 for idx_file in spec.files):
            return name
    return None


class ForeignFile(DataError):
    """A good file of another registered dataset, where this one's was looked for."""


def _verify(path: Path, idx_file: IdxFile, raw: bytes | None = None) -> None:
    """Raise DataError unless the decompressed content of `path` is `idx_file`'s."""
    expected = idx_file.md5
    found = raw_md5(path, raw, idx_file.size)
    if found != expected and _owner(found):
        raise ForeignFile(
            f"{path} is a good file of the {_owner(found)} dataset, not the one asked for: keep "
            f"it, and give each dataset its own folder ({FOLDER_ADVICE})"
        )
    if found != expected:
        raise DataError(
            f"{path} has the wrong checksum (expected md5 {expected} of the decompressed data, found {found}): "
            f"{REDOWNLOAD_ADVICE}"
        )


def _locate(folder: Path, idx_file: IdxFile) -> Path | None:
    """The path of `idx_file` in `folder`, uncompressed or .gz, or None if absent."""
    for candidate in (folder / idx_file.name, folder / f"{idx_file.name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_advice(spec: DatasetSpec) -> str:
    """What to tell a user whose dataset files cannot be found or fetched."""
    advice = FOLDER_ADVICE
    if spec.install_hint:
        advice += f", or {spec.install_hint}"
    return advice


def _download_url(url: str, destination: Path, label: str) -> None:
    """Copy `url` to `destination` with a byte progress bar, failing on a short transfer."""
    request = urllib.request.Request(url, headers={"User-Agent": "fastvae"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        expected = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with open(destination, "wb") as sink, tqdm(
            total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=label
        ) as progress:
            while chunk := response.read(CHUNK_BYTES):
                sink.write(chunk)
                received += len(chunk)
                progress.update(len(chunk))
    if expected is not None and received < expected:
        raise OSError(f"transfer stopped after {received} of {expected} bytes")


def _temporary_file(folder: Path, name: str) -> Path:
    """A new empty file in `folder` to download into before renaming, or a DataError if unwritable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, part_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part.gz", dir=folder)
    except OSError as error:
        raise DataError(
            f"cannot write to {folder} to download the dataset ({error}): "
            "pass `data_dir` or set FASTVAE_DATA to a writable folder or to one that has the files"
        ) from error
    os.close(handle)
    return Path(part_path)


def _mirror_failure(url: str, part: Path, idx_file: IdxFile) -> str | None:
    """Why downloading `url` into `part` gave no verified copy of `idx_file`, or None if it did."""
    try:
        _download_url(url, part, f"{idx_file.name}.gz")
        found = raw_md5(part, limit=idx_file.size)
    except (OSError, http.client.HTTPException, ValueError) as error:
        return str(error)
    except DataError as error:
        return f"the download is not a good gzip file of it ({error})"
    if found != idx_file.md5:
        return f"checksum mismatch: expected md5 {idx_file.md5}, found {found}"
    return None


def _fetch(idx_file: IdxFile, folder: Path, mirrors: Sequence[str], dataset: str, spec: DatasetSpec) -> Path:
    """Download `idx_file`.gz into `folder` from the first mirror whose copy verifies."""
    file_name = f"{idx_file.name}.gz"
    target = folder / file_name
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + file_name
        part = _temporary_file(folder, idx_file.name)
        failure = _mirror_failure(url, part, idx_file)
        if failure is None:
            os.replace(part, target)
            _md5_by_file_state[_file_state_key(target)] = idx_file.md5
            return target
        part.unlink(missing_ok=True)
        failures.append(f"{url} ({failure})")
    tried = "; ".join(failures) or "no mirrors configured"
    raise DataError(
        f"could not download {file_name} for {dataset} into {folder} (tried: {tried}): "
        f"check the network, or {_missing_advice(spec)}"
    )


def find_or_fetch(
    dataset: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    verify: bool = True,
    files: Sequence[IdxFile] | None = None,
) -> Path:
    """The folder holding the files of `dataset` (`files`, default all four), downloading
    missing ones into `data_dir`.

    A folder that already has every file is used as is; `verify` checks their md5s (once per
    process), and a folder holding another dataset's files is passed over for the next one.
    """
    spec = _dataset_spec(dataset)
    wanted = tuple(spec.files if files is None else files)
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    foreign = None
    for candidate in (folder, *map(Path, spec.local_dirs)):
        found = [_locate(candidate, idx_file) for idx_file in wanted]
        if not all(found):
            continue
        try:
            for path, idx_file in zip(found, wanted if verify else ()):
                _verify(path, idx_file)
        except ForeignFile as error:
            foreign = foreign or error
            continue
        return candidate
    if foreign is not None:
        raise DataError(f"no {dataset} files found; {foreign}"
                        + (f", or {spec.install_hint}" if spec.install_hint else ""))
    missing = [idx_file for idx_file in spec.files if _locate(folder, idx_file) is None]
    if not download:
        names = ", ".join(f"{idx_file.name}[.gz]" for idx_file in missing)
        raise DataError(
            f"{dataset} files missing from {folder}: {names}; {_missing_advice(spec)}, or allow downloading"
        )
    for idx_file in missing:
        _fetch(idx_file, folder, spec.mirrors if mirrors is None else mirrors, dataset, spec)
    if verify:
        for idx_file in wanted:
            _verify(_locate(folder, idx_file), idx_file)
    return folder


def _load_verified(path: Path, idx_file: IdxFile) -> np.ndarray:
    """The array in `path`, after checking its md5 from the same single read."""
    raw = _read_bytes(path, idx_file.size)
    _verify(path, idx_file, raw)
    return _parse_idx(raw, path)


def load_split(
    dataset: str = "mnist",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Verified images (N, 28, 28) and labels (N,) of one split, both uint8; `limit` keeps the first N."""
    spec = _dataset_spec(dataset)
    files = spec.split(split)
    folder = find_or_fetch(dataset, data_dir, download, files=(files.images, files.labels))
    images = _load_verified(_locate(folder, files.images), files.images)
    labels = _load_verified(_locate(folder, files.labels), files.labels)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{dataset} {split} files in {folder} have shapes {images.shape} and {labels.shape}, "
            "not (N, rows, cols) images and (N,) labels: check that the image and label files are not swapped"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{dataset} {split} files in {folder} disagree: {images.shape[0]} images but {labels.shape[0]} labels: "
            "delete both files and run again to re-download, or replace them with a matching pair"
        )
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        images, labels = images[:limit].copy(), labels[:limit].copy()
    return images, labels


def to_unit_float(images_uint8: np.ndarray, xp=np, dtype="float32"):
    """Images as (N, pixels) floats in [0, 1], converted on the host then moved once with `xp.asarray`."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise TypeError(f"to_unit_float expects uint8 images, got {images.dtype}")
    flat = images.reshape(images.shape[0], -1).astype(dtype)
    np.divide(flat, 255, out=flat)
    return xp.asarray(flat)


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """How many batches `iterate_batches` yields for `n` rows."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def _array_module(data):
    """The array module of `data` (numpy, cupy, ...), so batch indices can live where the data lives.

    CuPy before v14 has no `__array_namespace__`, hence the fallback to the package defining its type.
    """
    if hasattr(data, "__array_namespace__"):
        return data.__array_namespace__()
    package = sys.modules.get(type(data).__module__.partition(".")[0])
    return package if hasattr(package, "asarray") else np


def iterate_batches(data, batch_size: int, rng: np.random.Generator, shuffle: bool = True, drop_last: bool = True):
    """Row batches of `data` (N, D) covering each row once, in an order drawn from `rng` when shuffling.

    The permutation is drawn on the host and moved to the data's device once per epoch.
    """
    n = data.shape[0]
    count = num_batches(n, batch_size, drop_last)
    if not shuffle:
        for start in range(0, count * batch_size, batch_size):
            yield data[start : start + batch_size]
        return
    order = _array_module(data).asarray(rng.permutation(n))
    for start in range(0, count * batch_size, batch_size):
        yield data[order[start : start + batch_size]]
