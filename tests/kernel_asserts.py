"""Assertions the kernel tests share: a backend's result against the NumPy reference."""
import numpy as np

from fastvae.backend import to_numpy as to_host

__all__ = ["KERNEL_TOLERANCES", "assert_close", "assert_loss_close", "to_host"]

KERNEL_TOLERANCES = {"float32": 1e-5, "float64": 1e-12}


def assert_close(got, want, dtype, magnitude=None):
    """`got` (any backend) equals `want` within `dtype`'s tolerance, relative and absolute; the
    absolute part scales with the result's magnitude. Non-finite entries must agree."""
    got, want = to_host(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got) == np.isfinite(want))
    if magnitude is None:
        magnitude = float(np.abs(want).max()) if want.size else 1.0
    tolerance = KERNEL_TOLERANCES[np.dtype(dtype).name]
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * max(magnitude, 1e-30))


def assert_loss_close(got, want, dtype):
    """A loss kernel's result is a 0-d float64 array equal to `want` within `dtype`'s tolerance."""
    got = to_host(got)
    assert got.shape == () and got.dtype == np.float64, "a loss is a 0-d float64 array"
    tolerance = KERNEL_TOLERANCES[np.dtype(dtype).name]
    np.testing.assert_allclose(float(got), float(want), rtol=tolerance, atol=tolerance * 1e-3)
