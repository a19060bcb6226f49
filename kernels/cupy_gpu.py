"""The CuPy GPU backend: the reference's ops as fused CUDA kernels, products on cuBLAS.

Same functions, signatures and conventions as `numpy_ref` (read its docstring). Design:
- matrix products go to cuBLAS through `cupy.matmul(..., out=...)` (transposes are views);
- bias + activation is one ElementwiseKernel pass after the product; the activation
  derivative and the bias-gradient column sum are one RawKernel pass (one block per 32
  columns, each thread walking rows, partial sums reduced in shared memory);
- every loss is one RawKernel pass that writes its gradient and a per-block partial sum in
  float64, then a one-block kernel that sums the partials in a fixed order (deterministic, no
  atomics) into a new 0-d float64 array: nothing is copied to the host, no op synchronises;
- the reparameterisation forward (z and KL) and backward, Adam and SGD are one pass each;
  Adam's and SGD's ElementwiseKernels run over the optimiser's flat buffer, with the
  step-dependent bias corrections computed on the host and passed as scalars;
- float32 and float64 through the type placeholder `T` (ElementwiseKernel) or a `typedef` in
  front of the RawModule source; elements are computed in T, sums accumulated in double;
- every RawKernel is correct for any grid size (grid-stride and tile loops, strides taken from
  blockDim; block sizes: a multiple of 32 for the loss kernels, at most 32 x 32 for the
  bias-gradient one), so the launch sizes below are tuning only, and tests/test_cupy.py runs
  the same sources on the CPU, one thread per block, through a C++ shim.

Every CUDA source is a module-level string (`ELEMENTWISE` bodies and preambles,
`RAW_KERNELS`), and `raw_module_source` / `elementwise_harness_source` give the exact text
to compile, so tests compile all of them with NVRTC on machines without a GPU. CuPy kernel
objects are built lazily on first use and memoised.

The module imports without CuPy and without a GPU; `unavailable_reason()` says which is
missing, and `kernels.load("cupy")` turns that into `BackendUnavailable`.
"""
import functools
import importlib.util

import numpy as np

try:
    import cupy
except Exception as error:  # ImportError, or a broken CUDA install: load() reports it
    cupy = None
    _IMPORT_ERROR = f"CuPy is not installed: pip install 'fastvae-numpy[gpu]' ({error})"
else:
    _IMPORT_ERROR = None

LEAKY_SLOPE = 0.2
xp = cupy

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH = range(5)
_CODES = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "sigmoid": SIGMOID,
          "tanh": TANH}
CTYPES = {"float32": "float", "float64": "double"}

THREADS = 256            # threads per block of the loss kernels (a multiple of 32)
MAX_BLOCKS = 1024        # fixed cap, so the summation order depends only on the size
COLUMN_BLOCK = (32, 16)  # act_backward_bias: 32 columns x 16 row-walkers per block


def unavailable_reason():
    """None when CuPy imports and sees a CUDA GPU, else a sentence saying what to do."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not cupy.cuda.is_available():
        alternatives = ["numpy"] + (["numba"] if importlib.util.find_spec("numba") else [])
        use = " or ".join(f"--backend {name}" for name in alternatives)
        return ("CuPy is installed but no CUDA GPU is visible (cupy.cuda.is_available() is "
                f"False); available backends: {', '.join(alternatives)} (use {use})")
    return None


# ----------------------------------------------------------------------------- CUDA sources
# Device functions shared by the activation kernels; `T` is typedef'd in front (CuPy puts the
# typedef of an ElementwiseKernel's type placeholder before its preamble).
ACTIVATION_PREAMBLE = r"""
#define FV_IDENTITY 0
#define FV_RELU 1
#define FV_LEAKY_RELU 2
#define FV_SIGMOID 3
#define FV_TANH 4
#define FV_LEAKY_SLOPE %(slope)r

