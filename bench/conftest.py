"""Parameters and the timing helper shared by the benchmarks.

Every benchmark is parametrised by backend (every registered one; those not usable here are
skipped with the reason), batch size and dtype. `fastvae bench` narrows them with the
--fastvae-* options below; without them (CI) everything runs, each body once under
--benchmark-disable.
"""
import time

import numpy as np
import pytest

from fastvae import kernels
from fastvae.bench import BATCH_SIZES, DTYPES, PRECISIONS, QUICK_BATCH
from fastvae.bench.report import PRODUCT_PATHS


def pytest_addoption(parser):
    group = parser.getgroup("fastvae", "fastvae benchmark selection")
    group.addoption("--fastvae-backend", action="append", default=None,
                    help="benchmark only this fastvae backend (repeatable)")
    group.addoption("--fastvae-batch", action="append", type=int, default=None,
                    help="batch size (repeatable; default 64, 128, 512)")
    group.addoption("--fastvae-dtype", action="append", default=None, choices=DTYPES,
                    help="dtype (repeatable; default float32 and float64)")
    group.addoption("--fastvae-precision", action="append", default=None, choices=PRECISIONS,
                    help="products' precision (repeatable; default fp32 and bf16)")
    group.addoption("--fastvae-quick", action="store_true", default=False,
                    help="the training step and its references at batch 128, float32 only")


def pytest_configure(config):
    config.addinivalue_line("markers", "fastvae_full: left out of `fastvae bench --quick`")


def _option(config, name):
    try:
        return config.getoption(name)
    except ValueError:  # the options were not registered (conftest not an initial one)
        return None


def selected_backends(config):
    """(name, reason it cannot run here or None) for each backend to benchmark."""
    names = _option(config, "--fastvae-backend") or list(kernels.names())
    usable = set(kernels.available())
    result = []
    for name in dict.fromkeys(names):
        reason = None
        if name not in usable:
            try:
                kernels.load(name)
            except (kernels.BackendUnavailable, TypeError, KeyError) as error:
                reason = str(error)
        result.append((name, reason))
    return result


def selected_devices(config):
    """Devices of the references: the CPU always, the GPU where cupy is benchmarked."""
    devices = ["cpu"]
    if any(name == "cupy" and reason is None for name, reason in selected_backends(config)):
        devices.append("gpu")
    return devices


def pytest_generate_tests(metafunc):
    config = metafunc.config
    quick = bool(_option(config, "--fastvae-quick"))
    names = metafunc.fixturenames
    if "backend" in names:
        params = [pytest.param(name, marks=pytest.mark.skip(reason=reason) if reason else (),
                               id=name) for name, reason in selected_backends(config)]
        metafunc.parametrize("backend", params)
    if "device" in names:
        metafunc.parametrize("device", selected_devices(config))
    if "batch" in names:
        batches = _option(config, "--fastvae-batch") or ((QUICK_BATCH,) if quick else BATCH_SIZES)
        metafunc.parametrize("batch", list(dict.fromkeys(batches)), ids=lambda b: f"b{b}")
    if "dtype" in names:
        dtypes = _option(config, "--fastvae-dtype") or (("float32",) if quick else DTYPES)
        metafunc.parametrize("dtype", list(dict.fromkeys(dtypes)))
    precisions = _option(config, "--fastvae-precision") or PRECISIONS
    if "precision" in names:
        metafunc.parametrize("precision", list(dict.fromkeys(precisions)))
    if "product_path" in names:
        paths = [path for path in PRODUCT_PATHS if path != "onemkl-bf16" or "bf16" in precisions]
        metafunc.parametrize("product_path", paths)


def pytest_collection_modifyitems(config, items):
    if not _option(config, "--fastvae-quick"):
        return
    keep = [item for item in items if item.get_closest_marker("fastvae_full") is None]
    dropped = [item for item in items if item.get_closest_marker("fastvae_full") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def device_sync(xp):
    """A function that waits for the device of array module `xp` (a no-op on the CPU)."""
    cuda = getattr(xp, "cuda", None)
    if cuda is None or xp is np:
        return lambda: None
    return lambda: cuda.Device().synchronize()


@pytest.fixture
def timed(benchmark):
    """timed(function, group=..., xp=..., **info): benchmark `function` after warm-up.

    The first call (JIT compilation for numba, kernel builds for cupy) and one more warm-up
    call run before timing; the first call's time is kept as extra_info["first_call_s"].
    The device is synchronised inside the timed function. Under --benchmark-disable the
    function runs exactly once. Returns the function's result.
    """
    def run(function, *, group, xp=np, warmup=1, **info):
        sync = device_sync(xp)

        def call():
            result = function()
            sync()
            return result

        benchmark.group = group
        benchmark.extra_info.update(info)
        if benchmark.enabled:
            start = time.perf_counter()
            call()
            benchmark.extra_info["first_call_s"] = time.perf_counter() - start
            for _ in range(warmup):
                call()
        return benchmark(call)

    return run
