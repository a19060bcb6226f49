import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # the tests' own helpers (kernel_asserts)

MNIST_DIR = Path(os.environ.get("FASTVAE_TEST_DATA",
                                Path(__file__).resolve().parents[2] / "shared/data/mnist"))


@pytest.fixture(scope="session")
def mnist_dir():
    """The folder with the real MNIST files (FASTVAE_TEST_DATA, default ../shared/data/mnist)."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found in {MNIST_DIR} (set FASTVAE_TEST_DATA)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist_subset(mnist_dir):
    """The first 2,000 training images as (2000, 784) float64 in [0, 1]."""
    from fastvae import data
    images, _ = data.load_split("mnist", "train", mnist_dir, download=False, limit=2000)
    return data.to_unit_float(images, dtype="float64")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Caches (the digit classifier) go to a temporary folder, never the user's home."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("FASTVAE_CACHE")
    os.environ["FASTVAE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FASTVAE_CACHE")
    else:
        os.environ["FASTVAE_CACHE"] = previous