/* Logistic function that never overflows: exp of -|v| only. */
__device__ __forceinline__ T fv_sigmoid(T v) {
    const T e = exp(-fabs(v));
    const T s = T(1) / (T(1) + e);
    return v >= T(0) ? s : e * s;
}

__device__ __forceinline__ T fv_act(int code, T v) {
    switch (code) {
    case FV_RELU: return v < T(0) ? T(0) : v;
    case FV_LEAKY_RELU: return v > T(0) ? v : T(FV_LEAKY_SLOPE) * v;
    case FV_SIGMOID: return fv_sigmoid(v);
    case FV_TANH: return tanh(v);
    default: return v;
    }
}

/* grad_out * activation'(x), written with the activation's output y. */
__device__ __forceinline__ T fv_dact(int code, T y, T g) {
    switch (code) {
    case FV_RELU: return g * (y > T(0) ? T(1) : T(0));
    case FV_LEAKY_RELU: return y > T(0) ? g : T(FV_LEAKY_SLOPE) * g;
    case FV_SIGMOID: return g * (y * (T(1) - y));
    case FV_TANH: return g * (T(1) - y * y);
    default: return g;
    }
}
""" % {"slope": LEAKY_SLOPE}

# name -> (array inputs, scalar inputs as (type, name), outputs, body, preamble).
# Array parameters have type T; outputs are read-write references (in-place updates).
ELEMENTWISE = {
    "bias_act": (
        ("bias",), (("int32", "code"),), ("y",),
        "y = fv_act(code, y + bias);",
        ACTIVATION_PREAMBLE,
    ),
    "act_forward": (
        ("x",), (("int32", "code"),), ("y",),
        "y = fv_act(code, x);",
        ACTIVATION_PREAMBLE,
    ),
    "act_backward": (
        ("y", "g"), (("int32", "code"),), ("dx",),
        "dx = fv_dact(code, y, g);",
        ACTIVATION_PREAMBLE,
    ),
    "kl_reparam_backward": (
        ("gz", "mu", "lv", "eps"), (("T", "scale"),), ("gmu", "glv"),
        """
        const T sd = exp(T(0.5) * lv);
        gmu = gz + scale * mu;
        glv = gz * eps * T(0.5) * sd + scale * T(0.5) * (sd * sd - T(1));
        """,
        "",
    ),
    # lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps): the bias-corrected
    # update of Kingma & Ba with one division; the two corrections come from the host.
    "adam": (
        ("grad",),
        (("T", "beta1"), ("T", "one_minus_beta1"), ("T", "beta2"), ("T", "one_minus_beta2"),
         ("T", "step_size"), ("T", "inv_sqrt_correction2"), ("T", "eps")),
        ("param", "exp_avg", "exp_avg_sq"),
        """
        const T m = beta1 * exp_avg + one_minus_beta1 * grad;
        const T v = beta2 * exp_avg_sq + one_minus_beta2 * (grad * grad);
        exp_avg = m;
        exp_avg_sq = v;
        param -= step_size * m / (sqrt(v) * inv_sqrt_correction2 + eps);
        """,
        "",
    ),
    "sgd": (
        ("grad",), (("T", "lr"), ("T", "momentum")), ("param", "velocity"),
        """
        velocity = momentum * velocity + grad;
        param -= lr * velocity;
        """,
        "",
    ),
}

# Shared by the RawKernels: a block-wide float64 sum and the kernel that finishes a loss.
REDUCTION_PREAMBLE = r"""
/* The sum of v over the block (blockDim.x a multiple of 32, at most 1024), in thread 0.
   Called at most once per kernel (it uses one shared array). */
__device__ __forceinline__ double fv_block_sum(double v) {
    __shared__ double fv_warp_sums[32];
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) fv_warp_sums[warp] = v;
    __syncthreads();
    const unsigned warps = (blockDim.x + 31u) >> 5;
    v = threadIdx.x < warps ? fv_warp_sums[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1)
            v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

