"""A digit classifier built from fastvae's own layers: the measuring instrument of `evaluate`.

An MLP (784-512-256-10, ReLU) trained with softmax cross-entropy and Adam. Its accuracy on a
model's reconstructions says whether they keep the digit's identity, and its penultimate-layer
activations (256 numbers per image) are the feature space of the Fréchet and kernel distances
in `fastvae.evaluate` (MNIST's stand-in for the Inception network of FID and KID).

Training is seeded, so the same settings give the same classifier (up to floating-point
rounding of the backend); `load_or_train_classifier` trains it once and caches the weights as
`classifier-<hash of the settings>.npz` in the user's cache folder.

Softmax cross-entropy is not one of the kernel table's ops: it is written here with the
backend's array module `xp` (a handful of whole-array expressions per batch of 10 logits, cheap
next to the matrix products), so every backend runs it without a new kernel.
"""
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastvae import archive
from fastvae.backend import resolve
from fastvae.data import to_unit_float
from fastvae.errors import CheckpointError
from fastvae.layers import Buffers, pack_parameters
from fastvae.model import mlp
from fastvae.optim import Adam
from fastvae.state import TrainState

FORMAT = "fastvae-classifier"
VERSION = 1
NUM_CLASSES = 10


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything that decides the trained weights; its hash names the cache file."""

    dataset: str = "mnist"
    widths: tuple = (512, 256)   # hidden layers (ReLU); the last one is the feature layer
    epochs: int = 10             # passes over the training set
    batch_size: int = 128
    lr: float = 1e-3             # Adam, cosine-decayed to 0 over the run
    seed: int = 0
    dtype: str = "float32"

    def key(self):
        """A short hash of the settings (and the format version), for the cache file name."""
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def softmax_cross_entropy(logits, labels, xp, grad_out=None):
    """Mean over the batch of -log softmax(logits)[label], and its gradient at the logits.

    `labels` are integer class indices (an `xp` array). The gradient, (softmax - one_hot) / n,
    goes into `grad_out` when given. log-sum-exp is shifted by each row's maximum, so large
    logits neither overflow nor lose the small probabilities.
    """
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].sum(dtype=np.float64) / n
    if grad_out is None:
        grad_out = xp.empty_like(logits)
    xp.exp(log_probs, out=grad_out)
    grad_out[rows, labels] -= 1
    grad_out /= n
    return loss, grad_out


def as_float_images(images, image_size=784):
    """Images as (N, image_size) floats in [0, 1]: uint8 is divided by 255, floats kept."""
    images = np.asarray(images)
    flat = images.reshape(len(images), -1)
    if flat.shape[1] != image_size:
        raise ValueError(f"images have {flat.shape[1]} pixels, the classifier expects {image_size}")
    if images.dtype == np.uint8:
        return to_unit_float(flat)
    return flat


class Classifier:
    """An MLP digit classifier; `predict` and `features` take NumPy images, return NumPy."""

    def __init__(self, settings=None, backend=None, image_size=784, rng=None):
        self.settings = settings or ClassifierSettings()
        self.backend = resolve(backend, dtype=self.settings.dtype)
        self.image_size = image_size
        rng = rng if rng is not None else np.random.default_rng(self.settings.seed)
        sizes = (image_size,) + tuple(self.settings.widths) + (NUM_CLASSES,)
        self.network = mlp(sizes, "relu", "he", rng, self.backend)
        self.feature_tap = f"hidden{len(self.settings.widths) - 1}"   # the last hidden layer
        params, grads = pack_parameters(self.network.linears(), self.backend)
        self.params, self.grads = {"network": params}, {"network": grads}
        self.info = {}   # training facts: seconds, test accuracy, backend
        self._buffers = Buffers(self.backend)

    def compute_gradients(self, x, labels):
        """Softmax cross-entropy of batch `x` (backend array) against integer `labels` (an
        `xp` array), leaving its gradient in `grads`; returns {"loss": 0-d array}."""
        logits = self.network.forward(x)
        grad = self._buffers.get("grad_logits", logits.shape)
        loss, _ = softmax_cross_entropy(logits, labels, self.backend.xp, grad_out=grad)
        self.network.backward(grad, input_grad=False)
        return {"loss": loss}

    def __repr__(self):
        return f"Classifier({self.network!r})"

    def _forward(self, images, batch_size=2000):
        """(logits, features) of each batch of `images`, as NumPy arrays (copies)."""
        images = as_float_images(images, self.image_size)
        for start in range(0, len(images), batch_size):
            batch = self.backend.asarray(images[start:start + batch_size])
            logits, taps = self.network.forward(batch, keep=(self.feature_tap,))
            features = taps[self.feature_tap]
            yield self.backend.to_numpy(logits), self.backend.to_numpy(features)

    def logits(self, images):
        """Unnormalised class scores, (N, 10)."""
        return np.concatenate([logits for logits, _ in self._forward(images)] or
                              [np.empty((0, NUM_CLASSES))])

    def probabilities(self, images):
        """Softmax of the class scores, (N, 10) float64 (shifted by the row maximum)."""
        logits = self.logits(images).astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, images):
        """The most likely digit of each image, (N,) int64."""
        return np.argmax(self.logits(images), axis=1)

    def accuracy(self, images, labels):
        """Fraction of `images` whose predicted digit is the label."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def features(self, images):
        """Penultimate-layer activations (after ReLU), (N, widths[-1]) float64."""
        width = self.settings.widths[-1]
        return np.concatenate([f.astype(np.float64) for _, f in self._forward(images)] or
                              [np.empty((0, width))])

    # ----- persistence -----

    def save(self, path):
        """Write the weights and settings to `path` atomically (one .npz)."""
        header = {"format": FORMAT, "version": VERSION, "settings": asdict(self.settings),
                  "image_size": self.image_size, "info": self.info}
        archive.write(path, header, {"params": self.backend.to_numpy(self.params["network"])})

    @classmethod
    def load(cls, path, backend=None):
        """A classifier restored from `path`; CheckpointError if the file is not a good one."""
        header, arrays = archive.read(path, kind="classifier")
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise CheckpointError(f"{path} is not a version-{VERSION} fastvae classifier")
        params = arrays.get("params", np.empty(0))
        settings = header["settings"]
        settings = ClassifierSettings(**{**settings, "widths": tuple(settings["widths"])})
        classifier = cls(settings, backend, header["image_size"])
        flat = classifier.params["network"]
        if params.shape != flat.shape:
            raise CheckpointError(f"{path} holds {params.size} parameters, expected "
                                  f"{flat.size}")
        flat[...] = classifier.backend.asarray(params)
        classifier.info = header.get("info", {})
        return classifier


