"""Each kernel of the table at the shapes one training step of the default model uses.

Groups are `op:{case}:b{batch}:{dtype}` (the optimisers, whose work does not depend on the
batch: `op:{case}:{dtype}`), so the backends print side by side. Dense layers are timed at
the rows the step runs them on: encoder B, decoder 2B (z and prior samples), discriminator
3B (real, reconstructed, prior samples); the backward pass is the parameter pass the step
runs (no input gradient for a network's first layer).
"""
import numpy as np
import pytest

from fastvae.backend import Backend
from fastvae.config import Config

pytestmark = pytest.mark.fastvae_full

CONFIG = Config()


def dense_layers(config):
    """(name, in, out, activation, rows per batch row, first layer) of every distinct Linear."""
    layers = []

    def add(network, sizes, activations, rows):
        for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append((f"{network}.{index}", n_in, n_out, activations[index], rows,
                           index == 0))

    encoder = (config.image_size,) + config.encoder_widths
    add("encoder", encoder, [config.activation] * (len(encoder) - 1), 1)
    layers.append(("encoder.head", encoder[-1], config.latent_dim, "identity", 1, False))
    decoder = (config.latent_dim,) + config.decoder_widths + (config.image_size,)
    add("decoder", decoder, [config.activation] * (len(decoder) - 2) + ["identity"], 2)
    discriminator = (config.image_size,) + config.discriminator_widths + (1,)
    add("discriminator", discriminator,
        [config.discriminator_activation] * (len(discriminator) - 2) + ["identity"], 3)
    return layers


LAYERS = dense_layers(CONFIG)
LAYER_IDS = [layer[0] for layer in LAYERS]
# (op, activation, rows per batch row, width): the standalone activations of the step (the
# sigmoid of the decoder's logits and its derivative) and a hidden ReLU for comparison
ACTIVATIONS = [
    ("activation_forward", "sigmoid", 2, CONFIG.image_size),
    ("activation_backward", "sigmoid", 2, CONFIG.image_size),
    ("activation_forward", "relu", 1, CONFIG.encoder_widths[0]),
    ("activation_backward", "relu", 1, CONFIG.encoder_widths[0]),
]
LOSSES = ["bce_with_logits", "squared_error", "kl_reparam_forward", "kl_reparam_backward"]
NETWORKS = ["encoder", "decoder", "discriminator"]


def make(backend, dtype):
    return Backend(backend, dtype, seed=0)


def rows_label(rows):
    return "B" if rows == 1 else f"{rows}B"


def info(backend, batch, dtype, case):
    return {"kind": "op", "backend": backend, "device": "gpu" if backend == "cupy" else "cpu",
            "batch": batch, "dtype": dtype, "case": case}


def dense_inputs(be, layer, batch, rng):
    name, n_in, n_out, activation, rows, first = layer
    x = be.asarray(rng.random((rows * batch, n_in)))
    weight = be.asarray(rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in))
    bias = be.asarray(rng.standard_normal(n_out) * 0.1)
    out = be.empty((rows * batch, n_out))
    return x, weight, bias, out


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_dense_forward(timed, backend, batch, dtype, layer):
    be = make(backend, dtype)
    x, weight, bias, out = dense_inputs(be, layer, batch, np.random.default_rng(0))
    name, n_in, n_out, activation, rows, _ = layer
    case = f"dense_forward {name} ({rows_label(rows)} x {n_in} -> {n_out}, {activation})"
    result = timed(lambda: be.ops.dense_forward(x, weight, bias, activation, out),
                   group=f"op:dense_forward:{name}:b{batch}:{dtype}", xp=be.xp,
                   **info(backend, batch, dtype, case), flops=2 * rows * batch * n_in * n_out)
    assert bool(be.xp.isfinite(result).all())


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_dense_backward(timed, backend, batch, dtype, layer):
    be = make(backend, dtype)
    rng = np.random.default_rng(0)
    x, weight, bias, y = dense_inputs(be, layer, batch, rng)
    name, n_in, n_out, activation, rows, first = layer
    be.ops.dense_forward(x, weight, bias, activation, y)
    grad_out = be.asarray(rng.standard_normal(y.shape))
    grad_weight, grad_bias = be.empty((n_in, n_out)), be.empty(n_out)
    grad_in = None if first else be.empty(x.shape)
    scratch = be.empty(y.shape)
    products = 1 if first else 2
    case = (f"dense_backward {name} ({rows_label(rows)} x {n_out} -> {n_in}, {activation}"
            + (", no input grad)" if first else ")"))
    timed(lambda: be.ops.dense_backward(grad_out, x, y, weight, activation, grad_weight,
                                        grad_bias, grad_in, scratch),
          group=f"op:dense_backward:{name}:b{batch}:{dtype}", xp=be.xp,
          **info(backend, batch, dtype, case), flops=2 * products * rows * batch * n_in * n_out)
    assert bool(be.xp.isfinite(grad_weight).all())


