"""The array-module switch: which kernels, array module, dtype and random stream layers use.

A `Backend` is passed to every layer at construction; `set_backend` / `use_backend` choose the
default for code that does not pass one. The environment variable FASTVAE_BACKEND picks the
default at start-up, else `default_backend_name()`: the fastest one installed (cupy where a GPU
is visible, else numba, else the numpy reference). This is the one place the rest of fastvae
reaches the kernel table (`fastvae.kernels`) from, its activation table included.

The backend also carries the precision of the matrix products: "fp32", or "bf16" (bf16 inputs,
fp32 accumulation; weights, optimiser state, activations and losses stay fp32), which layers
see as `backend.bf16` and serve with the bf16 copies the kernels write (numpy_ref's docstring).
"""
import contextlib
import os

import numpy as np

from fastvae import kernels
from fastvae.errors import BackendUnavailable, ConfigError, UnknownBackend

DTYPES = ("float32", "float64")
PRECISIONS = ("fp32", "bf16")
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

    def __init__(self, name="numpy", dtype="float32", seed=None, device_noise=True,
                 precision="fp32"):
        if str(dtype) not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}",
                              "dtype")
        self.name = name
        self.ops = load_kernels(name)
        self.xp = self.ops.xp
        self.dtype = np.dtype(dtype)
        self.device = getattr(self.ops, "DEVICE", "cpu")
        self.precision = check_precision(name, self.ops, self.dtype, precision)
        self.bf16 = self.precision == "bf16"
        self.rng = np.random.default_rng(seed)
        self.device_rng = None  # a generator on the device, for backends that offer one
        if device_noise and hasattr(self.ops, "make_generator"):
            self.device_rng = self.ops.make_generator(seed)

    def __repr__(self):
        precision = ", precision='bf16'" if self.bf16 else ""
        return f"Backend({self.name!r}, dtype={self.dtype.name!r}{precision})"

    def _allocator(self, kind):
        """The kernel module's own `empty`/`zeros` (numba: huge pages), else the array module's."""
        own = getattr(self.ops, kind, None)
        if own is not None:
            return own
        return lambda shape, dtype: getattr(self.xp, kind)(shape, dtype=dtype)

    def empty(self, shape):
        return self._allocator("empty")(shape, self.dtype)

    def empty16(self, shape):
        """An uninitialised bf16 array (uint16 bits) for the kernels' bf16 copies."""
        return self._allocator("empty")(shape, np.uint16)

    def zeros(self, shape):
        return self._allocator("zeros")(shape, self.dtype)

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


def bf16_backends():
    """Names of the backends that compute bf16 products on this machine."""
    usable = []
    for name in kernels.available():
        reason = getattr(kernels.load(name), "bf16_unavailable_reason", None)
        if reason is not None and reason() is None:
            usable.append(name)
    return usable


def check_precision(name, ops, dtype, precision):
    """`precision` if backend `name` (kernels `ops`, arrays of `dtype`) can compute it, else a
    ConfigError or BackendUnavailable that says what to use instead."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: choose one of "
                          f"{', '.join(PRECISIONS)}", "precision")
    if precision == "fp32":
        return precision
    if np.dtype(dtype) != np.float32:
        raise ConfigError(f"`precision` bf16 mixes bf16 products into float32 training: "
                          f"use `dtype` float32, not {np.dtype(dtype).name}", "precision")
    why = getattr(ops, "bf16_unavailable_reason", None)
    reason = why() if why is not None else f"the {name} backend has no bf16 products"
    if reason:
        others = [other for other in bf16_backends() if other != name]
        hint = (f"; bf16 runs here on: {', '.join(others)}" if others else "") + \
            "; or use `precision` fp32"
        raise BackendUnavailable(f"`precision` bf16 is not available on backend {name!r}: "
                                 f"{reason}{hint}")
    return precision


def default_backend_name():
    """The fastest backend installed: cupy where a GPU is visible, else numba, else numpy."""
    usable = kernels.available()
    for name in ("cupy", "numba"):
        if name in usable:
            return name
    return "numpy"


_current = None


def available_backends():
    """Names of the backends that work on this machine."""
    return kernels.available()


def set_backend(name="numpy", dtype="float32", seed=None, precision="fp32"):
    """Make a new default backend and return it."""
    global _current
    _current = Backend(name, dtype, seed, precision=precision)
    return _current


def get_backend():
    """The default backend, made on first use from FASTVAE_BACKEND, else the fastest one here."""
    if _current is None:
        # FASTVAE_BACKEND set but empty counts as unset
        set_backend(os.environ.get("FASTVAE_BACKEND") or default_backend_name())
    return _current


def resolve(backend=None, **settings):
    """A Backend from a Backend (used as it is), a name, or None: the default backend itself,
    or with `settings` (dtype, seed, device_noise, precision) a new Backend of the default's
    kind."""
    if isinstance(backend, Backend):
        return backend
    if not backend and not settings:
        return get_backend()
    return Backend(backend or get_backend().name, **settings)


@contextlib.contextmanager
def use_backend(name="numpy", dtype="float32", seed=None, precision="fp32"):
    """Temporarily switch the default backend."""
    global _current
    previous = _current
    try:
        yield set_backend(name, dtype, seed, precision)
    finally:
        _current = previous
