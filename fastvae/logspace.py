"""Sums of exponentials in log space, shifted by the maximum so that none overflows: the
IWAE bound's mean over importance samples and the mixture prior's sum over components."""
import numpy as np


def log_mean_exp(values, axis=-1):
    """log(mean(exp(values))) along `axis`, in float64, shifted by the maximum (no overflow)."""
    values = np.asarray(values, dtype=np.float64)
    top = np.max(values, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    result = np.log(np.mean(np.exp(values - top), axis=axis, keepdims=True)) + top
    return np.squeeze(result, axis=axis)
