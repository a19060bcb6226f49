"""The CuPy GPU backend: the reference's ops as fused CUDA kernels, products on cuBLAS.

Same functions, signatures and conventions as `numpy_ref` (read its docstring). Design:
- matrix products go to cuBLAS's gemm into preallocated outputs (transposes are views), on
  a cuBLAS handle of this module's own, called through ctypes: CuPy refuses cuBLAS calls
  while a stream is being captured into a CUDA graph, and cuBLAS itself supports capture;
- bias + activation is one ElementwiseKernel pass after the product; the activation
  derivative and the bias-gradient column sum are one RawKernel pass (one block per 32
  columns, each thread walking rows, partial sums reduced in shared memory);
- every loss is one RawKernel pass that writes its gradient and a per-block partial sum in
  float64, then a one-block kernel that sums the partials in a fixed order (deterministic, no
  atomics) into a new 0-d float64 array: nothing is copied to the host, no op synchronises;
- the reparameterisation forward (z and KL) and backward, Adam and SGD are one pass each;
  Adam's and SGD's ElementwiseKernels run over the optimiser's flat buffer; Adam computes its
  bias corrections from the step count, a host number or a device scalar;
- `capture_graph` records a function's launches as a CUDA graph to replay with one launch;
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
import ctypes
import ctypes.util
import functools
import importlib.util

import numpy as np

from . import ACTIVATION_CODES as _CODES
from . import LEAKY_SLOPE

try:
    import cupy
except Exception as error:  # ImportError, or a broken CUDA install: load() reports it
    cupy = None
    _IMPORT_ERROR = f"CuPy is not installed: pip install 'fastvae-numpy[gpu]' ({error})"
else:
    _IMPORT_ERROR = None

xp = cupy
DEVICE = "gpu"  # what the bench labels its timings with

IDENTITY = _CODES["identity"]
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
ACTIVATION_PREAMBLE = "".join(f"#define FV_{name.upper()} {code}\n"
                              for name, code in _CODES.items()) + r"""#define FV_LEAKY_SLOPE %(slope)r

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
    # update of Kingma & Ba with one division. `step` t is a host number or a 0-d float64
    # device array (broadcast): a captured CUDA graph advances the count on the device.
    # `apply` (1.0 or 0.0, a host number or a 0-d device array) skips the update where 0:
    # equilibrium gating decides it on the device, inside the graph.
    "adam": (
        ("grad",),
        (("float64", "beta1"), ("float64", "beta2"), ("float64", "lr"), ("float64", "eps"),
         ("float64", "step"), ("float64", "apply")),
        ("param", "exp_avg", "exp_avg_sq"),
        """
        if (apply != 0.0) {
            const T step_size = (T)(lr / (1.0 - pow(beta1, (double)step)));
            const T inv_sqrt_correction2 = (T)(1.0 / sqrt(1.0 - pow(beta2, (double)step)));
            const T m = (T)beta1 * exp_avg + (T)(1.0 - beta1) * grad;
            const T v = (T)beta2 * exp_avg_sq + (T)(1.0 - beta2) * (grad * grad);
            exp_avg = m;
            exp_avg_sq = v;
            param -= step_size * m / (sqrt(v) * inv_sqrt_correction2 + (T)eps);
        }
        """,
        "",
    ),
    "sgd": (
        ("grad",), (("T", "lr"), ("T", "momentum"), ("float64", "apply")),
        ("param", "velocity"),
        """
        if (apply != 0.0) {
            velocity = momentum * velocity + grad;
            param -= lr * velocity;
        }
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
    ctypes = {"T": "T", "int32": "int", "float64": "double"}
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


# ----------------------------------------------------------------------------- cuBLAS
OP_N, OP_T = 0, 1                 # cublasOperation_t
WORKSPACE_BYTES = 32 * 1024 ** 2  # cuBLAS's recommended workspace on Hopper (4 MiB before)


def _blas_operand(array):
    """(array, op, leading dimension) of a row-major product operand as cuBLAS sees it.

    cuBLAS is column-major: a row-major array (rows may be strided, as a slice of rows is)
    is its own transpose there, op N; a transposed view of one is op T. Anything else is
    copied to a contiguous array first.
    """
    rows, cols = array.shape
    item = array.itemsize
    row_stride, col_stride = (stride // item for stride in array.strides)
    if all(stride % item == 0 and stride > 0 for stride in array.strides):
        if (col_stride == 1 or cols == 1) and row_stride >= cols:
            return array, OP_N, max(row_stride, 1)
        if (row_stride == 1 or rows == 1) and col_stride >= rows:
            return array, OP_T, max(col_stride, 1)
    array = cupy.ascontiguousarray(array)
    return array, OP_N, max(cols, 1)


def gemm_arguments(a, b, out):
    """cuBLAS gemm's arguments for the row-major product out = a @ b.

    Returns (transa, transb, m, n, k, A, lda, B, ldb, C, ldc) with arrays for the pointers:
    column-major, out is outᵀ = bᵀ aᵀ, so b goes first.
    """
    (m, k), (k2, n) = a.shape, b.shape
    if k2 != k or out.shape != (m, n):
        raise ValueError(f"matmul: shapes {a.shape} @ {b.shape} -> {out.shape} do not match")
    if not a.dtype == b.dtype == out.dtype:
        raise TypeError(f"matmul: dtypes {a.dtype}, {b.dtype}, {out.dtype} differ")
    out_rows = out.strides[0] // out.itemsize
    if not (out.strides[1] == out.itemsize or n == 1) or out_rows < n:
        raise ValueError("cupy backend: a product's output must be row-major")
    a, op_a, ld_a = _blas_operand(a)
    b, op_b, ld_b = _blas_operand(b)
    return op_b, op_a, n, m, k, b, ld_b, a, ld_a, out, max(out_rows, 1)


class Cublas:
    """A cuBLAS handle of our own with its workspace, for float and double gemm."""

    def __init__(self):
        self.lib = _load_cublas()
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        for name, real in (("cublasSgemm_v2", ctypes.c_float), ("cublasDgemm_v2", ctypes.c_double)):
            function = getattr(self.lib, name)
            function.argtypes = [pointer] + [integer] * 5 + [ctypes.POINTER(real), pointer, integer,
                                 pointer, integer, ctypes.POINTER(real), pointer, integer]
            function.restype = integer
        self.handle = pointer()
        self._check("cublasCreate_v2", self.lib.cublasCreate_v2(ctypes.byref(self.handle)))
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
        self._check("cublasSetWorkspace_v2", self.lib.cublasSetWorkspace_v2(
            self.handle, pointer(self.workspace.data.ptr), ctypes.c_size_t(WORKSPACE_BYTES)))
        self.stream = None
        self.gemms = {np.dtype("float32"): (self.lib.cublasSgemm_v2, ctypes.c_float(1),
                                            ctypes.c_float(0)),
                      np.dtype("float64"): (self.lib.cublasDgemm_v2, ctypes.c_double(1),
                                            ctypes.c_double(0))}

    @staticmethod
    def _check(name, status):
        if status != 0:
            raise RuntimeError(f"{name} failed with cuBLAS status {status}")

    def gemm(self, transa, transb, m, n, k, a, lda, b, ldb, c, ldc):
        """C = op(A) op(B) on CuPy's current stream (alpha 1, beta 0)."""
        stream = cupy.cuda.get_current_stream().ptr
        if stream != self.stream:
            self._check("cublasSetStream_v2",
                        self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream)))
            self.stream = stream
        function, one, zero = self.gemms[c.dtype]
        self._check(function.__name__, function(
            self.handle, transa, transb, m, n, k, ctypes.byref(one), a.data.ptr, lda,
            b.data.ptr, ldb, ctypes.byref(zero), c.data.ptr, ldc))


