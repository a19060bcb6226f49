"""The array-module switch: which kernels, array module, dtype and random stream layers use.

A `Backend` is passed to every layer at construction; `set_backend` / `use_backend` choose the
default for code that does not pass one. The environment variable FASTVAE_BACKEND picks the
default at start-up ("numpy" otherwise). This is the one place the rest of fastvae reaches the
kernel table (`fastvae.kernels`) from, its activation table included.
"""
import contextlib
import os

import numpy as np

from fastvae import kernels
from fastvae.errors import BackendUnavailable, ConfigError, UnknownBackend

DTYPES = ("float32", "float64")
ACTIVATIONS = kernels.ACTIVATIONS   # names of the activations every backend computes
LEAKY_SLOPE = kernels.LEAKY_SLOPE


def load_kernels(name):
    """The kernel module of backend `name`; UnknownBackend or BackendUnavailable if none."""
    try:
        return kernels.load(name)
    except kernels.UnknownBackend as error:
        raise UnknownBackend(str(error)) from error
    except kernels.BackendUnavailable as error:
        raise BackendUnavailable(str(error)) from error


def to_numpy(array):
    """A NumPy copy of a host or device array (for saving, plotting and tests)."""
    return array.get() if hasattr(array, "get") else np.array(array)


class Backend:
    """Kernels of one backend plus the array module, dtype and random generator they work on."""

    def __init__(self, name="numpy", dtype="float32", seed=None, device_noise=True):
        if str(dtype) not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}",
                              "dtype")
        self.name = name
        self.ops = load_kernels(name)
        self.xp = self.ops.xp
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.device_rng = None  # a generator on the device, for backends that offer one
        if device_noise and hasattr(self.ops, "make_generator"):
            self.device_rng = self.ops.make_generator(seed)

    def __repr__(self):
        return f"Backend({self.name!r}, dtype={self.dtype.name!r})"

    def empty(self, shape):
        return self.xp.empty(shape, dtype=self.dtype)

    def zeros(self, shape):
        return self.xp.zeros(shape, dtype=self.dtype)

    def asarray(self, array):
        """A host or device array as this backend's array of its dtype (no copy if it is one)."""
        return self.xp.asarray(array, dtype=self.dtype)

    @staticmethod
    def to_numpy(array):
        """A NumPy copy of a backend array (for saving, plotting and tests)."""
        return to_numpy(array)

    def standard_normal(self, out):
        """Fill `out` with N(0, 1) noise: on the device where the backend can (no host copy in a
        training step), else from the host generator, whose stream all backends share."""
        if self.device_rng is not None:
            return self.ops.standard_normal(self.device_rng, out)
        if self.xp is np:
            self.rng.standard_normal(out=out, dtype=self.dtype)
        else:
            out[...] = self.xp.asarray(self.rng.standard_normal(out.shape, dtype=self.dtype))
        return out


_current = None


def available_backends():
    """Names of the backends that work on this machine."""
    return kernels.available()


def set_backend(name="numpy", dtype="float32", seed=None):
    """Make a new default backend and return it."""
    global _current
    _current = Backend(name, dtype, seed)
    return _current


def get_backend():
    """The default backend, made from FASTVAE_BACKEND on first use."""
    if _current is None:
        set_backend(os.environ.get("FASTVAE_BACKEND") or "numpy")  # set but empty: unset
    return _current


def resolve(backend=None, **settings):
    """A Backend from a Backend (used as it is), a name, or None: the default backend itself,
    or with `settings` (dtype, seed, device_noise) a new Backend of the default's kind."""
    if isinstance(backend, Backend):
        return backend
    if not backend and not settings:
        return get_backend()
    return Backend(backend or get_backend().name, **settings)


@contextlib.contextmanager
def use_backend(name="numpy", dtype="float32", seed=None):
    """Temporarily switch the default backend."""
    global _current
    previous = _current
    try:
        yield set_backend(name, dtype, seed)
    finally:
        _current = previous