#define FV_GRID_STRIDE_LOOP(k, n) \
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < (n); \
         k += (long long)gridDim.x * blockDim.x)
"""

RAW_KERNELS = {
    # result[0] = scale * sum(partial[0:count]), in a fixed order; one block.
    "fv_finish_sum": r"""
extern "C" __global__ void fv_finish_sum(const double* partial, int count, double scale,
                                         double* result) {
    double v = 0.0;
    for (int k = threadIdx.x; k < count; k += blockDim.x) v += partial[k];
    v = fv_block_sum(v);
    if (threadIdx.x == 0) result[0] = scale * v;
}
""",
    # Stable BCE of sigmoid(logits) against a target array (has_target) or a scalar;
    # grad = (sigmoid(v) - t) * scale when want_grad; partial[block] = sum of the losses.
    "fv_bce_with_logits": r"""
extern "C" __global__ void fv_bce_with_logits(
        const T* logits, const T* target, T target_value, int has_target, T scale,
        T* grad, int want_grad, long long n, double* partial) {
    double acc = 0.0;
    FV_GRID_STRIDE_LOOP(k, n) {
        const T v = logits[k];
        const T t = has_target ? target[k] : target_value;
        const T e = exp(-fabs(v));
        acc += (double)((v > T(0) ? v : T(0)) - v * t + log1p(e));
        if (want_grad) {
            const T s = T(1) / (T(1) + e);
            grad[k] = ((v >= T(0) ? s : e * s) - t) * scale;
        }
    }
    acc = fv_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
""",
    # d = pred - target; grad = d * scale when want_grad; partial[block] = sum of d * d.
    "fv_squared_error": r"""
extern "C" __global__ void fv_squared_error(
        const T* pred, const T* target, T target_value, int has_target, T scale,
        T* grad, int want_grad, long long n, double* partial) {
    double acc = 0.0;
    FV_GRID_STRIDE_LOOP(k, n) {
        const T d = pred[k] - (has_target ? target[k] : target_value);
        acc += (double)d * (double)d;
        if (want_grad) grad[k] = d * scale;
    }
    acc = fv_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
""",
    # z = mu + exp(log_var / 2) * eps; partial[block] = sum of 1 + log_var - mu^2 - exp(log_var).
    "fv_kl_reparam_forward": r"""
extern "C" __global__ void fv_kl_reparam_forward(
        const T* mu, const T* log_var, const T* eps, T* z, long long n, double* partial) {
    double acc = 0.0;
    FV_GRID_STRIDE_LOOP(k, n) {
        const T m = mu[k];
        const T lv = log_var[k];
        z[k] = m + exp(T(0.5) * lv) * eps[k];
        acc += (double)(T(1) + lv - m * m - exp(lv));
    }
    acc = fv_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
""",
    # scratch = grad_out * act'(y) and grad_bias = column sums of scratch, in one pass over
    # (rows, cols) row-major arrays. A block takes tiles of blockDim.x (<= 32) columns:
    # threadIdx.x picks a column (coalesced reads of a row), the blockDim.y (<= 32) row
    # walkers each sum every blockDim.y-th row, and shared memory adds the walkers up.
    "fv_act_backward_bias": r"""
#define FV_MAX_ROW_WALKERS 32
extern "C" __global__ void fv_act_backward_bias(
        const T* grad_out, const T* y, T* scratch, T* grad_bias, long long rows, int cols,
        int code) {
    __shared__ double fv_column_sums[FV_MAX_ROW_WALKERS][33];
    for (long long tile = blockIdx.x; tile * blockDim.x < cols; tile += gridDim.x) {
        const long long col = tile * blockDim.x + threadIdx.x;
        double acc = 0.0;
        if (col < cols) {
            for (long long r = threadIdx.y; r < rows; r += blockDim.y) {
                const long long k = r * cols + col;
                const T g = fv_dact(code, y[k], grad_out[k]);
                scratch[k] = g;
                acc += (double)g;
            }
        }
        fv_column_sums[threadIdx.y][threadIdx.x] = acc;
        __syncthreads();
        if (threadIdx.y == 0 && col < cols) {
            double total = 0.0;
            for (unsigned w = 0; w < blockDim.y; ++w) total += fv_column_sums[w][threadIdx.x];
            grad_bias[col] = (T)total;
        }
        __syncthreads();  /* the next tile reuses fv_column_sums */
    }
}
""",
}


def _ctype(dtype):
    name = np.dtype(dtype).name
    if name not in CTYPES:
        raise TypeError(f"cupy backend: unsupported dtype {name} (use float32 or float64)")
    return CTYPES[name]


def raw_module_source(dtype, names=None):
    """The CUDA source of the RawModule for `dtype` (all of RAW_KERNELS, or `names`)."""
    names = tuple(RAW_KERNELS) if names is None else tuple(names)
    parts = [f"typedef {_ctype(dtype)} T;", ACTIVATION_PREAMBLE, REDUCTION_PREAMBLE]
    parts += [RAW_KERNELS[name] for name in names]
    return "\n".join(parts)


def elementwise_params(name):
    """(in_params, out_params) strings of ElementwiseKernel `name`, in CuPy's syntax."""
    arrays, scalars, outputs, _, _ = ELEMENTWISE[name]
    in_params = ", ".join([f"T {a}" for a in arrays] + [f"{t} {s}" for t, s in scalars])
    return in_params, ", ".join(f"T {o}" for o in outputs)


def elementwise_harness_source(name, dtype):
    """ElementwiseKernel `name`'s body in a kernel shaped as CuPy generates it, for NVRTC.

    As in CuPy's generated code: the typedef of T, then the preamble, array inputs bound as
    `const T &x = _raw_x[i]`, outputs as `T &y = _raw_y[i]`, scalars passed by value, and
    the loop index `i`.
    """
    arrays, scalars, outputs, body, preamble = ELEMENTWISE[name]
    ctypes = {"T": "T", "int32": "int"}
    params = ([f"const T* _raw_{a}" for a in arrays] + [f"{ctypes[t]} {s}" for t, s in scalars]
              + [f"T* _raw_{o}" for o in outputs] + ["long long _n"])
    binds = ([f"const T &{a} = _raw_{a}[i];" for a in arrays]
             + [f"T &{o} = _raw_{o}[i];" for o in outputs])
    return "\n".join([
        f"typedef {_ctype(dtype)} T;",
        preamble,
        f'extern "C" __global__ void fastvae_{name}({", ".join(params)}) {{',
        "  for (ptrdiff_t i = (ptrdiff_t)blockIdx.x * blockDim.x + threadIdx.x; i < _n;",
        "       i += (ptrdiff_t)gridDim.x * blockDim.x) {",
        *("    " + line for line in binds),
        body,
        "  }",
        "}",
    ])


# ----------------------------------------------------------------------------- kernel objects
def _require_cupy():
    if cupy is None:
        raise RuntimeError(_IMPORT_ERROR)


@functools.cache
def elementwise_kernel(name):
    """The cupy.ElementwiseKernel `name` (generic in T; CuPy compiles it per dtype on use)."""
    _require_cupy()
    in_params, out_params = elementwise_params(name)
    body, preamble = ELEMENTWISE[name][3], ELEMENTWISE[name][4]
    return cupy.ElementwiseKernel(in_params, out_params, body, f"fastvae_{name}",
                                  preamble=preamble, no_return=True)


@functools.cache
def raw_module(dtype_name):
    """The cupy.RawModule of every RAW_KERNELS entry for one dtype (compiled on first use)."""
    _require_cupy()
    return cupy.RawModule(code=raw_module_source(dtype_name))


@functools.cache
def _raw_function(name, dtype_name):
    return raw_module(dtype_name).get_function(name)


def _raw(name, dtype):
    return _raw_function(name, np.dtype(dtype).name)


# ----------------------------------------------------------------------------- helpers
def _code(activation):
    try:
        return _CODES[activation]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {activation!r}") from None


def _out(array, dtype):
    """An output array a RawKernel may write through its pointer: C-contiguous, of `dtype`."""
    if not array.flags.c_contiguous:
        raise ValueError("cupy backend: output arrays must be C-contiguous")
    if array.dtype != dtype:
        raise TypeError(f"cupy backend: output array is {array.dtype}, expected {dtype}")
    return array


def _in(array, dtype):
    """An input as a C-contiguous device array of `dtype` (no copy when it already is one)."""
    array = cupy.asarray(array, dtype=dtype)
    return array if array.flags.c_contiguous else cupy.ascontiguousarray(array)


def _target(target, like):
    """(array or None, scalar value) for a loss target that is an array or a Python number."""
    if isinstance(target, (int, float, np.number)):
        return None, like.dtype.type(target)
    target = _in(target, like.dtype)
    if target.shape != like.shape:
        target = cupy.ascontiguousarray(cupy.broadcast_to(target, like.shape))
    return target, like.dtype.type(0)


def _blocks(n):
    return int(max(1, min(MAX_BLOCKS, -(-n // THREADS))))


def _finish(partial, blocks, scale, dtype):
    """A new 0-d float64 array: scale * sum(partial), summed on the device."""
    result = cupy.empty((), dtype=cupy.float64)
    _raw("fv_finish_sum", dtype)(  # in every dtype's module: no second compile
        (1,), (THREADS,), (partial, np.int32(blocks), np.float64(scale), result))
    return result


def _loss(kernel, values, target, scale, grad_out, final_scale):
    """Launch a loss kernel (BCE or squared error) and finish its sum; see RAW_KERNELS."""
    values = _in(values, values.dtype)
    real = values.dtype.type
    target_array, target_value = _target(target, values)
    want_grad = grad_out is not None
    grad = _out(grad_out, values.dtype) if want_grad else values  # unwritten if not want_grad
    n = values.size
    blocks = _blocks(n)
    partial = cupy.empty(blocks, dtype=cupy.float64)
    _raw(kernel, values.dtype)(
        (blocks,), (THREADS,),
        (values, values if target_array is None else target_array, target_value,
         np.int32(target_array is not None), real(scale), grad, np.int32(want_grad),
         np.int64(n), partial))
    return _finish(partial, blocks, final_scale, values.dtype)


# ----------------------------------------------------------------------------- public ops
def activation_forward(activation, x, out):
    """out = activation(x); out may be x itself."""
    code = _code(activation)
    elementwise_kernel("act_forward")(x, code, out)
    return out


def activation_backward(activation, y, grad_out, out):
    """out = grad_out * activation'(x), written with the activation's output y = activation(x)."""
    code = _code(activation)
    if y is None and code == IDENTITY:
        y = grad_out  # identity never reads y
    elementwise_kernel("act_backward")(y, grad_out, code, out)
    return out


def dense_forward(x, weight, bias, activation, out):
    """out = activation(x @ weight + bias): a cuBLAS product, then one bias+activation pass."""
    code = _code(activation)
    cupy.matmul(x, weight, out=out)
    elementwise_kernel("bias_act")(bias, code, out)
    return out


def dense_backward(grad_out, x, y, weight, activation, grad_weight, grad_bias, grad_in, scratch):
    """Back through y = activation(x @ weight + bias): fills grad_weight, grad_bias, grad_in.

    `scratch` (shaped like grad_out) receives the gradient before the activation.
    """
    code = _code(activation)
    if y is None and code == IDENTITY:
        y = grad_out
    if grad_weight is not None:
        dtype = scratch.dtype
        rows, cols = grad_out.shape
        if grad_bias is None:
            grad_bias = cupy.empty(cols, dtype=dtype)
        if cols:
            _raw("fv_act_backward_bias", dtype)(
                (-(-cols // COLUMN_BLOCK[0]),), COLUMN_BLOCK,
                (_in(grad_out, dtype), _in(y, dtype), _out(scratch, dtype), _out(grad_bias, dtype),
                 np.int64(rows), np.int32(cols), np.int32(code)))
        cupy.matmul(x.T, scratch, out=grad_weight)
    else:
        elementwise_kernel("act_backward")(y, grad_out, code, scratch)
    if grad_in is not None:
        cupy.matmul(scratch, weight.T, out=grad_in)
    return grad_in


def bce_with_logits(logits, target, scale, grad_out):
    """scale * sum BCE(sigmoid(logits), target), in the stable logits form; grad into grad_out.

    `target` is an array shaped like logits or a scalar (1.0 real, 0.0 fake). Returns a 0-d
    float64 device array (no synchronisation).
    """
    return _loss("fv_bce_with_logits", logits, target, scale, grad_out, float(scale))


def squared_error(pred, target, scale, grad_out):
    """scale * sum 0.5 * (pred - target)**2; gradient with respect to pred into grad_out."""
    return _loss("fv_squared_error", pred, target, scale, grad_out, 0.5 * float(scale))


def kl_reparam_forward(mu, log_var, eps, scale, z_out):
    """z = mu + exp(log_var / 2) * eps; returns scale * KL(N(mu, exp(log_var)) || N(0, I))."""
    dtype = z_out.dtype
    n = z_out.size
    blocks = _blocks(n)
    partial = cupy.empty(blocks, dtype=cupy.float64)
    _raw("fv_kl_reparam_forward", dtype)(
        (blocks,), (THREADS,),
        (_in(mu, dtype), _in(log_var, dtype), _in(eps, dtype), _out(z_out, dtype), np.int64(n),
         partial))
    return _finish(partial, blocks, -0.5 * float(scale), dtype)


def kl_reparam_backward(grad_z, mu, log_var, eps, scale, grad_mu, grad_log_var):
    """Gradients of (loss through z) + scale * KL with respect to mu and log_var."""
    elementwise_kernel("kl_reparam_backward")(grad_z, mu, log_var, eps, float(scale),
                                              grad_mu, grad_log_var)


def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step):
    """One Adam step in place (Kingma & Ba, with bias correction); `step` counts from 1."""
    beta1, beta2 = float(beta1), float(beta2)
    step_size = float(lr) / (1.0 - beta1**step)
    inv_sqrt_correction2 = 1.0 / float(np.sqrt(1.0 - beta2**step))
    elementwise_kernel("adam")(grad, beta1, 1.0 - beta1, beta2, 1.0 - beta2, step_size,
                               inv_sqrt_correction2, float(eps), param, exp_avg, exp_avg_sq)


def sgd_update(param, grad, velocity, lr, momentum):
    """One step of SGD with (heavy-ball) momentum, in place."""
    elementwise_kernel("sgd")(grad, float(lr), float(momentum), param, velocity)


# ----------------------------------------------------------------------------- random numbers
def make_generator(seed=None):
    """A device-side generator (cuRAND XORWOW through `cupy.random.Generator`).

    `seed` is anything `cupy.random.default_rng` takes: None, an int or a
    `numpy.random.SeedSequence`. Its stream differs from NumPy's: use host-drawn noise where
    runs must match the CPU backends.
    """
    _require_cupy()
    return cupy.random.default_rng(seed)


def standard_normal(generator, out):
    """Fill device array `out` with N(0, 1) noise drawn on the device; returns `out`."""
    if out.flags.c_contiguous:
        generator.standard_normal(size=out.shape, dtype=out.dtype, out=out)
    else:
        out[...] = generator.standard_normal(size=out.shape, dtype=out.dtype)
    return out
