"""The step's matrix products, traced from a real training step.

`step_products(config, batch)` runs one `TrainState.step` on the NumPy reference with a
kernel table that records the shape of every product the dense ops compute (the counting
backend of the tests), so the products-alone bound and the FLOP counts follow the model as it
is, never a hand-kept copy of it.
"""
import functools
import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Product:
    """C (m, n) = A (m, k) @ B (k, n); A or B is a transposed view where the step uses one."""

    name: str
    m: int
    k: int
    n: int
    transpose_a: bool = False
    transpose_b: bool = False

    @property
    def flops(self):
        return 2 * self.m * self.k * self.n


def _address(array):
    return array.__array_interface__["data"][0]


class ProductTracer:
    """A kernel table that records every product of dense_forward / dense_backward, by layer
    name, and otherwise is the table it wraps."""

    def __init__(self, ops):
        self._ops = ops
        self.products = []
        self.names = {}  # weight address -> layer name

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def _name(self, weight):
        return self.names.get(_address(weight), "layer")

    def dense_forward(self, x, weight, bias, activation, out, **low):
        self.products.append(Product(f"{self._name(weight)} forward", x.shape[0], x.shape[1],
                                     weight.shape[1]))
        return self._ops.dense_forward(x, weight, bias, activation, out, **low)

    def dense_backward(self, grad_out, x, y, weight, activation, grad_weight, grad_bias,
                       grad_in, scratch, **low):
        name = self._name(weight)
        if grad_weight is not None:
            self.products.append(Product(f"{name} grad weight", x.shape[1], x.shape[0],
                                         grad_out.shape[1], transpose_a=True))
        if grad_in is not None:
            self.products.append(Product(f"{name} grad input", grad_out.shape[0],
                                         grad_out.shape[1], weight.shape[0], transpose_b=True))
        return self._ops.dense_backward(grad_out, x, y, weight, activation, grad_weight,
                                        grad_bias, grad_in, scratch, **low)


def layer_names(model):
    """{weight address: name} for every Linear of a VAEGAN ("encoder.0", "encoder.mu", ...)."""
    names = {}
    encoder = model.encoder
    for index, layer in enumerate(encoder.body.linears()):
        names[_address(layer.weight)] = f"encoder.{index}"
    names[_address(encoder.mu_head.weight)] = "encoder.mu"
    names[_address(encoder.log_var_head.weight)] = "encoder.log_var"
    networks = {"decoder": model.decoder, "discriminator": model.discriminator}
    for network, layers in networks.items():
        for index, layer in enumerate(layers.linears() if layers is not None else ()):
            names[_address(layer.weight)] = f"{network}.{index}"
    return names


@functools.lru_cache(maxsize=32)
def _traced(config_json, batch):
    from fastvae.backend import Backend
    from fastvae.config import Config
    from fastvae.model import VAEGAN
    from fastvae.state import TrainState

    config = Config.from_dict(json.loads(config_json))
    config = config.replace(backend="numpy", precision="fp32", dtype="float32")
    backend = Backend("numpy", "float32", seed=0)
    tracer = backend.ops = ProductTracer(backend.ops)
    model = VAEGAN(config, backend)
    tracer.names = layer_names(model)
    x = backend.asarray(np.random.default_rng(0).random((batch, config.image_size)))
    TrainState(model).step(x)
    return tuple(tracer.products)


def step_products(config, batch):
    """Every matrix product one `TrainState.step` on `batch` rows computes, in order."""
    return list(_traced(config.to_json(), int(batch)))


def step_flops(config, batch):
    """Matrix-product FLOPs of one training step (2 m k n per product)."""
    return sum(product.flops for product in step_products(config, batch))
