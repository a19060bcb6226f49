"""fastvae: a VAE-GAN for MNIST in plain NumPy layers, with Numba and CuPy kernels."""
from fastvae import data
from fastvae.backend import Backend, available_backends, get_backend, set_backend, use_backend
from fastvae.config import Config
from fastvae.model import VAEGAN
from fastvae.trainer import Trainer

__version__ = "0.1.0"
__all__ = ["Backend", "Config", "Trainer", "VAEGAN", "available_backends", "data", "get_backend",
           "set_backend", "use_backend"]
