"""oneMKL's products through ctypes: fp32 (`cblas_sgemm`), bf16 (`cblas_gemm_bf16bf16f32`).

oneMKL (PyPI `mkl`, `pip install 'fastvae-numpy[mkl]'`) ships `libmkl_rt.so`, a C library with
bf16 products (bf16 inputs as uint16, fp32 accumulation and output) that run on AMX where the
CPU has it. This module only finds and declares the library; it imports nothing but the
standard library, so every backend can ask whether oneMKL is here without importing it twice.
Callers get ctypes functions (for Python) and their raw addresses (for jitted code, which calls
them through a function pointer). Row-major only; transposes are flags.

The threading layer is set before the library loads: MKL_THREADING_LAYER=GNU, so that oneMKL's
threads and Numba's `omp` threading layer are one GNU OpenMP pool (a user's setting wins).
FASTVAE_MKL=off hides the library (fp32 on NumPy's BLAS, as without it).
"""
import ctypes
import ctypes.util
import os
import site
import sys
from pathlib import Path

ROW_MAJOR = 101
NO_TRANS, TRANS = 111, 112
_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so", "libmkl_rt.dylib", "mkl_rt.2.dll",
          "mkl_rt.dll")
_GEMM_ARGS = ([ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
              ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int])
INSTALL_HINT = "pip install 'fastvae-numpy[mkl]'"


class Library:
    """The loaded libmkl_rt: its product functions, their addresses, and its version."""

    def __init__(self, handle, path):
        self.handle, self.path = handle, path
        self.sgemm = self._declare("cblas_sgemm")
        self.gemm_bf16 = self._declare("cblas_gemm_bf16bf16f32")
        self.sgemm_address = ctypes.cast(self.sgemm, ctypes.c_void_p).value
        self.gemm_bf16_address = ctypes.cast(self.gemm_bf16, ctypes.c_void_p).value
        self.version = self._version()

    def _declare(self, name):
        function = getattr(self.handle, name)
        function.restype, function.argtypes = None, _GEMM_ARGS
        return function

    def _version(self):
        buffer = ctypes.create_string_buffer(256)
        try:
            self.handle.mkl_get_version_string(buffer, len(buffer))
        except AttributeError:
            return "oneMKL"
        return buffer.value.decode(errors="replace").strip()

    def max_threads(self):
        return int(self.handle.MKL_Get_Max_Threads())

    def gemm(self, a, b, out, transpose_a=False, transpose_b=False):
        """out = op(a) @ op(b) from Python: float32 operands through sgemm, uint16 through the
        bf16 product; `a`, `b` are the stored (C-contiguous) arrays, op a transpose if asked."""
        m, n = out.shape
        k = a.shape[0] if transpose_a else a.shape[1]
        function = self.sgemm if a.dtype.itemsize == 4 else self.gemm_bf16
        function(ROW_MAJOR, TRANS if transpose_a else NO_TRANS,
                 TRANS if transpose_b else NO_TRANS, m, n, k, 1.0, a.ctypes.data, a.shape[1],
                 b.ctypes.data, b.shape[1], 0.0, out.ctypes.data, n)
        return out


def _search_paths():
    """Where pip puts libmkl_rt (the environment's lib/), then the loader's own search."""
    folders = []
    prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, site.getuserbase())
    for prefix in dict.fromkeys(prefixes):
        folders += [Path(prefix) / "lib", Path(prefix) / "Library" / "bin"]
    for folder in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if folder:
            folders.append(Path(folder))
    paths = [str(folder / name) for folder in folders for name in _NAMES
             if (folder / name).is_file()]
    found = ctypes.util.find_library("mkl_rt")
    return paths + ([found] if found else [])


_state = None  # (Library or None, reason or None) once looked for


def _find():
    if os.environ.get("FASTVAE_MKL", "").lower() in ("0", "off", "no", "false"):
        return None, "oneMKL is switched off by FASTVAE_MKL (unset it to use oneMKL)"
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    errors = []
    for path in _search_paths():
        try:
            return Library(ctypes.CDLL(path), path), None
        except (OSError, AttributeError) as error:
            errors.append(f"{path}: {error}")
    detail = f" ({'; '.join(errors)})" if errors else ""
    return None, f"oneMKL (libmkl_rt) is not installed: {INSTALL_HINT}{detail}"


def library():
    """The loaded oneMKL, or None where it is not installed (the reason: `unavailable_reason`)."""
    global _state
    if _state is None:
        _state = _find()
    return _state[0]


def unavailable_reason():
    """None when oneMKL loaded, else a sentence saying how to install it."""
    library()
    return _state[1]


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (Linux); an empty set where they cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_cpu_reason(flags=None):
    """None when the CPU multiplies bf16 natively (AMX or AVX512-BF16), else why not."""
    flags = cpu_flags() if flags is None else flags
    if {"amx_bf16", "avx512_bf16"} & flags:
        return None
    return ("this CPU has neither AMX (amx_bf16) nor AVX512-BF16, so bf16 products would be "
            "slower than fp32: use precision fp32")