def _load_cublas():
    """The cuBLAS library CuPy itself loaded (found in the process's mappings), else the
    system's."""
    from cupy_backends.cuda.libs import cublas  # noqa: F401 - loads libcublas as CuPy does
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcublas.so" in path:
                    return ctypes.CDLL(path)
    except OSError:
        pass
    return ctypes.CDLL(ctypes.util.find_library("cublas") or "libcublas.so")


@functools.cache
def _cublas_on(device_id):
    return Cublas()


def _blas():
    return _cublas_on(cupy.cuda.Device().id)


def matmul(a, b, out):
    """out = a @ b through cuBLAS (float32 or float64); returns out."""
    m, n = out.shape
    if m and n:
        if a.shape[1] == 0:
            out.fill(0)
        else:
            _blas().gemm(*gemm_arguments(a, b, out))
    return out


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
    matmul(x, weight, out)
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
        matmul(x.T, scratch, grad_weight)
    else:
        elementwise_kernel("act_backward")(y, grad_out, code, scratch)
    if grad_in is not None:
        matmul(scratch, weight.T, grad_in)
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


def _device_or_float(value):
    """A 0-d device array as it is (read on the device), anything else as a host float."""
    return value if isinstance(value, cupy.ndarray if cupy is not None else ()) else float(value)


def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step, apply=None):
    """One Adam step in place (Kingma & Ba, with bias correction); `step` counts from 1.

    `step` may be a 0-d float64 device array holding the count (read on the device), and so
    may `apply` (1.0 or 0.0; None: 1): where it is 0 the kernel leaves everything unchanged.
    """
    elementwise_kernel("adam")(grad, float(beta1), float(beta2), float(lr), float(eps),
                               _device_or_float(step), _device_or_float(1.0 if apply is None
                                                                        else apply),
                               param, exp_avg, exp_avg_sq)


def sgd_update(param, grad, velocity, lr, momentum, apply=None):
    """One step of SGD with (heavy-ball) momentum, in place; `apply` 0 skips it (as Adam's)."""
    elementwise_kernel("sgd")(grad, float(lr), float(momentum),
                              _device_or_float(1.0 if apply is None else apply), param, velocity)


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


# ----------------------------------------------------------------------------- CUDA graphs
class CapturedGraph:
    """A recorded CUDA graph, the value its function returned, and the memory both use."""

    def __init__(self, graph, result, pool):
        self.graph, self.result, self._pool = graph, result, pool

    def launch(self):
        """Replay the graph on the current stream (after the work queued there, no sync)."""
        self.graph.launch()


def capture_graph(function):
    """Record `function()` as a CUDA graph without running it; returns a CapturedGraph.

    What `function` allocates comes from a private memory pool that the CapturedGraph keeps,
    because every replay reads and writes those same addresses. Warm `function` up first
    (kernel compilation, cuBLAS set-up, buffers made on first use), and keep host
    synchronisation and host values that change between calls out of it: the graph replays
    the launches as recorded.
    """
    _require_cupy()
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        try:
            result = function()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:  # the capture was invalidated: the original error says why
                pass
            raise
        graph = stream.end_capture()
    return CapturedGraph(graph, result, pool)
