"""Every op of every accelerated backend against the NumPy reference.

The backends are those `kernels.available()` finds here, less "numpy" (the oracle itself): numba
now, cupy where a GPU is, a new backend as soon as it is registered. Inputs go in through the
backend's `xp.asarray`, results come back through `.get()` when the array has one, so the same
tests serve host and device arrays.
"""
import importlib.util
import sys
import tracemalloc
import types

import numpy as np
import pytest
from kernel_asserts import assert_close, assert_loss_close, to_host

from fastvae import kernels
from fastvae.backend import Backend
from fastvae.errors import BackendUnavailable
from fastvae.kernels import numpy_ref as ref

BACKENDS = [name for name in kernels.available() if name != "numpy"]
DTYPES = (np.float32, np.float64)
# Relative tolerance per dtype; absolute tolerance is this times the magnitude of the result.

# (batch, in, out): the reference layers at batch 128, each with the activations it is used
# with; every activation on an odd shape, batch 1 and one reference layer.
REFERENCE_LAYERS = [((128, 784, 512), "leaky_relu"), ((128, 512, 256), "relu"),
                    ((128, 256, 128), "identity"), ((128, 128, 256), "leaky_relu"),
                    ((128, 256, 512), "relu"), ((128, 512, 784), "sigmoid"),
                    ((128, 512, 784), "tanh"), ((128, 512, 128), "leaky_relu"),
                    ((128, 128, 1), "identity")]
LAYER_CASES = REFERENCE_LAYERS + [
    (shape, activation) for shape in [(7, 13, 5), (1, 784, 512), (128, 256, 128)]
    for activation in kernels.ACTIVATIONS
]
LAYER_IDS = [f"{b}x{i}x{o}-{a}" for (b, i, o), a in LAYER_CASES]
ELEMENTWISE_SHAPES = [(128, 784), (7, 13), (1, 1)]


# "numba-chunked": numba with every float32 kernel cut into 3 spans shared among the threads
# (more spans than this machine's cores, so spans of every size, empty ones included, and the
# per-span sums are checked on the smallest shapes too).
CHUNKED = "numba-chunked"
CHUNKED_CASES = [CHUNKED] if "numba" in BACKENDS else []


@pytest.fixture(
    scope="module",
    params=BACKENDS + CHUNKED_CASES or [pytest.param(None, marks=pytest.mark.skip(
        reason="only the numpy reference backend is available here: nothing to compare"))],
)
def ops(request):
    if request.param != CHUNKED:
        yield kernels.load(request.param)
        return
    numba_ops = kernels.load("numba")
    if not numba_ops.PARALLEL:
        pytest.skip("numba's kernels are serial here (no oneMKL thread pool)")
    chunks = numba_ops._chunks
    numba_ops._chunks = lambda array: 3 if array.dtype == np.float32 else 1
    yield numba_ops
    numba_ops._chunks = chunks


@pytest.fixture(params=DTYPES, ids=lambda dtype: dtype.__name__)
def dtype(request):
    return request.param


# ----------------------------------------------------------------------------- helpers
def dev(ops, array):
    """A backend array holding a copy of a NumPy array (None and scalars pass through).

    A copy, so that what a kernel writes can never reach the reference's inputs (for NumPy
    arrays `asarray` alone would return the very same array).
    """
    return array if array is None or np.ndim(array) == 0 else ops.xp.asarray(array.copy())


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def dense_inputs(rng, batch, n_in, n_out, dtype):
    x = randn(rng, (batch, n_in), dtype)
    weight = randn(rng, (n_in, n_out), dtype, np.sqrt(2.0 / n_in))
    bias = randn(rng, n_out, dtype, 0.1)
    return x, weight, bias


def product_magnitude(a, b):
    """Bound on the size of the terms of a @ b: the scale of a product's rounding error."""
    return float((np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))).max())


