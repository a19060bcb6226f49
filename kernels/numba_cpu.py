"""The Numba CPU backend: the reference's ops as fused one-pass kernels, products on BLAS.

Same functions, signatures and conventions as `numpy_ref` (read its docstring). Design:
- matrix products go to oneMKL where it is installed (`mkl.py`; fp32 `cblas_sgemm`, and bf16
  `cblas_gemm_bf16bf16f32` for precision bf16), called from inside the jitted layer kernel
  through a function pointer, so a layer's forward or backward is one call from Python; without
  oneMKL they go to NumPy's BLAS through `np.matmul(..., out=...)` (transposes are views), fp32
  only, as before. The elementwise work around a product is one jitted pass (bias + activation,
  and the bf16 copy of the result; activation derivative + bias-gradient column sum, and the
  bf16 copy of the gradient); Adam writes the bf16 weight copy in its own pass;
- losses, the reparameterisation and the optimiser steps are one jitted pass each; sums are
  accumulated in float64 whatever the array dtype; activations, losses and the
  reparameterisation compute each element in float64 and round once on the store, except the
  sigmoid and BCE of float32 arrays, which compute in float32 (within 3 ulp; twice the SIMD
  lanes and half the polynomial: 2x faster, the biggest element-wise passes of a step);
- elementwise kernels see 1-D views (`reshape(-1)` of C-contiguous arrays), so each kernel is
  compiled once per dtype whatever the batch's shape: few signatures, short cold compiles;
- scalars reach the kernels as float64 (the optimisers: as the parameters' dtype), activations
  as an int code;
- nothing of array size is allocated per call (the float64 bias-gradient accumulator is a small
  buffer kept per width); loss ops return a 0-d float64 array as the reference does.

Vector math. Numba's `math.exp`/`math.log1p` are scalar libm calls (no SVML in the llvmlite
wheels), 4-7x slower than NumPy's SIMD ufuncs, so `_exp` and `_log1p_atanh` below are
polynomial versions LLVM vectorises (1 ulp from `np.exp` in float64; `_exp32` and
`_log1p_atanh32` are their float32 counterparts). They are compiled with
fastmath={"contract"} only (fused multiply-add: one rounding instead of two). Loss kernels with a
scalar sum use fastmath={"reassoc"} only, so the float64 sum vectorises (summation order
changes; no nan/inf assumptions). Everything else: fastmath off. `tanh` uses NumPy's SIMD ufunc.

Threads. With NumPy's OpenBLAS the kernels stay serial: right after a BLAS product OpenBLAS's
spinning threads and Numba's workers fight for the cores and a parallel step costs ~6.5 ms
instead of 0.1-0.5 ms. With oneMKL both run on one GNU OpenMP pool (MKL_THREADING_LAYER=GNU,
Numba's `omp` layer, both set here before either starts a thread unless the user set them),
and every element-wise kernel of a float32 step runs on it (`PARALLEL`; the bench times the
step both ways): a small `prange` driver cuts the arrays into one span per thread and runs the
serial kernel on each span (one body a kernel; spans are slices, which Numba keeps
C-contiguous, so the loops still vectorise). Sums are kept per span and added in span order,
so a step gives the same bits whichever thread ran which span. Arrays under 16k elements
stay serial: waking the threads would cost more.
"""
import math
import os

import numpy as np

from . import ACTIVATION_CODES as _CODES
from . import LEAKY_SLOPE
from . import mkl as _mkl
from .huge_pages import empty, zeros  # noqa: F401  (the backend allocates its arrays here)

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError as error:  # the module must import without numba; load() reports it
    numba = None
    _IMPORT_ERROR = f"numba is not installed: pip install 'fastvae-numpy[numba]' ({error})"
else:
    _IMPORT_ERROR = None

MKL = _mkl.library() if numba is not None else None  # None: products on NumPy's BLAS, fp32
PARALLEL = MKL is not None  # prange kernels pay only on oneMKL's shared thread pool
if MKL is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "omp"  # oneMKL's GNU OpenMP runtime: one pool for both
_NO16 = np.zeros((1, 1), dtype=np.uint16)  # stands for "no bf16 copy" (one type per kernel arg)

xp = np
DEVICE = "cpu"

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH = (
    _CODES[name] for name in ("identity", "relu", "leaky_relu", "sigmoid", "tanh"))


def unavailable_reason():
    """None when numba imports, else a sentence saying how to install it."""
    return _IMPORT_ERROR


def bf16_unavailable_reason():
    """None when bf16 products run here (oneMKL on a CPU with AMX or AVX512-BF16), else why."""
    if MKL is None:
        why = _mkl.unavailable_reason()
        detail = f" ({why})" if why and _mkl.INSTALL_HINT not in why else ""
        return f"bf16 products on the numba backend need oneMKL: {_mkl.INSTALL_HINT}{detail}"
    return _mkl.bf16_cpu_reason()


def products_library():
    """What computes the products: the oneMKL version, or NumPy's BLAS."""
    return MKL.version if MKL is not None else "NumPy's BLAS (fp32)"


def _jit(fastmath=False, parallel=False):
    def wrap(function):
        if numba is None:
            return function
        return numba.njit(cache=True, fastmath=fastmath, error_model="numpy",
                          parallel=parallel)(function)

    return wrap


prange = numba.prange if numba is not None else range


def _code(activation):
    try:
        return _CODES[activation]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {activation!r}") from None


def _flat_out(array):
    """A 1-D view of an output array (a reshape copy would silently drop the results)."""
    if not array.flags.c_contiguous:
        raise ValueError("numba backend: output arrays must be C-contiguous")
    return array.reshape(-1)


