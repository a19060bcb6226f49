"""Gradient checks: hand-written backward passes against central finite differences in float64,
and any backend's kernels against the NumPy reference.
"""
from dataclasses import dataclass

import numpy as np

from fastvae.backend import ACTIVATIONS, Backend, load_kernels, to_numpy
from fastvae.config import Config
from fastvae.kernels import numpy_ref
from fastvae.layers import ACTIVATION_LAYERS, Linear, NeuralNetwork, Sigmoid
from fastvae.model import VAEGAN

STEP = 1e-6
MODEL_STEP = 1e-5  # losses of order 1 with gradients down to 1e-6: a larger step beats round-off
TOLERANCE = 1e-6


@dataclass
class Check:
    """One row of a report: what was checked, the worst error found and the bound it must meet."""

    name: str
    error: float
    tolerance: float

    @property
    def ok(self):
        return bool(self.error <= self.tolerance)


def relative_error(analytic, numeric, floor=1e-12):
    """||a - n|| / max(||a||, ||n||): the error relative to the gradient's size.

    Norm-wise, because entries far below the rest are lost to finite-difference round-off.
    """
    analytic, numeric = np.ravel(analytic).astype(float), np.ravel(numeric).astype(float)
    scale = max(np.linalg.norm(analytic), np.linalg.norm(numeric))
    return 0.0 if scale < floor else float(np.linalg.norm(analytic - numeric) / scale)


def numeric_gradient(loss, array, coords, step=STEP):
    """Central differences of `loss()` with respect to `array` at flat indices `coords`."""
    flat = array.reshape(-1)
    grads = []
    for index in coords:
        saved = float(flat[index])
        flat[index] = saved + step
        plus = loss()
        flat[index] = saved - step
        minus = loss()
        flat[index] = saved
        grads.append((plus - minus) / (2 * step))
    return np.array(grads)


def _coords(size, count, rng):
    return np.arange(size) if size <= count else rng.choice(size, count, replace=False)


def check_layer(name, layer, x, rng, count=60):
    """Backward of `layer` against finite differences of sum(forward(x) * upstream)."""
    upstream = rng.standard_normal(layer.forward(x).shape)

    def loss():
        return float(np.sum(layer.forward(x) * upstream))

    layer.forward(x)
    grad_in = np.array(layer.backward(upstream))
    checks = []
    coords = _coords(x.size, count, rng)
    checks.append(Check(f"{name}: input", relative_error(
        grad_in.reshape(-1)[coords], numeric_gradient(loss, x, coords)), TOLERANCE))
    layers = layer.linears() if isinstance(layer, NeuralNetwork) else [layer]
    for position, linear in enumerate(item for item in layers if isinstance(item, Linear)):
        for (tensor, value), (_, grad) in zip(linear.parameters(), linear.gradients()):
            coords = _coords(value.size, count, rng)
            analytic = np.array(grad).reshape(-1)[coords]
            checks.append(Check(f"{name}: layer {position} {tensor}", relative_error(
                analytic, numeric_gradient(loss, value, coords)), TOLERANCE))
    return checks


def layer_checks(seed=0):
    """Every layer type, and a container with fused Linear + activation stages, in float64."""
    backend = Backend("numpy", "float64")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 7))
    cases = [("Linear", Linear(7, 4, rng=rng, backend=backend))]
    cases += [(cls.__name__, cls(backend)) for cls in ACTIVATION_LAYERS.values()]
    for activation in ACTIVATION_LAYERS:
        network = NeuralNetwork([Linear(7, 6, activation=activation, rng=rng, backend=backend),
                                 Linear(6, 3, rng=rng, backend=backend),
                                 Sigmoid(backend)], backend=backend)
        cases.append((f"NeuralNetwork(Linear+{activation})", network))
    return [check for name, layer in cases for check in check_layer(name, layer, x, rng)]


def small_config(**overrides):
    """A model small enough for finite differences on every network."""
    values = dict(image_size=12, latent_dim=3, encoder_widths=(8,), decoder_widths=(7,),
                  discriminator_widths=(9, 5), dtype="float64", gamma=0.7,
                  kl_weight=1.0)   # the unweighted KL (the default weighs it), 0.3 below
    values.update(overrides)
    return Config(**values)