# ----------------------------------------------------------------------------- dense layers
@pytest.mark.parametrize("shape,activation", LAYER_CASES, ids=LAYER_IDS)
def test_dense_forward(ops, dtype, shape, activation):
    batch, n_in, n_out = shape
    rng = np.random.default_rng(1)
    x, weight, bias = dense_inputs(rng, batch, n_in, n_out, dtype)
    want = ref.dense_forward(x, weight, bias, activation, np.empty((batch, n_out), dtype))
    inputs = [dev(ops, a) for a in (x, weight, bias)]
    out = dev(ops, np.full((batch, n_out), np.nan, dtype))
    returned = ops.dense_forward(*inputs, activation, out)
    assert returned is out
    assert_close(out, want, dtype, product_magnitude(x, weight) + np.abs(bias).max())
    for array, original in zip(inputs, (x, weight, bias)):
        np.testing.assert_array_equal(to_host(array), original)


def dense_backward_case(ops, dtype, batch, n_in, n_out, activation, param_grads, input_grad,
                        x=None, seed=2):
    rng = np.random.default_rng(seed)
    x_new, weight, bias = dense_inputs(rng, batch, n_in, n_out, dtype)
    x = x_new if x is None else x
    y = ref.dense_forward(x, weight, bias, activation, np.empty((batch, n_out), dtype))
    grad_out = randn(rng, (batch, n_out), dtype)
    want = {
        "grad_weight": np.empty((n_in, n_out), dtype), "grad_bias": np.empty(n_out, dtype),
        "grad_in": np.empty((batch, n_in), dtype), "scratch": np.empty((batch, n_out), dtype),
    }
    ref.dense_backward(grad_out, x, y, weight, activation, want["grad_weight"], want["grad_bias"],
                       want["grad_in"], want["scratch"])
    sentinel = 7.0
    got = {name: dev(ops, np.full(array.shape, sentinel, dtype)) for name, array in want.items()}
    inputs = [dev(ops, a) for a in (grad_out, x, y, weight)]
    returned = ops.dense_backward(
        *inputs, activation,
        got["grad_weight"] if param_grads else None,
        got["grad_bias"],  # given even without param_grads: it must then stay untouched
        got["grad_in"] if input_grad else None,
        got["scratch"],
    )
    assert (returned is got["grad_in"]) if input_grad else returned is None
    assert_close(got["scratch"], want["scratch"], dtype)
    if param_grads:
        assert_close(got["grad_weight"], want["grad_weight"], dtype, product_magnitude(x.T, want["scratch"]))
        assert_close(got["grad_bias"], want["grad_bias"], dtype,
              float(np.abs(want["scratch"]).sum(axis=0).max()))
    else:
        assert np.all(to_host(got["grad_weight"]) == sentinel)
        assert np.all(to_host(got["grad_bias"]) == sentinel)
    if input_grad:
        assert_close(got["grad_in"], want["grad_in"], dtype, product_magnitude(want["scratch"], weight.T))
    else:
        assert np.all(to_host(got["grad_in"]) == sentinel)
    for array, original in zip(inputs, (grad_out, x, y, weight)):
        np.testing.assert_array_equal(to_host(array), original)


@pytest.mark.parametrize("shape,activation", LAYER_CASES, ids=LAYER_IDS)
def test_dense_backward(ops, dtype, shape, activation):
    dense_backward_case(ops, dtype, *shape, activation, True, True)


