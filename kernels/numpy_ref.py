"""The reference backend in plain NumPy: the definition every other backend is tested against.

Conventions shared by every backend:
- arrays are C-contiguous row-major batches (rows = samples); weights are (in, out);
- results go into the `out`/`grad_*` arrays the caller owns; a `grad_*` of None skips that work;
- activations are differentiated through their output `y`, so a layer keeps only `y`;
- losses are sums over all elements times `scale` (the caller passes 1/batch for a mean over
  the batch) and return a 0-d array, so a GPU backend never has to synchronise.

Mixed precision (bf16) is defined here: a bf16 number is the top 16 bits of a float32, rounded
to nearest even, held in a uint16 array. The dense ops take optional bf16 copies (`x16`,
`weight16`); when `weight16` is given the products read the bf16 copies of their inputs and
accumulate in float32, while biases, activations, gradients, reductions and the optimisers
stay float32. The ops that make a product's input also write its bf16 copy (`out16`,
`scratch16`, `param16`), so a backend rounds each array once, in the pass that writes it.
A backend that offers bf16 has `to_bf16` and `bf16_unavailable_reason()` (None where it runs).
"""
import numpy as np

from . import LEAKY_SLOPE

xp = np
DEVICE = "cpu"


def unavailable_reason():
    """NumPy is always there."""
    return None


def bf16_unavailable_reason():
    """None: the reference defines bf16, so it can always compute it (slowly)."""
    return None