def model_checks(config=None, seed=0, batch=6, count=40):
    """Each network's gradient of its own loss (encoder, decoder, discriminator) end to end,
    with the noise fixed, against finite differences at sampled coordinates."""
    config = config if config is not None else small_config()
    model = VAEGAN(config, Backend("numpy", "float64", seed))
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 0.95, (batch, config.image_size))
    eps = rng.standard_normal((batch, config.latent_dim))
    prior_z = rng.standard_normal((batch, config.latent_dim))

    def losses():
        return model.compute_gradients(x, eps, prior_z)

    losses()
    grads = {name: np.array(grad) for name, grad in model.grads.items()}
    label = f"{config.mode}/{config.reconstruction}" + (
        f" kl x{config.kl_weight:g}" if config.kl_weight != 1 else "")
    checks = []
    for name, params in model.params.items():
        coords = _coords(params.size, count, rng)
        numeric = numeric_gradient(lambda name=name: float(losses()[name]), params, coords,
                                   MODEL_STEP)
        checks.append(Check(f"{label}: {name} loss", relative_error(grads[name][coords], numeric),
                            TOLERANCE))
    return checks


def all_model_checks(seed=0):
    return (model_checks(small_config(), seed)
            + model_checks(small_config(reconstruction="feature", feature_layer=0), seed)
            + model_checks(small_config(mode="vae"), seed)
            + model_checks(small_config(kl_weight=0.3, gamma=0.2), seed))


def _kernel_cases(rng, dtype):
    """(label, op name, inputs, names of the output arguments) for every op of the table."""
    def rand(*shape):
        return rng.standard_normal(shape).astype(dtype)

    def empty(*shape):
        return np.zeros(shape, dtype)

    batch, n_in, n_out = 33, 20, 17
    x, weight, bias, grad_y = rand(batch, n_in), rand(n_in, n_out), rand(n_out), rand(batch, n_out)
    cases = []
    for activation in ACTIVATIONS:
        y = numpy_ref.dense_forward(x, weight, bias, activation, empty(batch, n_out))
        cases.append((f"dense_forward {activation}", "dense_forward",
                      [x, weight, bias, activation, empty(batch, n_out)], [4]))
        cases.append((f"dense_backward {activation}", "dense_backward",
                      [grad_y, x, y, weight, activation, empty(n_in, n_out), empty(n_out),
                       empty(batch, n_in), empty(batch, n_out)], [5, 6, 7]))
        cases.append((f"activation_forward {activation}", "activation_forward",
                      [activation, x, empty(batch, n_in)], [2]))
        cases.append((f"activation_backward {activation}", "activation_backward",
                      [activation, numpy_ref.activation_forward(activation, x, empty(batch, n_in)),
                       rand(batch, n_in), empty(batch, n_in)], [3]))
    target = rng.uniform(size=(batch, n_in)).astype(dtype)
    cases += [
        ("bce_with_logits array target", "bce_with_logits",
         [x * 5, target, 0.1, empty(batch, n_in)], [3]),
        ("bce_with_logits scalar target", "bce_with_logits", [x * 5, 1.0, 0.1, empty(batch, n_in)],
         [3]),
        ("squared_error", "squared_error", [x, target, 0.1, empty(batch, n_in)], [3]),
        ("kl_reparam_forward", "kl_reparam_forward",
         [x, rand(batch, n_in) * 0.5, rand(batch, n_in), 0.1, empty(batch, n_in)], [4]),
        ("kl_reparam_backward", "kl_reparam_backward",
         [rand(batch, n_in), x, rand(batch, n_in) * 0.5, rand(batch, n_in), 0.1,
          empty(batch, n_in), empty(batch, n_in)], [5, 6]),
        ("adam_update", "adam_update",
         [rand(999), rand(999), rand(999) * 0.1, np.abs(rand(999)) * 0.1, 1e-3, 0.5, 0.999,
          1e-8, 3], [0, 2, 3]),
        ("sgd_update", "sgd_update", [rand(999), rand(999), rand(999), 1e-2, 0.9], [0, 2]),
    ]
    for apply in (1.0, 0.0):  # equilibrium gating's mask, a 0-d array: applied and skipped
        mask = np.asarray(apply)
        cases += [
            (f"adam_update apply {apply:g}", "adam_update",
             [rand(999), rand(999), rand(999) * 0.1, np.abs(rand(999)) * 0.1, 1e-3, 0.5, 0.999,
              1e-8, 3, mask], [0, 2, 3]),
            (f"sgd_update apply {apply:g}", "sgd_update",
             [rand(999), rand(999), rand(999), 1e-2, 0.9, mask], [0, 2]),
        ]
    return cases