@pytest.mark.parametrize("param_grads,input_grad", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
@pytest.mark.parametrize("batch,n_in,n_out", [(7, 13, 5), (128, 256, 128)], ids=str)
def test_dense_backward_skips(ops, dtype, batch, n_in, n_out, activation, param_grads, input_grad):
    dense_backward_case(ops, dtype, batch, n_in, n_out, activation, param_grads, input_grad)


def test_dense_row_slices(ops, dtype):
    """Inputs that are row slices of a larger C-contiguous array (a sub-batch)."""
    rng = np.random.default_rng(3)
    big = randn(rng, (300, 784), dtype)
    x, weight, bias = big[100:228], *dense_inputs(rng, 1, 784, 512, dtype)[1:]
    assert x.flags.c_contiguous and x.base is not None
    want = ref.dense_forward(x, weight, bias, "leaky_relu", np.empty((128, 512), dtype))
    big_dev = dev(ops, big)
    out = dev(ops, np.empty((128, 512), dtype))
    ops.dense_forward(big_dev[100:228], dev(ops, weight), dev(ops, bias), "leaky_relu", out)
    assert_close(out, want, dtype, product_magnitude(x, weight))
    dense_backward_case(ops, dtype, 128, 784, 512, "sigmoid", True, True, x=x)
    # y and grad_out as row slices too, as a layer's backward with `rows` passes them
    y_big = ref.dense_forward(big, weight, bias, "tanh", np.empty((300, 512), dtype))
    grad_big = randn(rng, (300, 512), dtype)
    want_scratch = np.empty((28, 512), dtype)
    want_gw, want_gb, want_gi = np.empty((784, 512), dtype), np.empty(512, dtype), np.empty((28, 784), dtype)
    ref.dense_backward(grad_big[50:78], big[50:78], y_big[50:78], weight, "tanh",
                       want_gw, want_gb, want_gi, want_scratch)
    got = [dev(ops, np.empty_like(a)) for a in (want_gw, want_gb, want_gi, want_scratch)]
    ops.dense_backward(dev(ops, grad_big)[50:78], big_dev[50:78], dev(ops, y_big)[50:78],
                       dev(ops, weight), "tanh", *got)
    assert_close(got[3], want_scratch, dtype)
    assert_close(got[0], want_gw, dtype, product_magnitude(big[50:78].T, want_scratch))
    assert_close(got[1], want_gb, dtype, float(np.abs(want_scratch).sum(axis=0).max()))
    assert_close(got[2], want_gi, dtype, product_magnitude(want_scratch, weight.T))


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_activations(ops, dtype, activation, shape):
    rng = np.random.default_rng(4)
    x = randn(rng, shape, dtype, 3.0)
    y = ref.activation_forward(activation, x, np.empty(shape, dtype))
    x_dev = dev(ops, x)
    out = dev(ops, np.full(shape, np.nan, dtype))
    assert ops.activation_forward(activation, x_dev, out) is out
    assert_close(out, y, dtype)
    np.testing.assert_array_equal(to_host(x_dev), x)

    in_place = dev(ops, x)
    assert ops.activation_forward(activation, in_place, in_place) is in_place
    assert_close(in_place, y, dtype)

    grad_out = randn(rng, shape, dtype)
    want = ref.activation_backward(activation, y, grad_out, np.empty(shape, dtype))
    y_dev, grad_dev = dev(ops, y), dev(ops, grad_out)
    got = dev(ops, np.full(shape, np.nan, dtype))
    assert ops.activation_backward(activation, y_dev, grad_dev, got) is got
    assert_close(got, want, dtype)
    np.testing.assert_array_equal(to_host(y_dev), y)
    np.testing.assert_array_equal(to_host(grad_dev), grad_out)

    in_place = dev(ops, grad_out)  # out aliasing grad_out is allowed as well
    ops.activation_backward(activation, y_dev, in_place, in_place)
    assert_close(in_place, want, dtype)


@pytest.mark.skipif("numba" not in kernels.available(), reason="numba not installed")
def test_numba_float32_exp_within_one_ulp():
    """The float32 sigmoid and BCE rest on numba_cpu._exp32: 1 ulp from np.exp over its whole
    normal range, exact 0 / inf / nan outside it, denormals within one step."""
    import numba

    from fastvae.kernels.numba_cpu import _exp32

    @numba.njit
    def exp32(x, out):
        for i in range(x.size):
            out[i] = _exp32(x[i])

    x = np.concatenate([np.linspace(-110, 90, 400_001),
                        [np.nan, -np.inf, np.inf, -1e4, 1e4]]).astype(np.float32)
    got = np.empty_like(x)
    exp32(x, got)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny)
    ulps = np.abs(got[normal].view(np.int32).astype(np.int64) - want[normal].view(np.int32))
    assert ulps.max() <= 1
    tiny = np.isfinite(want) & ~normal
    assert np.abs(got[tiny] - want[tiny]).max() <= np.finfo(np.float32).smallest_subnormal
    np.testing.assert_array_equal(got[-5:], [np.nan, 0.0, np.inf, 0.0, np.inf])