def to_bf16(x, out):
    """out (uint16) = x rounded to bfloat16, to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out[...] = np.where(nan, (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)
    return out


def from_bf16(x16):
    """The float32 values of a uint16 bf16 array."""
    return (x16.astype(np.uint32) << 16).view(np.float32)


def sigmoid(logits):
    """Logistic function without overflow for large |logits|."""
    return np.exp(-np.logaddexp(0.0, -logits))


def activation_forward(activation, x, out):
    """out = activation(x); out may be x itself."""
    if activation == "identity":
        out[...] = x
    elif activation == "relu":
        np.maximum(x, 0, out=out)
    elif activation == "leaky_relu":
        out[...] = np.where(x > 0, x, LEAKY_SLOPE * x)
    elif activation == "sigmoid":
        out[...] = sigmoid(x)
    elif activation == "tanh":
        np.tanh(x, out=out)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return out


def activation_backward(activation, y, grad_out, out):
    """out = grad_out * activation'(x), written with the activation's output y = activation(x)."""
    if activation == "identity":
        out[...] = grad_out
    elif activation == "relu":
        np.multiply(grad_out, y > 0, out=out)
    elif activation == "leaky_relu":
        out[...] = np.where(y > 0, grad_out, LEAKY_SLOPE * grad_out)
    elif activation == "sigmoid":
        np.multiply(grad_out, y * (1 - y), out=out)
    elif activation == "tanh":
        np.multiply(grad_out, 1 - y * y, out=out)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return out


def dense_forward(x, weight, bias, activation, out, x16=None, weight16=None, out16=None):
    """out = activation(x @ weight + bias); with `weight16`, the product of the bf16 copies
    x16 @ weight16 (float32 accumulation), and `out16` (if given) = bf16(out)."""
    if weight16 is None:
        np.matmul(x, weight, out=out)
    else:
        np.matmul(from_bf16(x16), from_bf16(weight16), out=out)
    out += bias
    activation_forward(activation, out, out)
    if out16 is not None:
        to_bf16(out, out16)
    return out


def dense_backward(grad_out, x, y, weight, activation, grad_weight, grad_bias, grad_in, scratch,
                   x16=None, weight16=None, scratch16=None):
    """Back through y = activation(x @ weight + bias): fills grad_weight, grad_bias, grad_in.

    `scratch` (shaped like grad_out) receives the gradient before the activation. With
    `weight16`, the products read bf16 copies: scratch16 = bf16(that gradient) is written, then
    grad_weight = x16.T @ scratch16 and grad_in = scratch16 @ weight16.T; grad_bias is the
    float32 sum of the unrounded gradient. With `weight16`, `scratch` is work space: what it
    holds afterwards is left to the backend (here the gradient; numba writes its first row).
    """
    grad_pre = activation_backward(activation, y, grad_out, scratch)
    if weight16 is not None:
        to_bf16(grad_pre, scratch16)
        grad_pre16 = from_bf16(scratch16)
    if grad_weight is not None:
        if weight16 is None:
            np.matmul(x.T, grad_pre, out=grad_weight)
        else:
            np.matmul(from_bf16(x16).T, grad_pre16, out=grad_weight)
        np.sum(grad_pre, axis=0, out=grad_bias)
    if grad_in is not None:
        if weight16 is None:
            np.matmul(grad_pre, weight.T, out=grad_in)
        else:
            np.matmul(grad_pre16, from_bf16(weight16).T, out=grad_in)
    return grad_in


def bce_with_logits(logits, target, scale, grad_out):
    """scale * sum BCE(sigmoid(logits), target), in the stable logits form; grad into grad_out.

    `target` is an array shaped like logits or a scalar (1.0 real, 0.0 fake).
    """
    loss = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    if grad_out is not None:
        np.multiply(sigmoid(logits) - target, scale, out=grad_out)
    return np.asarray(scale * np.sum(loss, dtype=np.float64))


def squared_error(pred, target, scale, grad_out):
    """scale * sum 0.5 * (pred - target)**2; gradient with respect to pred into grad_out."""
    diff = pred - target
    if grad_out is not None:
        np.multiply(diff, scale, out=grad_out)
    return np.asarray(scale * 0.5 * np.sum(diff * diff, dtype=np.float64))


def kl_reparam_forward(mu, log_var, eps, scale, z_out):
    """z = mu + exp(log_var / 2) * eps; returns scale * KL(N(mu, exp(log_var)) || N(0, I))."""
    np.multiply(np.exp(0.5 * log_var), eps, out=z_out)
    z_out += mu
    kl = -0.5 * np.sum(1 + log_var - mu * mu - np.exp(log_var), dtype=np.float64)
    return np.asarray(scale * kl)


def kl_reparam_backward(grad_z, mu, log_var, eps, scale, grad_mu, grad_log_var):
    """Gradients of (loss through z) + scale * KL with respect to mu and log_var."""
    std = np.exp(0.5 * log_var)
    np.add(grad_z, scale * mu, out=grad_mu)
    grad_log_var[...] = grad_z * eps * 0.5 * std + scale * 0.5 * (std * std - 1)


def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step, apply=None,
                param16=None):
    """One Adam step in place (Kingma & Ba, with bias correction); `step` counts from 1.

    `apply`, a 0-d array holding 1.0 or 0.0 (None: 1), skips the whole update where it is 0:
    parameters, moments and `param16` keep their values (the caller keeps the step count).
    `param16`, if given, receives bf16(param) after the step (the products' weight copy)."""
    if apply is not None and not apply:
        return
    exp_avg *= beta1
    exp_avg += (1 - beta1) * grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * grad * grad
    avg_hat = exp_avg / (1 - beta1**step)
    avg_sq_hat = exp_avg_sq / (1 - beta2**step)
    param -= lr * avg_hat / (np.sqrt(avg_sq_hat) + eps)
    if param16 is not None:
        to_bf16(param, param16)


def sgd_update(param, grad, velocity, lr, momentum, apply=None, param16=None):
    """One step of SGD with (heavy-ball) momentum, in place; `apply` 0 skips it and `param16`
    is refreshed, as for Adam."""
    if apply is not None and not apply:
        return
    velocity *= momentum
    velocity += grad
    param -= lr * velocity
    if param16 is not None:
        to_bf16(param, param16)