@pytest.mark.parametrize("case", ACTIVATIONS, ids=[f"{c[0]}-{c[1]}" for c in ACTIVATIONS])
def test_activation(timed, backend, batch, dtype, case):
    op, activation, rows, width = case
    be = make(backend, dtype)
    rng = np.random.default_rng(0)
    x = be.asarray(rng.standard_normal((rows * batch, width)))
    y = be.ops.activation_forward(activation, x, be.empty(x.shape))
    grad = be.asarray(rng.standard_normal(x.shape))
    out = be.empty(x.shape)
    if op == "activation_forward":
        def function():
            return be.ops.activation_forward(activation, x, out)
    else:
        def function():
            return be.ops.activation_backward(activation, y, grad, out)
    label = f"{op} {activation} ({rows_label(rows)} x {width})"
    timed(function, group=f"op:{op}:{activation}:b{batch}:{dtype}", xp=be.xp,
          **info(backend, batch, dtype, label))
    assert bool(be.xp.isfinite(out).all())


@pytest.mark.parametrize("op", LOSSES)
def test_loss(timed, backend, batch, dtype, op):
    be = make(backend, dtype)
    rng = np.random.default_rng(0)
    scale = 1.0 / batch
    if op == "bce_with_logits":
        shape = (batch, CONFIG.image_size)
        logits, target = be.asarray(rng.standard_normal(shape)), be.asarray(rng.random(shape))
        grad = be.empty(shape)

        def function():
            return be.ops.bce_with_logits(logits, target, scale, grad)
    elif op == "squared_error":
        shape = (batch, CONFIG.discriminator_widths[-1])
        pred, target = be.asarray(rng.random(shape)), be.asarray(rng.random(shape))
        grad = be.empty(shape)

        def function():
            return be.ops.squared_error(pred, target, scale, grad)
    else:
        shape = (batch, CONFIG.latent_dim)
        mu, log_var, eps = (be.asarray(rng.standard_normal(shape) * 0.5) for _ in range(3))
        grad_z, z = be.asarray(rng.standard_normal(shape)), be.empty(shape)
        grad_mu, grad_log_var = be.empty(shape), be.empty(shape)
        if op == "kl_reparam_forward":
            def function():
                return be.ops.kl_reparam_forward(mu, log_var, eps, scale, z)
        else:
            def function():
                be.ops.kl_reparam_backward(grad_z, mu, log_var, eps, scale, grad_mu,
                                           grad_log_var)
                return grad_mu
    label = f"{op} (B x {shape[1]})"
    result = timed(function, group=f"op:{op}:b{batch}:{dtype}", xp=be.xp,
                   **info(backend, batch, dtype, label))
    assert bool(be.xp.isfinite(result).all())


def parameter_count(config, network):
    from fastvae.model import VAEGAN

    return int(VAEGAN(config, "numpy").params[network].size)


@pytest.mark.parametrize("op", ["adam_update", "sgd_update"])
@pytest.mark.parametrize("network", NETWORKS)
def test_optimizer(timed, backend, dtype, op, network):
    be = make(backend, dtype)
    size = parameter_count(CONFIG, network)
    rng = np.random.default_rng(0)
    param, grad = be.asarray(rng.standard_normal(size)), be.asarray(rng.standard_normal(size))
    state_a, state_b = be.zeros(size), be.zeros(size)
    if op == "adam_update":
        def function():
            be.ops.adam_update(param, grad, state_a, state_b, 1e-4, 0.5, 0.999, 1e-8, 10)
            return param
    else:
        def function():
            be.ops.sgd_update(param, grad, state_a, 1e-4, 0.5)
            return param
    label = f"{op} {network} ({size:,} parameters)"
    result = timed(function, group=f"op:{op}:{network}:{dtype}", xp=be.xp,
                   **info(backend, None, dtype, label))
    assert bool(be.xp.isfinite(result).all())