def test_extreme_activations(ops, dtype):
    x = np.array([[-1e4, -1e3, -100.0, -30.0, -1e-3, -0.0, 0.0, 1e-3, 30.0, 100.0, 1e3, 1e4]], dtype)
    for activation in kernels.ACTIVATIONS:
        want = ref.activation_forward(activation, x, np.empty_like(x))
        out = dev(ops, np.empty_like(x))
        ops.activation_forward(activation, dev(ops, x), out)
        assert np.all(np.isfinite(to_host(out))), activation
        assert_close(out, want, dtype)
    out = dev(ops, np.empty_like(x))
    ops.activation_forward("sigmoid", dev(ops, x), out)
    assert to_host(out)[0, 0] == 0.0 and to_host(out)[0, -1] == 1.0


def test_unknown_activation(ops):
    x = dev(ops, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="unknown activation"):
        ops.activation_forward("swish", x, x)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("target_kind", ["zero", "one", "smoothed", "array"])
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("shape", [(128, 1), (128, 784), (7, 13), (1, 1)], ids=str)
def test_bce_with_logits(ops, dtype, shape, target_kind, with_grad):
    rng = np.random.default_rng(5)
    logits = randn(rng, shape, dtype, 4.0)
    target = {"zero": 0.0, "one": 1.0, "smoothed": 0.9}.get(target_kind)
    if target is None:
        target = rng.random(shape).astype(dtype)
    scale = 1.0 / shape[0]
    want_grad = np.empty(shape, dtype)
    want = ref.bce_with_logits(logits, target, scale, want_grad)
    grad = dev(ops, np.full(shape, np.nan, dtype)) if with_grad else None
    logits_dev = dev(ops, logits)
    loss = ops.bce_with_logits(logits_dev, dev(ops, target), scale, grad)
    assert_loss_close(loss, want, dtype)
    if with_grad:
        assert_close(grad, want_grad, dtype)
    np.testing.assert_array_equal(to_host(logits_dev), logits)


@pytest.mark.parametrize("target", [0.0, 1.0, "array"])
def test_bce_extreme_logits(ops, dtype, target):
    logits = np.array([[-1e4, -1e3, -100.0, -20.0, 0.0, 20.0, 100.0, 1e3, 1e4]], dtype).T
    if target == "array":
        target = np.linspace(0, 1, logits.size).reshape(logits.shape).astype(dtype)
    want_grad = np.empty_like(logits)
    want = ref.bce_with_logits(logits, target, 0.5, want_grad)
    grad = dev(ops, np.empty_like(logits))
    loss = ops.bce_with_logits(dev(ops, logits), dev(ops, target), 0.5, grad)
    assert np.isfinite(float(to_host(loss))) and np.all(np.isfinite(to_host(grad)))
    assert_loss_close(loss, want, dtype)
    assert_close(grad, want_grad, dtype)


@pytest.mark.parametrize("scalar_target", [False, True], ids=["array", "scalar"])
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("shape", [(128, 256), (7, 13), (1, 1)], ids=str)
def test_squared_error(ops, dtype, shape, with_grad, scalar_target):
    rng = np.random.default_rng(6)
    pred = randn(rng, shape, dtype)
    target = 0.25 if scalar_target else randn(rng, shape, dtype)
    scale = 1.0 / shape[0]
    want_grad = np.empty(shape, dtype)
    want = ref.squared_error(pred, target, scale, want_grad)
    grad = dev(ops, np.full(shape, np.nan, dtype)) if with_grad else None
    loss = ops.squared_error(dev(ops, pred), dev(ops, target), scale, grad)
    assert_loss_close(loss, want, dtype)
    if with_grad:
        assert_close(grad, want_grad, dtype)