def compare_kernels(name, dtype="float32", seed=0):
    """Every op of backend `name` against the NumPy reference on the same random inputs."""
    module = load_kernels(name)
    tolerance = 1e-4 if dtype == "float32" else 1e-10
    checks = []
    for label, op, args, outputs in _kernel_cases(np.random.default_rng(seed), dtype):
        reference_args = [np.copy(a) if isinstance(a, np.ndarray) else a for a in args]
        backend_args = [module.xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        expected = getattr(numpy_ref, op)(*reference_args)
        result = getattr(module, op)(*backend_args)
        pairs = [(reference_args[i], backend_args[i]) for i in outputs]
        if expected is not None and np.ndim(expected) == 0:
            pairs.append((expected, result))
        error = max(relative_error(to_numpy(got), np.asarray(want))
                    for want, got in pairs)
        checks.append(Check(f"{name} {dtype}: {label}", error, tolerance))
    return checks


# bf16 keeps 8 significant bits: each product input is rounded with relative error at most
# u = 2**-8, so a product term a*b is off by at most 2u + u**2 (about 2**-7) of |a*b| and a
# product by at most 2**-7 of (|A| @ |B|), the bound below (errors measured relative to that
# magnitude). The activations after a product are 1-Lipschitz, so the bound holds for their
# outputs too. Against the NumPy bf16 reference only the float32 summation order differs:
# float32's tolerance.
BF16_TOLERANCE = 2.0 ** -7
BF16_REFERENCE_TOLERANCE = 1e-5


def _bf16_cases(rng, batch=33, n_in=20, n_out=17):
    """(label, function(ops) -> {output: array}, {output: magnitude}) for the bf16 dense ops."""
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    weight = rng.standard_normal((n_in, n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    grad_y = rng.standard_normal((batch, n_out)).astype(np.float32)

    def rounded(ops, array):
        return ops.to_bf16(ops.xp.asarray(array), ops.xp.empty(array.shape, np.uint16))

    cases = []
    for activation in ACTIVATIONS:
        y = numpy_ref.dense_forward(x, weight, bias, activation, np.empty((batch, n_out), "f4"))

        def forward(ops, bf16, activation=activation):
            out = ops.xp.zeros((batch, n_out), np.float32)
            low = {"x16": rounded(ops, x), "weight16": rounded(ops, weight)} if bf16 else {}
            ops.dense_forward(*map(ops.xp.asarray, (x, weight, bias)), activation, out, **low)
            return {"out": out}

        def backward(ops, bf16, activation=activation, y=y):
            xp = ops.xp
            out = {"grad_weight": xp.zeros((n_in, n_out), np.float32),
                   "grad_bias": xp.zeros(n_out, np.float32),
                   "grad_in": xp.zeros((batch, n_in), np.float32)}
            low = ({"x16": rounded(ops, x), "weight16": rounded(ops, weight),
                    "scratch16": xp.empty((batch, n_out), np.uint16)} if bf16 else {})
            ops.dense_backward(*map(xp.asarray, (grad_y, x, y, weight)), activation,
                               out["grad_weight"], out["grad_bias"], out["grad_in"],
                               xp.zeros((batch, n_out), np.float32), **low)
            return out

        pre = np.abs(numpy_ref.activation_backward(activation, y, grad_y, np.empty_like(grad_y)))
        magnitudes = {"out": float((np.abs(x) @ np.abs(weight)).max()),
                      "grad_weight": float((np.abs(x).T @ pre).max()),
                      "grad_bias": float(pre.sum(axis=0).max()),
                      "grad_in": float((pre @ np.abs(weight).T).max())}
        cases.append((f"dense_forward {activation}", forward, magnitudes))
        cases.append((f"dense_backward {activation}", backward, magnitudes))
    return cases


def compare_bf16_kernels(name, seed=0):
    """Backend `name`'s bf16 dense ops against the NumPy bf16 reference (float32 tolerance) and
    the NumPy fp32 reference (the bf16 bound, BF16_TOLERANCE); the errors are the largest
    difference relative to the product's magnitude |A| @ |B|. Bias gradients are float32 sums."""
    module = load_kernels(name)
    checks = []
    for label, run, magnitudes in _bf16_cases(np.random.default_rng(seed)):
        got = {key: to_numpy(value) for key, value in run(module, True).items()}
        for reference, bf16, bound in (("bf16 reference", True, BF16_REFERENCE_TOLERANCE),
                                       ("fp32 reference", False, BF16_TOLERANCE)):
            want = run(numpy_ref, bf16)
            for key, value in want.items():
                if key == "grad_bias":
                    limit = BF16_REFERENCE_TOLERANCE
                else:
                    limit = bound
                error = float(np.abs(got[key] - value).max()) / max(magnitudes[key], 1e-30)
                checks.append(Check(f"{name} bf16 vs {reference}: {label} {key}", error, limit))
    return checks


def report(checks):
    """A printable table of checks, worst error first within the order given."""
    width = max(len(check.name) for check in checks)
    lines = [f"{'check':<{width}}  {'worst rel. error':>16}  {'bound':>8}  result"]
    for check in checks:
        lines.append(f"{check.name:<{width}}  {check.error:>16.2e}  {check.tolerance:>8.0e}  "
                     f"{'ok' if check.ok else 'FAIL'}")
    return "\n".join(lines)
