"""fastvae: a VAE-GAN for MNIST in plain NumPy layers, with Numba and CuPy kernels.

The model and its backend switch load with the package; the heavier parts (the training
state, the trainer with its progress bar, the data files) load on first use, so
`import fastvae.kernels.numpy_ref` stays light.
"""
import importlib

from fastvae.backend import Backend, available_backends, get_backend, set_backend, use_backend
from fastvae.config import Config
from fastvae.model import VAEGAN

__version__ = "0.1.0"
_LAZY = {"Trainer": "fastvae.trainer", "TrainState": "fastvae.state", "data": "fastvae.data"}
__all__ = ["Backend", "Config", "TrainState", "Trainer", "VAEGAN", "available_backends", "data",
           "get_backend", "set_backend", "use_backend"]


def __getattr__(name):
    """The parts of _LAZY, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'fastvae' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