@pytest.mark.parametrize("shape", [(128, 128), (7, 13), (1, 1)], ids=str)
def test_kl_reparam(ops, dtype, shape):
    rng = np.random.default_rng(7)
    mu, eps, grad_z = (randn(rng, shape, dtype) for _ in range(3))
    log_var = randn(rng, shape, dtype, 2.0)
    scale = 1.0 / shape[0]
    want_z = np.empty(shape, dtype)
    want = ref.kl_reparam_forward(mu, log_var, eps, scale, want_z)
    inputs = [dev(ops, a) for a in (mu, log_var, eps)]
    z = dev(ops, np.full(shape, np.nan, dtype))
    assert_loss_close(ops.kl_reparam_forward(*inputs, scale, z), want, dtype)
    assert_close(z, want_z, dtype)

    want_mu, want_lv = np.empty(shape, dtype), np.empty(shape, dtype)
    ref.kl_reparam_backward(grad_z, mu, log_var, eps, scale, want_mu, want_lv)
    got_mu, got_lv = (dev(ops, np.full(shape, np.nan, dtype)) for _ in range(2))
    ops.kl_reparam_backward(dev(ops, grad_z), *inputs, scale, got_mu, got_lv)
    assert_close(got_mu, want_mu, dtype)
    assert_close(got_lv, want_lv, dtype)
    for array, original in zip(inputs, (mu, log_var, eps)):
        np.testing.assert_array_equal(to_host(array), original)


def test_losses_on_row_slices(ops, dtype):
    rng = np.random.default_rng(8)
    big = randn(rng, (300, 64), dtype, 3.0)
    target = rng.random((300, 64)).astype(dtype)
    want_grad = np.empty((64, 64), dtype)
    want = ref.bce_with_logits(big[10:74], target[10:74], 0.5, want_grad)
    grad = dev(ops, np.empty((64, 64), dtype))
    loss = ops.bce_with_logits(dev(ops, big)[10:74], dev(ops, target)[10:74], 0.5, grad)
    assert_loss_close(loss, want, dtype)
    assert_close(grad, want_grad, dtype)
    want = ref.squared_error(big[:64], big[64:128], 0.5, want_grad)
    loss = ops.squared_error(dev(ops, big)[:64], dev(ops, big)[64:128], 0.5, grad)
    assert_loss_close(loss, want, dtype)
    assert_close(grad, want_grad, dtype)


# ----------------------------------------------------------------------------- optimisers
@pytest.mark.parametrize("shape", [(100_003,), (7, 13)], ids=str)
def test_adam_update(ops, dtype, shape):
    rng = np.random.default_rng(9)
    want = [randn(rng, shape, dtype), np.zeros(shape, dtype), np.zeros(shape, dtype)]
    got = [dev(ops, a) for a in want]
    for step in range(1, 6):
        grad = randn(rng, shape, dtype, 10.0 ** (step - 3))
        ref.adam_update(want[0], grad, want[1], want[2], 1e-3, 0.9, 0.999, 1e-8, step)
        grad_dev = dev(ops, grad)
        ops.adam_update(got[0], grad_dev, got[1], got[2], 1e-3, 0.9, 0.999, 1e-8, step)
        np.testing.assert_array_equal(to_host(grad_dev), grad)
        for g, w in zip(got, want):
            assert_close(g, w, dtype)


@pytest.mark.parametrize("shape", [(100_003,), (7, 13)], ids=str)
def test_sgd_update(ops, dtype, shape):
    rng = np.random.default_rng(10)
    want = [randn(rng, shape, dtype), np.zeros(shape, dtype)]
    got = [dev(ops, a) for a in want]
    for _ in range(5):
        grad = randn(rng, shape, dtype)
        ref.sgd_update(want[0], grad, want[1], 0.01, 0.9)
        ops.sgd_update(got[0], dev(ops, grad), got[1], 0.01, 0.9)
        for g, w in zip(got, want):
            assert_close(g, w, dtype)


