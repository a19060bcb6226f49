"""fastvae: a VAE-GAN for MNIST in plain NumPy layers, with Numba and CuPy kernels."""
from fastvae.backend import Backend, available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["Backend", "available_backends", "get_backend", "set_backend", "use_backend"]
