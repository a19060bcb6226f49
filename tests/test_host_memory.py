"""The numba backend's host arrays (huge-page arena) and its on-disk kernel cache."""
import ast
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastvae import kernels
from fastvae.backend import Backend
from fastvae.kernels import huge_pages

LINUX_THP = hasattr(mmap, "MADV_HUGEPAGE")
needs_thp = pytest.mark.skipif(not LINUX_THP, reason="no MADV_HUGEPAGE on this OS")
needs_numba = pytest.mark.skipif("numba" not in kernels.available(), reason="numba not installed")


def address(array):
    return array.__array_interface__["data"][0]


@needs_thp
@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float32), ((1,), np.uint16),
                                          ((1024, 784), np.float32), ((7,), np.float64)])
def test_arena_arrays_are_aligned_writable_and_disjoint(shape, dtype):
    arena = huge_pages.Arena(chunk=1 << 20)
    first, second = arena.empty(shape, dtype), arena.empty(shape, dtype)
    for array in (first, second):
        assert array.shape == shape and array.dtype == dtype
        assert array.flags.c_contiguous and array.flags.writeable
        assert address(array) % huge_pages.ALIGN == 0
    first[...], second[...] = 1, 2
    assert (first == 1).all() and (second == 2).all()


@needs_thp
def test_arena_packs_small_arrays_and_gives_large_ones_a_huge_page_region():
    arena = huge_pages.Arena(chunk=1 << 20)
    small = [arena.empty((10,), np.float32) for _ in range(3)]
    assert address(small[1]) - address(small[0]) == huge_pages.ALIGN
    large = arena.empty((512, 1024), np.float32)  # 2 MiB > chunk / 4
    assert address(large) % huge_pages.HUGE_PAGE == 0


@needs_thp
def test_arena_zeros_and_a_new_chunk_when_one_is_full():
    arena = huge_pages.Arena(chunk=huge_pages.HUGE_PAGE)
    arrays = [arena.zeros((512, 256), np.float32) for _ in range(5)]  # 512 KiB each: 4 a chunk
    assert all((array == 0).all() for array in arrays)
    assert address(arrays[4]) % huge_pages.HUGE_PAGE == 0  # the fifth opened a new region


def test_switched_off_gives_plain_arrays(monkeypatch):
    monkeypatch.setenv("FASTVAE_HUGE_PAGES", "off")
    array = huge_pages.Arena().empty((4, 4), np.float32)
    assert array.flags.owndata


@needs_numba
@needs_thp
def test_numba_backend_allocates_from_the_arena_and_numpy_does_not():
    numba_array = Backend("numba").empty((256, 1024))
    assert not numba_array.flags.owndata and address(numba_array) % huge_pages.ALIGN == 0
    assert Backend("numpy").empty((256, 1024)).flags.owndata  # the reference stays plain


def _jitted_functions(tree):
    """{name: parallel?} of every function decorated with @_jit(...) in a module's syntax tree."""
    found = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == "_jit":
                found[node.name] = any(keyword.arg == "parallel" and
                                       getattr(keyword.value, "value", False)
                                       for keyword in decorator.keywords)
    return found


def test_no_jitted_kernel_calls_a_parallel_one():
    """numba 0.68 segfaults loading a cached kernel that calls a parallel kernel which was
    itself loaded from the cache (the regression below); parallel drivers are called from
    Python only."""
    source = Path(kernels.__file__).with_name("numba_cpu.py").read_text()
    tree = ast.parse(source)
    jitted = _jitted_functions(tree)
    parallel = {name for name, is_parallel in jitted.items() if is_parallel}
    offenders = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in jitted:
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) in parallel:
                    offenders.append(f"{node.name} -> {call.func.id}")
    assert parallel and not offenders


_CACHE_RUN = """
import numpy as np
from fastvae.kernels import numba_cpu as n
rows, bf16 = {rows}, {bf16}
x = np.linspace(-1, 1, rows * 64, dtype=np.float32).reshape(rows, 64)
w = np.linspace(-1, 1, 64 * 300, dtype=np.float32).reshape(64, 300)
b = np.zeros(300, np.float32)
out, grad_in = np.empty((rows, 300), np.float32), np.empty((rows, 64), np.float32)
low = {{}}
if bf16:
    low = dict(x16=n.to_bf16(x, np.empty(x.shape, np.uint16)),
               weight16=n.to_bf16(w, np.empty(w.shape, np.uint16)),
               out16=np.empty(out.shape, np.uint16))
n.dense_forward(x, w, b, "relu", out, **low)
back = {{}} if not bf16 else dict(x16=low["x16"], weight16=low["weight16"],
                                 scratch16=np.empty(out.shape, np.uint16))
n.dense_backward(out, x, out, w, "relu", np.empty_like(w), np.empty_like(b), grad_in,
                 np.empty_like(out), **back)
want = np.maximum(x @ w, 0)  # bf16 inputs: each term within 2**-8 of itself, so the sum
assert (abs(out - want) <= 2.0**-7 * (abs(x) @ abs(w)) + 1e-6).all(), "forward"
print("ok")
"""


@needs_numba
@pytest.mark.skipif(kernels.load("numba").MKL is None, reason="oneMKL not installed")
def test_kernel_cache_survives_bf16_then_fp32_processes(tmp_path):
    """The order of processes that segfaulted before: bf16 at a large and a small batch, fp32 at
    a large one (compiled into the same cache entries), then fp32 at a small one from the cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for rows, bf16 in [(512, True), (8, True), (512, False), (8, False), (512, False)]:
        done = subprocess.run([sys.executable, "-c", _CACHE_RUN.format(rows=rows, bf16=bf16)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "ok" in done.stdout, (rows, bf16, done.stderr[-2000:])