@pytest.mark.parametrize("apply", [1.0, 0.0])
def test_optimiser_updates_follow_their_apply_mask(ops, dtype, apply):
    """apply 1 (a 0-d array, as gating computes it on the device) is the unmasked update bit
    for bit; apply 0 leaves parameters and moments exactly as they were, even at step 0 of
    a count that a skipped first step never advanced (no 1 / (1 - beta**0) reaches them)."""
    rng = np.random.default_rng(12)
    shape = (1_001,)
    start = [randn(rng, shape, dtype), randn(rng, shape, dtype, 0.1),
             np.abs(randn(rng, shape, dtype, 0.01))]
    grad = randn(rng, shape, dtype)
    mask = ops.xp.asarray(np.float64(apply))
    step = 3 if apply else 0
    plain = [dev(ops, a) for a in start]
    ops.adam_update(plain[0], dev(ops, grad), plain[1], plain[2], 1e-3, 0.9, 0.999, 1e-8, 3)
    masked = [dev(ops, a) for a in start]
    ops.adam_update(masked[0], dev(ops, grad), masked[1], masked[2], 1e-3, 0.9, 0.999, 1e-8,
                    step, apply=mask)
    for got, want in zip(masked, plain if apply else start):
        np.testing.assert_array_equal(to_host(got), to_host(want))
    plain = [dev(ops, a) for a in start[:2]]
    ops.sgd_update(plain[0], dev(ops, grad), plain[1], 1e-2, 0.9)
    masked = [dev(ops, a) for a in start[:2]]
    ops.sgd_update(masked[0], dev(ops, grad), masked[1], 1e-2, 0.9, apply=mask)
    for got, want in zip(masked, plain if apply else start[:2]):
        np.testing.assert_array_equal(to_host(got), to_host(want))


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_a_skipped_update_leaves_the_bf16_weight_copy_too(name):
    """With a bf16 weight copy, apply 0 leaves it as it was (it still matches the weights);
    apply 1 refreshes it as without a mask."""
    if name not in kernels.available():
        pytest.skip(f"no {name} backend here")
    ops = kernels.load(name)
    rng = np.random.default_rng(13)
    param, grad = randn(rng, 999, np.float32), randn(rng, 999, np.float32)
    for apply in (0.0, 1.0):
        got, m, v = param.copy(), np.zeros(999, np.float32), np.zeros(999, np.float32)
        copy16 = np.zeros(999, np.uint16)
        ops.adam_update(got, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 1, np.asarray(apply),
                        param16=copy16)
        want16 = np.zeros(999, np.uint16) if not apply else ref.to_bf16(got, np.empty_like(copy16))
        np.testing.assert_array_equal(copy16, want16)
        np.testing.assert_array_equal(got == param, not apply)


def test_optimiser_on_a_slice_of_a_flat_buffer(ops, dtype):
    """The optimisers may get one network's share of a flat parameter buffer."""
    rng = np.random.default_rng(11)
    flat = randn(rng, 10_000, dtype)
    grad = randn(rng, 10_000, dtype)
    want = flat.copy()
    avg, avg_sq = np.zeros(4_000, dtype), np.zeros(4_000, dtype)
    ref.adam_update(want[3_000:7_000], grad[3_000:7_000], avg, avg_sq, 1e-2, 0.9, 0.999, 1e-8, 1)
    got = dev(ops, flat)
    ops.adam_update(got[3_000:7_000], dev(ops, grad)[3_000:7_000], dev(ops, np.zeros(4_000, dtype)),
                    dev(ops, np.zeros(4_000, dtype)), 1e-2, 0.9, 0.999, 1e-8, 1)
    assert_close(got, want, dtype)
    np.testing.assert_array_equal(to_host(got)[:3_000], flat[:3_000])
    np.testing.assert_array_equal(to_host(got)[7_000:], flat[7_000:])


