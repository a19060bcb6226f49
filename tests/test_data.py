"""Tests for fastvae.data: IDX files, checksums, downloads from local mirrors, and batching."""

import functools
import gzip
import hashlib
import http.server
import os
import struct
import sys
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from fastvae import data

REAL_MNIST_DIR = Path(os.environ.get("FASTVAE_TEST_DATA", Path(__file__).parents[2] / "shared/data/mnist"))
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TINY_SPLIT_SIZES = {"train": 6, "test": 4}


def has_idx_files(folder: Path, *names: str) -> bool:
    """Whether `folder` holds every named IDX file, compressed or not."""
    return all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in names)


needs_real_mnist = pytest.mark.skipif(
    not has_idx_files(REAL_MNIST_DIR, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    reason=f"real MNIST not found in {REAL_MNIST_DIR} (set FASTVAE_TEST_DATA)",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, built independently of data.write_idx."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.tobytes()


def write_tiny_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> data.SplitFiles:
    """Write one split's two .gz files into `folder` and describe them with their raw md5s."""
    files = []
    for kind, array, rank in (("images", images, 3), ("labels", labels, 1)):
        name = f"{prefix}-{kind}-idx{rank}-ubyte"
        data.write_idx(folder / f"{name}.gz", array)
        files.append(data.IdxFile(name, hashlib.md5(idx_bytes(array)).hexdigest()))
    return data.SplitFiles(*files)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny four-file dataset registered as "tiny", its .gz files in `source`, with no mirrors."""
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    source.mkdir()
    arrays, splits = {}, {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n = TINY_SPLIT_SIZES[split]
        arrays[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        splits[split] = write_tiny_split(source, prefix, *arrays[split])
    spec = data.DatasetSpec(train=splits["train"], test=splits["test"], mirrors=())
    monkeypatch.setitem(data.DATASETS, "tiny", spec)
    return SimpleNamespace(source=source, spec=spec, arrays=arrays)


@pytest.fixture
def http_mirror(tiny, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving the tiny dataset's folder; yields its URL and the paths requested."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    requested = []

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=tiny.source))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}/", requested=requested)
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 28, 28)])
def test_idx_round_trip(tmp_path, suffix, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"array-idx{len(shape)}-ubyte{suffix}"
    data.write_idx(path, array)
    loaded = data.read_idx(path)
    assert loaded.dtype == np.uint8 and loaded.shape == shape
    np.testing.assert_array_equal(loaded, array)


def test_write_idx_uses_the_idx_layout(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data.write_idx(tmp_path / "raw", array)
    data.write_idx(tmp_path / "packed.gz", array)
    expected = bytes.fromhex("00000803" "00000002" "00000003" "00000004") + bytes(range(24))
    assert (tmp_path / "raw").read_bytes() == expected
    assert gzip.decompress((tmp_path / "packed.gz").read_bytes()) == expected


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(data.DataError, match="wrong magic number 0x12340801"):
        data.read_idx(path)


def test_unsupported_dtype_code(tmp_path):
    path = tmp_path / "floats"
    path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4)
    with pytest.raises(data.DataError, match="unsupported dtype code 0x0d"):
        data.read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_chopped_payload_is_truncated(tmp_path, suffix):
    raw = idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))[:-100]
    path = tmp_path / f"images{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(data.DataError, match=r"truncated \(expected 3920 bytes of data .* got 3820\)"):
        data.read_idx(path)


def test_chopped_gzip_stream_is_truncated(tmp_path):
    path = tmp_path / "images.gz"
    packed = gzip.compress(idx_bytes(np.arange(3000, dtype=np.uint32).astype(np.uint8)))
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(path)


def test_extra_data_is_rejected(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.arange(4, dtype=np.uint8)) + b"\x00\x00")
    with pytest.raises(data.DataError, match="2 bytes of extra data"):
        data.read_idx(path)


def test_corrupt_gzip(tmp_path):
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(idx_bytes(np.arange(4, dtype=np.uint8)))
    bad_crc = tmp_path / "bad-crc.gz"
    packed = bytearray(gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8))))
    packed[-8] ^= 0xFF
    bad_crc.write_bytes(bytes(packed))
    for path in (not_gzip, bad_crc):
        with pytest.raises(data.DataError, match="not a valid gzip file"):
            data.read_idx(path)


def test_tampered_file_fails_checksum(tiny):
    labels_path = tiny.source / "t10k-labels-idx1-ubyte.gz"
    tampered = tiny.arrays["test"][1].copy()
    tampered[0] = (tampered[0] + 1) % 10
    data.write_idx(labels_path, tampered)
    found = hashlib.md5(idx_bytes(tampered)).hexdigest()
    expected = tiny.spec.test.labels.md5
    with pytest.raises(data.DataError) as error:
        data.load_split("tiny", "test", data_dir=tiny.source, download=False)
    message = str(error.value)
    assert str(labels_path) in message and expected in message and found in message
    assert "re-download" in message
    with pytest.raises(data.DataError, match="wrong checksum"):
        data.find_or_fetch("tiny", tiny.source, download=False)


def test_image_and_label_counts_must_agree(tiny, monkeypatch):
    short_labels = np.zeros(3, dtype=np.uint8)
    test_files = write_tiny_split(tiny.source, "t10k", tiny.arrays["test"][0], short_labels)
    monkeypatch.setitem(data.DATASETS, "tiny", data.DatasetSpec(train=tiny.spec.train, test=test_files, mirrors=()))
    with pytest.raises(data.DataError, match="4 images but 3 labels"):
        data.load_split("tiny", "test", data_dir=tiny.source, download=False)


def test_load_split_reads_gz_and_uncompressed_files(tiny, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    for gz_path in tiny.source.glob("*.gz"):
        (raw_dir / gz_path.stem).write_bytes(gzip.decompress(gz_path.read_bytes()))
    for folder in (tiny.source, raw_dir):
        images, labels = data.load_split("tiny", "train", data_dir=folder, download=False)
        np.testing.assert_array_equal(images, tiny.arrays["train"][0])
        np.testing.assert_array_equal(labels, tiny.arrays["train"][1])
    images, labels = data.load_split("tiny", "train", data_dir=raw_dir, download=False, limit=2)
    assert images.shape == (2, 28, 28) and labels.shape == (2,)


@needs_real_mnist
def test_real_mnist_test_split():
    images, labels = data.load_split("mnist", "test", data_dir=REAL_MNIST_DIR, download=False)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels.max() <= 9
    assert np.bincount(labels).tolist() == MNIST_TEST_CLASS_COUNTS
    assert images.max() == 255 and 0.1 < images.mean() / 255 < 0.15
    first, first_labels = data.load_split("mnist", "test", data_dir=REAL_MNIST_DIR, download=False, limit=5)
    np.testing.assert_array_equal(first, images[:5])
    assert first_labels.tolist() == [7, 2, 1, 0, 4]


@pytest.mark.parametrize(
    "dataset, folder",
    [("mnist", REAL_MNIST_DIR), ("fashion-mnist", SYSTEM_FASHION_DIR)],
)
def test_hard_coded_checksums_match_real_files(dataset, folder):
    spec = data.DATASETS[dataset]
    if not has_idx_files(folder, *(idx_file.name for idx_file in spec.files)):
        pytest.skip(f"{dataset} not found in {folder}")
    assert data.find_or_fetch(dataset, folder, download=False) == folder


def test_fashion_mnist_found_in_system_folder(tmp_path):
    if not has_idx_files(SYSTEM_FASHION_DIR, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        pytest.skip("dataset-fashion-mnist is not installed")
    images, labels = data.load_split("fashion-mnist", "test", data_dir=tmp_path / "empty", download=False)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_download_over_http_falls_back_to_second_mirror(tiny, http_mirror, tmp_path, capsys):
    cache = tmp_path / "cache"
    mirrors = [http_mirror.url + "missing/", http_mirror.url]
    assert data.find_or_fetch("tiny", cache, mirrors=mirrors) == cache
    assert sorted(path.name for path in cache.iterdir()) == sorted(path.name for path in tiny.source.iterdir())
    for path in cache.iterdir():
        assert path.read_bytes() == (tiny.source / path.name).read_bytes()
    assert http_mirror.requested[:2] == ["/missing/train-images-idx3-ubyte.gz", "/train-images-idx3-ubyte.gz"]
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err
    images, labels = data.load_split("tiny", "test", data_dir=cache, download=False)
    np.testing.assert_array_equal(images, tiny.arrays["test"][0])


def test_download_from_file_urls_skips_a_mirror_with_bad_checksums(tiny, tmp_path, monkeypatch):
    bad_mirror = tmp_path / "bad-mirror"
    bad_mirror.mkdir()
    for gz_path in tiny.source.glob("*.gz"):
        data.write_idx(bad_mirror / gz_path.name, np.zeros(1, dtype=np.uint8))
    spec = data.DatasetSpec(
        train=tiny.spec.train, test=tiny.spec.test, mirrors=(bad_mirror.as_uri(), tiny.source.as_uri())
    )
    monkeypatch.setitem(data.DATASETS, "tiny", spec)
    cache = tmp_path / "cache"
    images, labels = data.load_split("tiny", "train", data_dir=cache)
    np.testing.assert_array_equal(labels, tiny.arrays["train"][1])
    assert len(list(cache.glob("*.gz"))) == 4
    assert not list(cache.glob(".*"))


def test_all_mirrors_failing_names_them_and_the_way_out(tiny, http_mirror, tmp_path):
    cache = tmp_path / "cache"
    mirrors = [(tmp_path / "nowhere").as_uri(), http_mirror.url + "missing/"]
    with pytest.raises(data.DataError) as error:
        data.find_or_fetch("tiny", cache, mirrors=mirrors)
    message = str(error.value)
    assert all(mirror in message for mirror in mirrors)
    assert "FASTVAE_DATA" in message and "`data_dir`" in message
    assert list(cache.iterdir()) == []


def test_missing_files_without_download(tiny, tmp_path):
    with pytest.raises(data.DataError, match="missing from .*t10k-labels-idx1-ubyte.*FASTVAE_DATA"):
        data.load_split("tiny", "test", data_dir=tmp_path, download=False)


def test_fashion_mnist_errors_suggest_the_debian_package(tmp_path, monkeypatch):
    fashion = data.DATASETS["fashion-mnist"]
    without_system_copy = data.DatasetSpec(fashion.train, fashion.test, mirrors=(), install_hint=fashion.install_hint)
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", without_system_copy)
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.find_or_fetch("fashion-mnist", tmp_path, download=False)


def test_unknown_dataset_and_split():
    with pytest.raises(data.DataError, match="unknown dataset 'cifar'.*fashion-mnist, mnist"):
        data.find_or_fetch("cifar")
    with pytest.raises(data.DataError, match="unknown split 'valid'"):
        data.load_split("mnist", "valid")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTVAE_DATA", str(tmp_path / "chosen"))
    assert data.default_data_dir() == tmp_path / "chosen"
    monkeypatch.delenv("FASTVAE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "fastvae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_data_dir() == tmp_path / "home" / ".cache" / "fastvae"


def test_checksums_are_memoised_per_file_state(tiny, monkeypatch):
    path = tiny.source / "train-labels-idx1-ubyte.gz"
    first = data.raw_md5(path)
    assert first == tiny.spec.train.labels.md5
    real_read_chunks = data._read_chunks
    monkeypatch.setattr(data, "_read_chunks", lambda path: pytest.fail("hashed the same file twice"))
    assert data.raw_md5(path) == first
    os.utime(path, ns=(0, 0))
    monkeypatch.setattr(data, "_read_chunks", real_read_chunks)
    assert data.raw_md5(path) == first


def test_to_unit_float_scales_to_unit_range():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    flat = data.to_unit_float(images)
    assert flat.dtype == np.float32 and flat.shape == (1, 4)
    np.testing.assert_array_equal(flat, np.array([[0.0, 1.0, 0.2, 0.4]], dtype=np.float32))
    assert data.to_unit_float(images, dtype="float64").dtype == np.float64
    with pytest.raises(TypeError, match="uint8"):
        data.to_unit_float(flat)


def test_to_unit_float_moves_the_whole_set_once():
    moved = []
    fake_device = SimpleNamespace(asarray=lambda host: moved.append(host) or "on device")
    assert data.to_unit_float(np.zeros((3, 28, 28), np.uint8), xp=fake_device) == "on device"
    assert len(moved) == 1 and isinstance(moved[0], np.ndarray) and moved[0].shape == (3, 784)


def rows_seen(batches) -> list[int]:
    """The first column of every row in `batches`, which the tests set to the row's index."""
    return [int(row) for batch in batches for row in batch[:, 0]]


def test_iterate_batches_covers_each_row_once_per_epoch():
    rows = np.arange(10)[:, None] * np.ones((1, 3), dtype=np.int64)
    rng = np.random.default_rng(3)
    batches = list(data.iterate_batches(rows, 3, rng, drop_last=False))
    assert [len(batch) for batch in batches] == [3, 3, 3, 1]
    assert sorted(rows_seen(batches)) == list(range(10))
    assert rows_seen(batches) != list(range(10))
    dropped = list(data.iterate_batches(rows, 3, rng))
    assert [len(batch) for batch in dropped] == [3, 3, 3]
    assert len(set(rows_seen(dropped))) == 9
    assert rows_seen(data.iterate_batches(rows, 4, rng, shuffle=False, drop_last=False)) == list(range(10))


def test_iterate_batches_same_seed_same_order():
    rows = np.arange(50)[:, None]
    orders = [rows_seen(data.iterate_batches(rows, 8, np.random.default_rng(seed))) for seed in (7, 7, 8)]
    assert orders[0] == orders[1] != orders[2]


class DeviceArray:
    """A stand-in for a GPU array without __array_namespace__, as in CuPy before v14."""

    def __init__(self, host):
        self.host = host
        self.shape = host.shape

    def __getitem__(self, index):
        assert isinstance(index, (DeviceArray, slice)), "indices must be moved to the device"
        return DeviceArray(self.host[index.host if isinstance(index, DeviceArray) else index])


def test_iterate_batches_moves_the_permutation_to_the_device_once(monkeypatch):
    transfers = []
    device_module = ModuleType("fakedevice")
    device_module.asarray = lambda host: transfers.append(host) or DeviceArray(np.asarray(host))
    monkeypatch.setitem(sys.modules, "fakedevice", device_module)
    monkeypatch.setattr(DeviceArray, "__module__", "fakedevice._core")
    rows = DeviceArray(np.arange(12)[:, None])
    batches = list(data.iterate_batches(rows, 5, np.random.default_rng(0)))
    assert len(transfers) == 1 and sorted(transfers[0].tolist()) == list(range(12))
    assert [batch.host[:, 0].tolist() for batch in batches] == [transfers[0][:5].tolist(), transfers[0][5:10].tolist()]


def test_num_batches():
    assert data.num_batches(10, 3) == 3
    assert data.num_batches(10, 3, drop_last=False) == 4
    assert data.num_batches(9, 3, drop_last=False) == 3
    assert data.num_batches(2, 3) == 0
    with pytest.raises(ValueError):
        data.num_batches(10, 0)


def test_another_datasets_good_files_are_passed_over_not_condemned(tiny, tmp_path, monkeypatch):
    """MNIST files where Fashion-MNIST was asked for: named as such, never "delete it", and
    the dataset's own package folder is tried next."""
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(1)
    splits = {prefix: write_tiny_split(other, prefix, rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
                                       rng.integers(0, 10, 3, dtype=np.uint8))
              for prefix in ("train", "t10k")}
    monkeypatch.setitem(data.DATASETS, "other", data.DatasetSpec(
        train=splits["train"], test=splits["t10k"], mirrors=(), local_dirs=(str(other),)))
    images, _ = data.load_split("other", "test", data_dir=tiny.source, download=False)
    assert images.shape == (3, 28, 28)                  # tiny's folder skipped, the package one used
    monkeypatch.setitem(data.DATASETS, "other", data.DatasetSpec(
        train=splits["train"], test=splits["t10k"], mirrors=(), install_hint="install it"))
    for call in (lambda: data.load_split("other", "test", data_dir=tiny.source),
                 lambda: data.find_or_fetch("other", tiny.source)):
        with pytest.raises(data.DataError) as error:
            call()
        message = str(error.value)
        assert "a good file of the tiny dataset" in message and "install it" in message
        assert "delete" not in message and "checksum" not in message


def test_a_gzip_bomb_is_refused_without_inflating_it(tiny, monkeypatch):
    """A .gz that decompresses past its file's known size stops being read there."""
    labels = tiny.source / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as stream:
        for _ in range(64):
            stream.write(bytes(1 << 20))                # 64 MiB of zeros, 64 KiB compressed
    spec = tiny.spec
    sized = data.SplitFiles(spec.test.images, data.IdxFile(spec.test.labels.name,
                                                           spec.test.labels.md5, 8 + 4))
    monkeypatch.setitem(data.DATASETS, "tiny", data.DatasetSpec(spec.train, sized, mirrors=()))
    chunks = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read",
                        lambda self, size=-1: chunks.append(size) or real_read(self, size))
    with pytest.raises(data.DataError, match="holds more than the 12 bytes its file has"):
        data.load_split("tiny", "test", data_dir=tiny.source, download=False)
    assert len(chunks) <= 2                             # one chunk read, not 64


def test_real_dataset_files_declare_their_sizes():
    for spec in data.DATASETS.values():
        assert [f.size for f in spec.files] == [47040016, 60008, 7840016, 10008]
