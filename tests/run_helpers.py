"""The tests' small training run: its settings, as flags, and a `fastvae train` subprocess."""
import subprocess
import sys
import time

SMALL = dict(train_limit=320, test_limit=64, batch_size=32, latent_dim=8,
             encoder_widths=(64, 32), decoder_widths=(32, 64), discriminator_widths=(64, 16))
SMALL_FLAGS = ["--train-limit", "320", "--test-limit", "64", "--batch-size", "32",
               "--latent-dim", "8", "--encoder-widths", "64", "32", "--decoder-widths", "32",
               "64", "--discriminator-widths", "64", "16"]


def train_process(run_dir, mnist_dir, epochs):
    """`fastvae train` of the small run into `run_dir`, started and left running."""
    argv = [sys.executable, "-m", "fastvae", "train", "--run-dir", str(run_dir), "--data-dir",
            str(mnist_dir), "--quiet", "--epochs", str(epochs), *SMALL_FLAGS]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout):
    """Wait until `path` exists, failing if `process` ends first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