# ----------------------------------------------------------------------------- allocation
def test_steady_state_allocates_no_arrays(ops):
    """After a warm-up call, no op allocates host memory of the size of its arrays."""
    rng = np.random.default_rng(12)
    dtype = np.float32
    x, weight, bias = (dev(ops, a) for a in dense_inputs(rng, 128, 784, 512, dtype))
    out, scratch, other = (dev(ops, np.empty((128, 512), dtype)) for _ in range(3))
    grad_w, grad_b = dev(ops, np.empty((784, 512), dtype)), dev(ops, np.empty(512, dtype))
    grad_in = dev(ops, np.empty((128, 784), dtype))
    params, grads, m, v = (dev(ops, randn(rng, 200_000, dtype)) for _ in range(4))
    smallest = 128 * 512 * 4
    calls = {
        "dense_forward": lambda: ops.dense_forward(x, weight, bias, "sigmoid", out),
        "dense_backward": lambda: ops.dense_backward(out, x, out, weight, "sigmoid", grad_w, grad_b,
                                                     grad_in, scratch),
        "activation_forward": lambda: ops.activation_forward("leaky_relu", out, scratch),
        "activation_backward": lambda: ops.activation_backward("sigmoid", out, out, scratch),
        "bce_with_logits": lambda: ops.bce_with_logits(out, 1.0, 0.1, scratch),
        "squared_error": lambda: ops.squared_error(out, other, 0.1, scratch),
        "kl_reparam_forward": lambda: ops.kl_reparam_forward(out, out, out, 0.1, scratch),
        "kl_reparam_backward": lambda: ops.kl_reparam_backward(out, out, out, out, 0.1, scratch,
                                                               other),
        "adam_update": lambda: ops.adam_update(params, grads, m, v, 1e-3, 0.9, 0.999, 1e-8, 2),
        "sgd_update": lambda: ops.sgd_update(params, grads, m, 1e-3, 0.9),
    }
    assert set(calls) == set(kernels.OPS)
    for name, call in calls.items():
        call()
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < smallest // 8, f"{name} allocated {peak} bytes"


# ----------------------------------------------------------------------------- the table
def test_backend_lacking_an_op_is_refused():
    partial = types.SimpleNamespace(
        xp=np, unavailable_reason=lambda: None,
        **{op: getattr(ref, op) for op in kernels.OPS if op != "kl_reparam_backward"},
    )
    kernels.register("partial", partial)
    try:
        with pytest.raises(TypeError, match="kl_reparam_backward"):
            kernels.load("partial")
        assert "partial" not in kernels.available()
    finally:
        kernels.unregister("partial")
    assert "partial" not in kernels.names()


@pytest.mark.parametrize("backend, dependency, message", [
    ("numba", "numba", "numba is not installed: pip install 'fastvae-numpy[numba]'"),
    ("cupy", "cupy", "CuPy is not installed: pip install 'fastvae-numpy[gpu]'"),
])
def test_backend_module_imports_without_its_library(backend, dependency, message, monkeypatch):
    """Without its library a backend module still imports, and loading it says how to install."""
    path = importlib.util.find_spec(kernels.registered(backend)).origin
    monkeypatch.setitem(sys.modules, dependency, None)  # `import <dependency>` now fails
    spec = importlib.util.spec_from_file_location(
        f"fastvae.kernels._{backend}_without_{dependency}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.unavailable_reason().startswith(message)
    assert all(callable(getattr(module, op)) for op in kernels.OPS)
    previous = kernels.register(backend, module)
    try:
        with pytest.raises(kernels.BackendUnavailable, match=message.split(":")[0]):
            kernels.load(backend)
        with pytest.raises(BackendUnavailable, match=message.split(":")[0]):
            Backend(backend)                 # fastvae's own error, from the kernels' one
    finally:
        kernels.register(backend, previous)
