"""The kernel table: the operations a backend supplies, and where each backend lives.

Layers and models never compute with arrays directly; they call these operations on the
backend they were built with, so a new backend is one module and no change to any layer.
"""
import importlib

OPS = (
    "dense_forward",
    "dense_backward",
    "activation_forward",
    "activation_backward",
    "bce_with_logits",
    "squared_error",
    "kl_reparam_forward",
    "kl_reparam_backward",
    "adam_update",
    "sgd_update",
)
# The activation table every backend and the config use: the names, each one's integer code
# (its position; the fused kernels take the code) and the slope of leaky_relu.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
LEAKY_SLOPE = 0.2

_MODULES = {
    "numpy": "fastvae.kernels.numpy_ref",
    "numba": "fastvae.kernels.numba_cpu",
    "cupy": "fastvae.kernels.cupy_gpu",
}


class BackendUnavailable(RuntimeError):
    """The backend's module or hardware is missing on this machine."""


class UnknownBackend(KeyError):
    """No backend module is registered under this name."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def register(name, module):
    """Add (or replace) a backend: `module` is a module object or an importable dotted path.
    Returns what was registered under `name` before (None if nothing), to put back later."""
    previous = _MODULES.get(name)
    _MODULES[name] = module
    return previous


def unregister(name):
    """Remove backend `name`; a name not registered is ignored."""
    _MODULES.pop(name, None)


def registered(name):
    """The module object or dotted path registered as backend `name`."""
    if name not in _MODULES:
        raise UnknownBackend(f"unknown backend {name!r}: choose one of {', '.join(_MODULES)}")
    return _MODULES[name]


def names():
    """Every registered backend name, available here or not."""
    return tuple(_MODULES)


def load(name):
    """Import backend `name`, check it is usable here and implements every op."""
    module = registered(name)
    if isinstance(module, str):
        try:
            module = importlib.import_module(module)
        except ImportError as error:
            raise BackendUnavailable(f"backend {name!r} cannot be imported: {error}") from error
    reason = module.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    missing = [op for op in OPS if not callable(getattr(module, op, None))]
    if missing:
        raise TypeError(f"backend {name!r} lacks kernels: {', '.join(missing)}")
    return module


def available():
    """Names of the backends that load on this machine."""
    usable = []
    for name in _MODULES:
        try:
            load(name)
        except (BackendUnavailable, TypeError):
            continue
        usable.append(name)
    return usable