def train_classifier(images, labels, epochs=10, seed=0, backend=None, *, batch_size=128,
                     lr=1e-3, widths=(512, 256), dataset="mnist", dtype="float32",
                     progress=False):
    """Train a Classifier on `images` (uint8, or floats in [0, 1]) and integer `labels`.

    Adam (betas 0.9, 0.999) with a cosine learning-rate decay from `lr` to 0 over all steps;
    the initial weights and the data order are drawn from `seed`. Returns the Classifier.
    """
    settings = ClassifierSettings(dataset=dataset, widths=tuple(widths), epochs=epochs,
                                  batch_size=batch_size, lr=lr, seed=seed, dtype=dtype)
    init_seed, order_seed = np.random.SeedSequence(seed).spawn(2)
    model = Classifier(settings, backend, rng=np.random.default_rng(init_seed))
    be, xp = model.backend, model.backend.xp
    images = as_float_images(images, model.image_size)
    labels = np.asarray(labels).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if len(images) < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} images")
    x_all, y_all = be.asarray(images), xp.asarray(labels)
    optimizer = Adam(model.params["network"], model.grads["network"], lr=lr,
                     betas=(0.9, 0.999), backend=be)
    state = TrainState(model, {"network": optimizer}, clip_grad_norm=0.0)
    order_rng = np.random.default_rng(order_seed)
    steps_per_epoch = len(images) // batch_size
    total_steps, step = epochs * steps_per_epoch, 0
    started = time.perf_counter()
    for epoch in range(epochs):
        order = xp.asarray(order_rng.permutation(len(images)))
        loss_sum = 0.0  # summed where the loss lives: one host read per epoch
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            index = order[start:start + batch_size]
            optimizer.lr = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss_sum = loss_sum + state.step(x_all[index], y_all[index])["loss"]
            step += 1
        if progress:
            mean_loss = float(loss_sum) / steps_per_epoch
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}")
    model.info = {"train_seconds": time.perf_counter() - started, "backend": be.name,
                  "train_images": len(images)}
    return model


def default_cache_dir():
    """$FASTVAE_CACHE, else $XDG_CACHE_HOME/fastvae, else ~/.cache/fastvae.

    Never the dataset folder: that may be shared between users or read-only.
    """
    if os.environ.get("FASTVAE_CACHE"):
        return Path(os.environ["FASTVAE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastvae"


def cache_path(settings, folder=None):
    """Where the classifier trained with `settings` is cached in `folder` (default: the cache)."""
    folder = Path(folder).expanduser() if folder is not None else default_cache_dir()
    return folder / f"classifier-{settings.key()}.npz"


def load_or_train_classifier(data_dir=None, dataset="mnist", epochs=10, seed=0, backend=None,
                             *, cache_dir=None, download=True, progress=False, **settings):
    """The classifier for `dataset` with these settings: from the cache, else trained and cached.

    The cache file is `<cache_dir or default_cache_dir()>/classifier-<hash>.npz`, written
    atomically, so concurrent runs never see half a file; where the folder is not writable the
    classifier is used without caching and a warning says so. The backend is not part of the
    hash: backends differ only by rounding. `settings` are the other ClassifierSettings fields
    (batch_size, lr, widths, dtype).
    """
    from fastvae import data
    if "widths" in settings:
        settings["widths"] = tuple(settings["widths"])
    wanted = ClassifierSettings(dataset=dataset, epochs=epochs, seed=seed, **settings)
    path = cache_path(wanted, cache_dir)
    if path.is_file():
        try:
            return Classifier.load(path, backend)
        except CheckpointError as error:
            warnings.warn(f"ignoring the classifier cache {path}: {error}; retraining",
                          stacklevel=2)
    train_x, train_y = data.load_split(dataset, "train", data_dir, download)
    if progress:
        print(f"training the {dataset} digit classifier ({epochs} epochs, once: it is cached "
              f"as {path})")
    test_x, test_y = data.load_split(dataset, "test", data_dir, download)
    model = train_classifier(train_x, train_y, backend=backend, progress=progress,
                             **{k: v for k, v in asdict(wanted).items()})
    model.info["test_accuracy"] = model.accuracy(test_x, test_y)
    try:
        model.save(path)
        model.info["cache"] = str(path)
    except OSError as error:
        warnings.warn(f"could not cache the classifier ({error}); it will be trained again "
                      "next time", stacklevel=2)
    return model