# ----------------------------------------------------------------------------- vector math
if numba is not None:

    @intrinsic
    def _bits_as_float(typingctx, bits):
        """Reinterpret an int64's bits as a float64 (to build 2**k without a libm call)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())

        return types.float64(types.int64), codegen

    @intrinsic
    def _bits_as_float32(typingctx, bits):
        """Reinterpret the low 32 bits of an integer as a float32 (2**k for the float32 exp)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            word = args[0]
            if signature.args[0].bitwidth > 32:
                word = builder.trunc(word, ir.IntType(32))
            return builder.bitcast(word, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _cblas_gemm(typingctx, address, transpose_a, transpose_b, m, n, k, a, lda, b, ldb, c,
                    ldc):
        """Call the cblas gemm at `address` (row-major, alpha 1, beta 0) on raw addresses a, b, c.

        The address is an argument, not a constant, so the calling kernel caches on disk."""
        def codegen(context, builder, signature, args):
            args = [context.cast(builder, value, of, types.int64)
                    for value, of in zip(args, signature.args)]
            i32, f32, ptr = ir.IntType(32), ir.FloatType(), ir.IntType(8).as_pointer()
            fn_type = ir.FunctionType(ir.VoidType(), [i32] * 6 + [f32, ptr, i32, ptr, i32, f32,
                                                                  ptr, i32])
            fn = builder.inttoptr(args[0], fn_type.as_pointer())
            (ta, tb, m_, n_, k_, a_, lda_, b_, ldb_, c_, ldc_) = args[1:]
            as32 = lambda value: builder.trunc(value, i32)  # noqa: E731
            as_ptr = lambda value: builder.inttoptr(value, ptr)  # noqa: E731
            builder.call(fn, [ir.Constant(i32, _mkl.ROW_MAJOR), as32(ta), as32(tb), as32(m_),
                              as32(n_), as32(k_), ir.Constant(f32, 1.0), as_ptr(a_), as32(lda_),
                              as_ptr(b_), as32(ldb_), ir.Constant(f32, 0.0), as_ptr(c_),
                              as32(ldc_)])
            return context.get_dummy_value()

        arguments = (address, transpose_a, transpose_b, m, n, k, a, lda, b, ldb, c, ldc)
        if not all(isinstance(argument, types.Integer) for argument in arguments):
            return None
        return types.void(*arguments), codegen

else:  # pragma: no cover - only reached without numba, where no kernel runs

    def _bits_as_float(bits):
        return float(np.int64(bits).view(np.float64))

    def _bits_as_float32(bits):
        return np.int32(bits).view(np.float32)

    def _cblas_gemm(*args):
        raise RuntimeError("numba is not installed")


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # low 21 bits zero: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10


@_jit(fastmath={"contract"})
def _exp(x):
    """exp(x) in float64, vectorisable: k = round(x / ln 2), Taylor degree 13 on the rest.

    Overflows to inf above ~709.78, underflows smoothly through the denormals to 0, keeps nan.
    """
    if x < -746.0:
        x = -746.0
    if x > 710.0:
        x = 710.0
    n = np.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln(2) / 2: remainder term < 5e-18
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    k = np.int64(n) if n == n else np.int64(0)
    half = k >> 1  # 2**k as two normal factors, so k down to -1077 works
    return p * _bits_as_float((half + 1023) << 52) * _bits_as_float((k - half + 1023) << 52)


@_jit(fastmath={"contract"})
def _log1p_atanh(s):
    """log(1 + e) given s = e / (2 + e) for 0 <= e <= 1 (so s <= 1/3): 2 atanh(s), to s**31."""
    z = s * s
    p = 1.0 / 31.0
    p = p * z + 1.0 / 29.0
    p = p * z + 1.0 / 27.0
    p = p * z + 1.0 / 25.0
    p = p * z + 1.0 / 23.0
    p = p * z + 1.0 / 21.0
    p = p * z + 1.0 / 19.0
    p = p * z + 1.0 / 17.0
    p = p * z + 1.0 / 15.0
    p = p * z + 1.0 / 13.0
    p = p * z + 1.0 / 11.0
    p = p * z + 1.0 / 9.0
    p = p * z + 1.0 / 7.0
    p = p * z + 1.0 / 5.0
    p = p * z + 1.0 / 3.0
    p = p * z + 1.0
    return 2.0 * s * p


@_jit()
def _sigmoid(v):
    """Logistic function that never overflows: exp of -|v| only."""
    e = _exp(-abs(v))
    s = 1.0 / (1.0 + e)
    return s if v >= 0 else e * s


_F32 = np.float32
_LOG2E_32, _LN2_HI_32, _LN2_LO_32 = _F32(_LOG2E), _F32(0.693359375), _F32(-2.12194440e-4)
_ROUND_32 = _F32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer


@_jit(fastmath={"contract"})
def _exp32(x):
    """exp(x) in float32, vectorisable, within 1 ulp: `_exp`'s method in float32, Taylor degree
    7 on the rest (|r| <= ln(2) / 2: remainder < 1e-8). Overflows to inf above ~88.7,
    underflows through the denormals to 0, keeps nan. k = round(x / ln 2) by the 1.5 * 2**23
    trick (np.floor would not vectorise)."""
    if x < _F32(-104.0):
        x = _F32(-104.0)
    if x > _F32(89.0):
        x = _F32(89.0)
    n = (x * _LOG2E_32 + _ROUND_32) - _ROUND_32
    r = (x - n * _LN2_HI_32) - n * _LN2_LO_32
    p = _F32(1.0 / 5040.0)
    p = p * r + _F32(1.0 / 720.0)
    p = p * r + _F32(1.0 / 120.0)
    p = p * r + _F32(1.0 / 24.0)
    p = p * r + _F32(1.0 / 6.0)
    p = p * r + _F32(0.5)
    p = p * r + _F32(1.0)
    p = p * r + _F32(1.0)
    k = np.int32(n) if n == n else np.int32(0)
    half = k >> 1  # 2**k as two normal factors, so k down to -150 works
    return p * _bits_as_float32((half + 127) << 23) * _bits_as_float32((k - half + 127) << 23)


@_jit(fastmath={"contract"})
def _log1p_atanh32(s):
    """`_log1p_atanh` in float32: 2 atanh(s) for s <= 1/3, to s**15 (remainder < 1e-8)."""
    z = s * s
    p = _F32(1.0 / 15.0)
    p = p * z + _F32(1.0 / 13.0)
    p = p * z + _F32(1.0 / 11.0)
    p = p * z + _F32(1.0 / 9.0)
    p = p * z + _F32(1.0 / 7.0)
    p = p * z + _F32(1.0 / 5.0)
    p = p * z + _F32(1.0 / 3.0)
    p = p * z + _F32(1.0)
    return _F32(2.0) * s * p


@_jit()
def _sigmoid32(v):
    """`_sigmoid` of a float32 in float32 (twice the SIMD lanes, half the polynomial), for the
    float32 arrays' loops (the float64 ones keep `_sigmoid`)."""
    e = _exp32(-abs(v))
    s = _F32(1.0) / (_F32(1.0) + e)
    return s if v >= 0 else e * s


# ----------------------------------------------------------------------------- activations
@_jit()
def _act_inplace(row, code):
    """row = activation(row); tanh is left to np.tanh (SIMD) by the callers."""
    if code == RELU:
        for j in range(row.size):
            v = row[j]
            row[j] = 0.0 if v < 0 else v
    elif code == LEAKY_RELU:
        for j in range(row.size):
            v = row[j]
            row[j] = v if v > 0 else LEAKY_SLOPE * v
    elif code == SIGMOID and row.itemsize == 4:
        for j in range(row.size):
            row[j] = _sigmoid32(row[j])
    elif code == SIGMOID:
        for j in range(row.size):
            row[j] = _sigmoid(np.float64(row[j]))


@_jit()
def _act_forward(x, out, code):
    if code == RELU:
        for i in range(x.size):
            v = x[i]
            out[i] = 0.0 if v < 0 else v
    elif code == LEAKY_RELU:
        for i in range(x.size):
            v = x[i]
            out[i] = v if v > 0 else LEAKY_SLOPE * v
    elif code == SIGMOID and x.itemsize == 4:
        for i in range(x.size):
            out[i] = _sigmoid32(x[i])
    elif code == SIGMOID:
        for i in range(x.size):
            out[i] = _sigmoid(np.float64(x[i]))
    else:
        for i in range(x.size):
            out[i] = x[i]


@_jit()
def _span(size, chunks, c):
    """The c-th of `chunks` near-equal slices of range(size): what one thread of a parallel
    driver below works on (a slice keeps the view C-contiguous, so its loops vectorise)."""
    return slice(c * size // chunks, (c + 1) * size // chunks)


@_jit(parallel=True)
def _act_forward_parallel(x, out, code, chunks):
    for c in prange(chunks):
        span = _span(x.size, chunks, c)
        _act_forward(x[span], out[span], code)


@_jit()
def _bias_act(out, bias, code):
    """out[i] = activation(out[i] + bias), row by row (each row stays in L1 for both loops)."""
    for i in range(out.shape[0]):
        row = out[i]
        for j in range(row.size):
            row[j] += bias[j]
        _act_inplace(row, code)


@_jit()
def _act_backward(y, grad_out, out, code):
    """out = grad_out * activation'(x), from y = activation(x)."""
    if code == RELU:
        for i in range(y.size):
            out[i] = grad_out[i] * (1.0 if y[i] > 0 else 0.0)
    elif code == LEAKY_RELU:
        for i in range(y.size):
            g = grad_out[i]
            out[i] = g if y[i] > 0 else LEAKY_SLOPE * g
    elif code == SIGMOID:
        for i in range(y.size):
            v = y[i]
            out[i] = grad_out[i] * (v * (1.0 - v))
    elif code == TANH:
        for i in range(y.size):
            v = y[i]
            out[i] = grad_out[i] * (1.0 - v * v)
    else:
        for i in range(y.size):
            out[i] = grad_out[i]


@_jit(parallel=True)
def _act_backward_parallel(y, grad_out, out, code, chunks):
    for c in prange(chunks):
        span = _span(y.size, chunks, c)
        _act_backward(y[span], grad_out[span], out[span], code)


@_jit()
def _act_backward_bias(grad_out, y, scratch, acc, grad_bias, code):
    """scratch = grad_out * act'(y) and grad_bias = column sums of scratch (float64 in acc).

    Row by row: the derivative and the sum read the row while it is in L1 (one memory pass).
    """
    n, m = grad_out.shape
    for j in range(m):
        acc[j] = 0.0
    for i in range(n):
        row = scratch[i]
        _act_backward(y[i], grad_out[i], row, code)
        for j in range(m):
            acc[j] += row[j]
    for j in range(m):
        grad_bias[j] = acc[j]


# ----------------------------------------------------------------------------- bf16, oneMKL
@_jit()
def _round_bf16(bits):
    """The bf16 (uint16) nearest to the float32 with these bits, ties to even; NaN stays NaN."""
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((bits >> 16) | 0x40)
    return np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


@_jit()
def _store_bf16(src, dst):
    """dst (uint16, 1-D) = bf16(src (float32, 1-D))."""
    bits = src.view(np.uint32)
    for j in range(src.size):
        dst[j] = _round_bf16(bits[j])


@_jit()
def _gemm(address, a, transpose_a, b, transpose_b, c):
    """c = op(a) @ op(b) by the cblas gemm at `address`; a, b, c C-contiguous 2-D, op a transpose."""
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    _cblas_gemm(address, 112 if transpose_a else 111, 112 if transpose_b else 111, m, n, k,
                a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], c.ctypes.data, n)


@_jit()
def _bias_act_row(out, bits, i, bias, code, out16, want16):
    """Row i: out = activation(out + bias), and out16 = bf16(out) if `want16` (bits: out as
    uint32, one view made by the caller: a view per row costs a third of a 128-wide row's work).

    No loop fusing the activation and the bf16 store: out and bits then alias inside one loop
    of a called function, LLVM's overlap check fails and the loop runs scalar (twice the time).
    """
    row = out[i]
    for j in range(row.size):
        row[j] += bias[j]
    _act_inplace(row, code)
    if want16:
        row16, row_bits = out16[i], bits[i]
        for j in range(row.size):
            row16[j] = _round_bf16(row_bits[j])


@_jit()
def _bias_act_rows(out, bias, code, out16, want16):
    """out = activation(out + bias) row by row, and out16 = bf16(out) if `want16`."""
    bits = out.view(np.uint32)
    for i in range(out.shape[0]):
        _bias_act_row(out, bits, i, bias, code, out16, want16)


@_jit()
def _dense_forward_mkl(address, a, b, bias, out, code, out16, want16):
    """out = activation(a @ b + bias) (and its bf16 copy): the product, then one row pass."""
    _gemm(address, a, False, b, False, out)
    _bias_act_rows(out, bias, code, out16, want16)


@_jit(parallel=True)
def _dense_forward_mkl_parallel(address, a, b, bias, out, code, out16, want16):
    """`_dense_forward_mkl` with the row pass shared among the threads.

    The prange is here, not in a parallel function called from here: a cached kernel that calls
    a parallel kernel loaded from the cache segfaults in the next process (numba 0.68)."""
    _gemm(address, a, False, b, False, out)
    bits = out.view(np.uint32)
    for i in prange(out.shape[0]):
        _bias_act_row(out, bits, i, bias, code, out16, want16)


@_jit()
def _backward_rows(grad_out, y, scratch, acc, code, scratch16, want_weight, want16):
    """scratch = grad_out * act'(y), acc = its column sums (float64, if `want_weight`) and
    scratch16 = bf16(scratch) (if `want16`), row by row: each row is read once, while in L1.

    With `want16` the products read scratch16 only, so every row goes through scratch's first
    row (in L1) and the rest of scratch is not written: 8 bytes an element less memory
    traffic (the write and its read-for-ownership), 3.5 % of the batch-512 bf16 step."""
    m = grad_out.shape[1]
    bits = scratch.view(np.uint32)  # once, not a view per row (see _bias_act_row)
    if want_weight:
        for j in range(m):
            acc[j] = 0.0
    for i in range(grad_out.shape[0]):
        k = 0 if want16 else i  # scratch's row 0 as the work row (see the docstring)
        row = scratch[k]
        _act_backward(y[i], grad_out[i], row, code)
        if want_weight:
            for j in range(m):
                acc[j] += row[j]
        if want16:  # a loop of its own: row and row_bits alias (see _bias_act_row)
            row_bits, row16 = bits[k], scratch16[i]
            for j in range(m):
                row16[j] = _round_bf16(row_bits[j])


@_jit()
def _backward_products(address, a, b, g, grad_weight, want_weight, grad_in, want_in):
    """grad_weight = a.T @ g and grad_in = g @ b.T, each if wanted."""
    if want_weight:
        _gemm(address, a, True, g, False, grad_weight)
    if want_in:
        _gemm(address, g, False, b, True, grad_in)


@_jit()
def _dense_backward_mkl(address, grad_out, y, scratch, acc, grad_bias, code, a, b, g, scratch16,
                        want16, grad_weight, want_weight, grad_in, want_in):
    """The activation derivative, bias-gradient sum and bf16 copy of the gradient in one row
    pass, then grad_weight = a.T @ g and grad_in = g @ b.T (a, b, g: x, weight, scratch or
    their bf16 copies)."""
    _backward_rows(grad_out, y, scratch, acc, code, scratch16, want_weight, want16)
    if want_weight:
        for j in range(grad_bias.size):
            grad_bias[j] = acc[j]
    _backward_products(address, a, b, g, grad_weight, want_weight, grad_in, want_in)


@_jit(parallel=True)
def _dense_backward_mkl_parallel(address, grad_out, y, scratch, partial, grad_bias, code, a, b, g,
                                 scratch16, want16, grad_weight, want_weight, grad_in, want_in):
    """`_dense_backward_mkl` with the row pass in len(partial) chunks shared among the threads:
    each chunk of rows sums into its own row of `partial`, added up in chunk order (the same sum
    whatever thread ran it). The prange is here for the reason `_dense_forward_mkl_parallel`
    gives."""
    n, chunks = grad_out.shape[0], partial.shape[0]
    for c in prange(chunks):
        rows = _span(n, chunks, c)
        _backward_rows(grad_out[rows], y[rows], scratch[rows], partial[c], code,
                       scratch16[rows] if want16 else scratch16, want_weight, want16)
    if want_weight:
        for j in range(grad_bias.size):
            total = 0.0
            for c in range(partial.shape[0]):
                total += partial[c, j]
            grad_bias[j] = total
    _backward_products(address, a, b, g, grad_weight, want_weight, grad_in, want_in)


@_jit()
def _to_bf16(x, out):
    _store_bf16(x, out)


@_jit(parallel=True)
def _to_bf16_parallel(x, out, chunks):
    for c in prange(chunks):
        span = _span(x.size, chunks, c)
        _store_bf16(x[span], out[span])


# ----------------------------------------------------------------------------- losses
@_jit(fastmath={"contract"})
def _bce32(v, t):
    """The loss term max(v, 0) - v t + log1p(e) and the sigmoid of one float32 logit v against
    target t, in float32, e = exp(-|v|) (this helper, unlike a float64 one, does vectorise: 2x
    the float64 loops below on float32 arrays)."""
    e = _exp32(-abs(v))
    r = _F32(1.0) / ((_F32(1.0) + e) * (_F32(2.0) + e))
    loss = (v if v > 0 else _F32(0.0)) - v * t + _log1p_atanh32(e * (_F32(1.0) + e) * r)
    s = (_F32(2.0) + e) * r
    return loss, (s if v >= 0 else e * s)


@_jit(fastmath={"reassoc"})
def _bce32_array(x, target, scale, grad, want_grad):
    """`_bce_array` of float32 arrays in float32 math (the sum still in float64)."""
    total = 0.0
    scale32 = _F32(scale)
    for i in range(x.size):
        t = target[i]
        loss, p = _bce32(x[i], t)
        total += loss
        if want_grad:
            grad[i] = (p - t) * scale32
    return scale * total


@_jit(fastmath={"reassoc"})
def _bce32_scalar(x, t, scale, grad, want_grad):
    """`_bce_scalar` of a float32 array in float32 math (the sum still in float64)."""
    total = 0.0
    t32, scale32 = _F32(t), _F32(scale)
    for i in range(x.size):
        loss, p = _bce32(x[i], t32)
        total += loss
        if want_grad:
            grad[i] = (p - t32) * scale32
    return scale * total


# The float64 BCE loops spell the per-element work out (no helper returning a tuple): LLVM
# then inlines _exp and _log1p_atanh and vectorises the loop. One division serves both
# 1 / (1 + e) and e / (2 + e), e = exp(-|v|) in (0, 1]; the loss is max(v, 0) - v t + log1p(e).
@_jit(fastmath={"reassoc"})
def _bce_scalar(x, t, scale, grad, want_grad):
    if x.itemsize == 4:
        return _bce32_scalar(x, t, scale, grad, want_grad)
    total = 0.0
    if want_grad:
        for i in range(x.size):
            v = np.float64(x[i])
            e = _exp(-abs(v))
            r = 1.0 / ((1.0 + e) * (2.0 + e))
            total += (v if v > 0 else 0.0) - v * t + _log1p_atanh(e * (1.0 + e) * r)
            s = (2.0 + e) * r
            grad[i] = ((s if v >= 0 else e * s) - t) * scale
    else:
        for i in range(x.size):
            v = np.float64(x[i])
            e = _exp(-abs(v))
            total += (v if v > 0 else 0.0) - v * t + _log1p_atanh(e / (2.0 + e))
    return scale * total


@_jit(fastmath={"reassoc"})
def _bce_array(x, target, scale, grad, want_grad):
    if x.itemsize == 4:
        return _bce32_array(x, target, scale, grad, want_grad)
    total = 0.0
    if want_grad:
        for i in range(x.size):
            v = np.float64(x[i])
            t = np.float64(target[i])
            e = _exp(-abs(v))
            r = 1.0 / ((1.0 + e) * (2.0 + e))
            total += (v if v > 0 else 0.0) - v * t + _log1p_atanh(e * (1.0 + e) * r)
            s = (2.0 + e) * r
            grad[i] = ((s if v >= 0 else e * s) - t) * scale
    else:
        for i in range(x.size):
            v = np.float64(x[i])
            t = np.float64(target[i])
            e = _exp(-abs(v))
            total += (v if v > 0 else 0.0) - v * t + _log1p_atanh(e / (2.0 + e))
    return scale * total


@_jit(fastmath={"reassoc"})
def _squared_error_array(pred, target, scale, grad, want_grad):
    total = 0.0
    if want_grad:
        for i in range(pred.size):
            d = np.float64(pred[i]) - np.float64(target[i])
            total += d * d
            grad[i] = d * scale
    else:
        for i in range(pred.size):
            d = np.float64(pred[i]) - np.float64(target[i])
            total += d * d
    return scale * 0.5 * total


@_jit(fastmath={"reassoc"})
def _squared_error_scalar(pred, t, scale, grad, want_grad):
    total = 0.0
    if want_grad:
        for i in range(pred.size):
            d = np.float64(pred[i]) - t
            total += d * d
            grad[i] = d * scale
    else:
        for i in range(pred.size):
            d = np.float64(pred[i]) - t
            total += d * d
    return scale * 0.5 * total


@_jit(fastmath={"reassoc"})
def _kl_forward(mu, log_var, eps, scale, z_out):
    total = 0.0
    for i in range(mu.size):
        m = np.float64(mu[i])
        lv = np.float64(log_var[i])
        std = _exp(0.5 * lv)
        z_out[i] = m + std * eps[i]
        total += 1.0 + lv - m * m - std * std
    return -0.5 * scale * total


@_jit()
def _kl_backward(grad_z, mu, log_var, eps, scale, grad_mu, grad_log_var):
    for i in range(mu.size):
        g = np.float64(grad_z[i])
        std = _exp(0.5 * np.float64(log_var[i]))
        grad_mu[i] = g + scale * mu[i]
        grad_log_var[i] = g * eps[i] * 0.5 * std + scale * 0.5 * (std * std - 1.0)


# ----------------------------------------------------------------------------- optimisers
# The optimiser steps compute in the parameters' dtype (scalars arrive as that dtype, prepared
# by the callers), as the reference does: float32 math runs 8 lanes wide, and Adam's
# per-element divisions are what bound it, not memory (1.1M floats: 2.7 ms in float64 math,
# 0.6 ms in float32). Adam uses the equivalent one-division form
# lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps).
@_jit()
def _adam(param, grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2,
          step_size, inv_sqrt_correction2, eps, param16, want16):
    bits = param.view(np.uint32)
    for i in range(param.size):
        g = grad[i]
        m = beta1 * exp_avg[i] + one_minus_beta1 * g
        v = beta2 * exp_avg_sq[i] + one_minus_beta2 * (g * g)
        exp_avg[i] = m
        exp_avg_sq[i] = v
        param[i] -= step_size * m / (math.sqrt(v) * inv_sqrt_correction2 + eps)
        if want16:
            param16[i] = _round_bf16(bits[i])


@_jit()
def _sgd(param, grad, velocity, lr, momentum, param16, want16):
    bits = param.view(np.uint32)
    for i in range(param.size):
        v = momentum * velocity[i] + grad[i]
        velocity[i] = v
        param[i] -= lr * v
        if want16:
            param16[i] = _round_bf16(bits[i])


# Thread-shared drivers: each cuts its arrays into `chunks` spans for the serial kernels above;
# a sum is kept per chunk in `partial` and added up in chunk order (the same bits whichever
# thread ran which chunk, so a parallel step is as reproducible as a serial one).
@_jit(parallel=True)
def _bce_scalar_parallel(x, t, scale, grad, want_grad, partial):
    chunks = partial.size
    for c in prange(chunks):
        span = _span(x.size, chunks, c)
        partial[c] = _bce_scalar(x[span], t, scale, grad[span] if want_grad else grad, want_grad)
    return _ordered_sum(partial)


@_jit(parallel=True)
def _bce_array_parallel(x, target, scale, grad, want_grad, partial):
    chunks = partial.size
    for c in prange(chunks):
        span = _span(x.size, chunks, c)
        partial[c] = _bce_array(x[span], target[span], scale, grad[span] if want_grad else grad,
                                want_grad)
    return _ordered_sum(partial)


@_jit(parallel=True)
def _kl_forward_parallel(mu, log_var, eps, scale, z_out, partial):
    chunks = partial.size
    for c in prange(chunks):
        span = _span(mu.size, chunks, c)
        partial[c] = _kl_forward(mu[span], log_var[span], eps[span], scale, z_out[span])
    return _ordered_sum(partial)


@_jit(parallel=True)
def _kl_backward_parallel(grad_z, mu, log_var, eps, scale, grad_mu, grad_log_var, chunks):
    for c in prange(chunks):
        span = _span(mu.size, chunks, c)
        _kl_backward(grad_z[span], mu[span], log_var[span], eps[span], scale, grad_mu[span],
                     grad_log_var[span])


@_jit(parallel=True)
def _adam_parallel(param, grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2,
                   one_minus_beta2, step_size, inv_sqrt_correction2, eps, param16, want16, chunks):
    for c in prange(chunks):
        span = _span(param.size, chunks, c)
        _adam(param[span], grad[span], exp_avg[span], exp_avg_sq[span], beta1, one_minus_beta1,
              beta2, one_minus_beta2, step_size, inv_sqrt_correction2, eps,
              param16[span] if want16 else param16, want16)


@_jit(parallel=True)
def _sgd_parallel(param, grad, velocity, lr, momentum, param16, want16, chunks):
    for c in prange(chunks):
        span = _span(param.size, chunks, c)
        _sgd(param[span], grad[span], velocity[span], lr, momentum,
             param16[span] if want16 else param16, want16)


@_jit()
def _ordered_sum(partial):
    total = 0.0
    for c in range(partial.size):
        total += partial[c]
    return total


# ----------------------------------------------------------------------------- public ops
_MIN_PARALLEL = 1 << 14  # elements: below this, waking the threads costs more than they save
_PARTIALS = {}


def _chunks(array):
    """Into how many spans a kernel over `array` is cut: its thread count on oneMKL's pool for
    large float32 arrays, else 1 (the serial kernel; float64 products run on NumPy's BLAS, whose
    spinning threads a parallel kernel would fight)."""
    if not PARALLEL or array.dtype != np.float32 or array.size < _MIN_PARALLEL:
        return 1
    return numba.get_num_threads()


def _partial(chunks, width=0):
    """A float64 buffer for per-chunk sums, (chunks,) or (chunks, width), kept for reuse."""
    key = (chunks, width)
    buffer = _PARTIALS.get(key)
    if buffer is None:
        buffer = _PARTIALS[key] = np.empty((chunks, width) if width else chunks, np.float64)
    return buffer


def activation_forward(activation, x, out):
    """out = activation(x); out may be x itself."""
    code = _code(activation)
    if code == TANH:
        np.tanh(x, out=out)
    elif code == IDENTITY:
        if out is not x:
            np.copyto(out, x)
    elif out is x:  # one array in the loop: LLVM's overlap check would refuse to vectorise
        _act_inplace(_flat_out(out), code)
    else:
        chunks = _chunks(out)
        if chunks > 1:
            _act_forward_parallel(x.reshape(-1), _flat_out(out), code, chunks)
        else:
            _act_forward(x.reshape(-1), _flat_out(out), code)
    return out


def activation_backward(activation, y, grad_out, out):
    """out = grad_out * activation'(x), written with the activation's output y = activation(x)."""
    code = _code(activation)
    if code == IDENTITY:
        if out is not grad_out:
            np.copyto(out, grad_out)
    else:
        chunks = _chunks(out)
        if chunks > 1:
            _act_backward_parallel(y.reshape(-1), grad_out.reshape(-1), _flat_out(out), code,
                                   chunks)
        else:
            _act_backward(y.reshape(-1), grad_out.reshape(-1), _flat_out(out), code)
    return out


def _contiguous(*arrays):
    return all(array is None or array.flags.c_contiguous for array in arrays)


def _on_mkl(bf16, *operands):
    """Whether oneMKL computes a product of these operands: float32 (or bf16) C-contiguous
    arrays where it is installed; bf16 operands must be (the layers make them so)."""
    if bf16:
        if MKL is None:
            raise RuntimeError(bf16_unavailable_reason())
        if not _contiguous(*operands):
            raise ValueError("numba backend: bf16 products take C-contiguous operands")
        return True
    return MKL is not None and operands[0].dtype == np.float32 and _contiguous(*operands)


def dense_forward(x, weight, bias, activation, out, x16=None, weight16=None, out16=None):
    """out = activation(x @ weight + bias): one product, then one bias+activation pass.

    With `weight16` (bf16 copies: numpy_ref's docstring) the product is x16 @ weight16 in bf16,
    and `out16`, if given, receives bf16(out) from the same pass.
    """
    code = _code(activation)
    bf16 = weight16 is not None
    if _on_mkl(bf16, *((x16, weight16, out) if bf16 else (x, weight, out))):
        address = MKL.gemm_bf16_address if bf16 else MKL.sgemm_address
        a, b = (x16, weight16) if bf16 else (x, weight)
        want16 = out16 is not None and code != TANH
        kernel = _dense_forward_mkl_parallel if PARALLEL else _dense_forward_mkl
        kernel(address, a, b, bias, out, code, out16 if want16 else _NO16, want16)
    else:
        np.matmul(x, weight, out=out)
        _bias_act(out, bias, code)  # not np.add: broadcasting the bias makes NumPy allocate
    if code == TANH:
        np.tanh(out, out=out)  # NumPy's SIMD tanh beats a scalar libm call per element
        if out16 is not None:
            to_bf16(out, out16)
    return out


def _accumulator(grad_bias):
    """A float64 buffer for the bias-gradient sum (grad_bias itself when it is float64): the
    one-chunk case of the parallel pass's per-chunk sums."""
    if grad_bias.dtype == np.float64:
        return grad_bias
    return _partial(1, grad_bias.shape[0])[0]


def dense_backward(grad_out, x, y, weight, activation, grad_weight, grad_bias, grad_in, scratch,
                   x16=None, weight16=None, scratch16=None):
    """Back through y = activation(x @ weight + bias): fills grad_weight, grad_bias, grad_in.

    `scratch` (shaped like grad_out) receives the gradient before the activation; with
    `weight16` the products read bf16 copies, `scratch16` receives bf16 of that gradient and
    `scratch` is only work space (numpy_ref's docstring).
    """
    code = _code(activation)
    if y is None and code == IDENTITY:
        y = grad_out
    bf16 = weight16 is not None
    want_weight = grad_weight is not None and grad_bias is not None  # they go together
    operands = (x16, weight16, scratch16) if bf16 else (x, weight, scratch)
    if _on_mkl(bf16, *operands, grad_weight, grad_in):
        address = MKL.gemm_bf16_address if bf16 else MKL.sgemm_address
        a, b, g = (x16, weight16, scratch16) if bf16 else (x, weight, scratch)
        chunks = _chunks(scratch)
        if chunks > 1:
            kernel, acc = _dense_backward_mkl_parallel, _partial(chunks, grad_out.shape[1])
        else:
            kernel = _dense_backward_mkl
            acc = _accumulator(grad_bias) if want_weight else _ACCUMULATOR_NONE
        kernel(address, grad_out, y, scratch, acc,
               grad_bias if want_weight else _NO_BIAS, code, a, b, g,
               scratch16 if bf16 else _NO16, bf16,
               grad_weight if want_weight else scratch, want_weight,
               grad_in if grad_in is not None else scratch, grad_in is not None)
        return grad_in
    if want_weight:
        _act_backward_bias(grad_out, y, scratch, _accumulator(grad_bias), grad_bias, code)
    else:
        _act_backward(y.reshape(-1), grad_out.reshape(-1), _flat_out(scratch), code)
    if grad_weight is not None:
        np.matmul(x.T, scratch, out=grad_weight)
    if grad_in is not None:
        np.matmul(scratch, weight.T, out=grad_in)
    return grad_in


_ACCUMULATOR_NONE = np.zeros(1, dtype=np.float64)
# the stand-in for grad_bias when none is wanted, float32 as a real one is on the oneMKL path:
# one compiled signature of each backward kernel, not two (a parallel one costs ~3 s to compile)
_NO_BIAS = np.zeros(1, dtype=np.float32)


def matmul(a, b, out, transpose_a=False, transpose_b=False):
    """out = op(a) @ op(b) through oneMKL as the layer kernels call it (float32 operands: sgemm,
    uint16 ones: the bf16 product); a and b stored C-contiguous, op a transpose if asked."""
    if MKL is None:
        raise RuntimeError(f"oneMKL is not installed: {_mkl.INSTALL_HINT}")
    address = MKL.gemm_bf16_address if a.dtype == np.uint16 else MKL.sgemm_address
    _gemm(address, a, transpose_a, b, transpose_b, out)
    return out


def to_bf16(x, out):
    """out (uint16) = x (float32) rounded to bfloat16, to nearest even (numpy_ref.to_bf16)."""
    if x.dtype != np.float32 or not _contiguous(x):
        raise ValueError("numba backend: to_bf16 takes a C-contiguous float32 array")
    chunks = _chunks(x)
    if chunks > 1:
        _to_bf16_parallel(x.reshape(-1), _flat_out(out), chunks)
    else:
        _to_bf16(x.reshape(-1), _flat_out(out))
    return out


def bce_with_logits(logits, target, scale, grad_out):
    """scale * sum BCE(sigmoid(logits), target), in the stable logits form; grad into grad_out.

    `target` is an array shaped like logits or a scalar (1.0 real, 0.0 fake).
    """
    x = logits.reshape(-1)
    want_grad = grad_out is not None
    grad = _flat_out(grad_out) if want_grad else x  # never written when want_grad is False
    chunks = _chunks(x)
    scalar = np.ndim(target) == 0
    target = float(target) if scalar else target.reshape(-1)
    if chunks > 1:
        kernel = _bce_scalar_parallel if scalar else _bce_array_parallel
        loss = kernel(x, target, float(scale), grad, want_grad, _partial(chunks))
    else:
        kernel = _bce_scalar if scalar else _bce_array
        loss = kernel(x, target, float(scale), grad, want_grad)
    return np.asarray(loss)


def squared_error(pred, target, scale, grad_out):
    """scale * sum 0.5 * (pred - target)**2; gradient with respect to pred into grad_out."""
    p = pred.reshape(-1)
    want_grad = grad_out is not None
    grad = _flat_out(grad_out) if want_grad else p
    if np.ndim(target) == 0:
        loss = _squared_error_scalar(p, float(target), float(scale), grad, want_grad)
    else:
        loss = _squared_error_array(p, target.reshape(-1), float(scale), grad, want_grad)
    return np.asarray(loss)


def kl_reparam_forward(mu, log_var, eps, scale, z_out):
    """z = mu + exp(log_var / 2) * eps; returns scale * KL(N(mu, exp(log_var)) || N(0, I))."""
    arrays = (mu.reshape(-1), log_var.reshape(-1), eps.reshape(-1), float(scale),
              _flat_out(z_out))
    chunks = _chunks(mu)
    if chunks > 1:
        return np.asarray(_kl_forward_parallel(*arrays, _partial(chunks)))
    return np.asarray(_kl_forward(*arrays))


def kl_reparam_backward(grad_z, mu, log_var, eps, scale, grad_mu, grad_log_var):
    """Gradients of (loss through z) + scale * KL with respect to mu and log_var."""
    arrays = (grad_z.reshape(-1), mu.reshape(-1), log_var.reshape(-1), eps.reshape(-1),
              float(scale), _flat_out(grad_mu), _flat_out(grad_log_var))
    chunks = _chunks(mu)
    if chunks > 1:
        _kl_backward_parallel(*arrays, chunks)
    else:
        _kl_backward(*arrays)


_NO16_FLAT = np.zeros(1, dtype=np.uint16)


def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step, apply=None,
                param16=None):
    """One Adam step in place (Kingma & Ba, with bias correction); `step` counts from 1.

    `apply` 0 (a 0-d array on the host) skips it, as in the reference; `param16`, if given,
    receives bf16(param) in the same pass (the products' weight copy)."""
    if apply is not None and not apply:
        return
    real = param.dtype.type
    beta1, beta2 = float(beta1), float(beta2)
    want16 = param16 is not None
    arguments = (_flat_out(param), grad.reshape(-1), _flat_out(exp_avg), _flat_out(exp_avg_sq),
                 real(beta1), real(1.0 - beta1), real(beta2), real(1.0 - beta2),
                 real(lr / (1.0 - beta1**step)), real(1.0 / math.sqrt(1.0 - beta2**step)),
                 real(eps), _flat_out(param16) if want16 else _NO16_FLAT, want16)
    chunks = _chunks(param)
    if chunks > 1:
        _adam_parallel(*arguments, chunks)
    else:
        _adam(*arguments)


def sgd_update(param, grad, velocity, lr, momentum, apply=None, param16=None):
    """One step of SGD with (heavy-ball) momentum, in place; `apply` 0 skips it and `param16`
    is refreshed, as for Adam."""
    if apply is not None and not apply:
        return
    real = param.dtype.type
    want16 = param16 is not None
    arguments = (_flat_out(param), grad.reshape(-1), _flat_out(velocity), real(lr),
                 real(momentum), _flat_out(param16) if want16 else _NO16_FLAT, want16)
    chunks = _chunks(param)
    if chunks > 1:
        _sgd_parallel(*arguments, chunks)
    else:
        _sgd(*arguments)
