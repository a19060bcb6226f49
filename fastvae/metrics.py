"""Likelihood and reconstruction measures, shared by the trainer, `evaluate` and `reconstruct`.

Units: nats per image (sums over the pixels or the latent dimensions); MSE per pixel. Inputs
and outputs are NumPy; likelihoods are computed in float64 from the decoder's logits.
"""
import numpy as np

from fastvae.data import to_unit_float


def as_unit_images(images):
    """Images as (N, pixels) float64 in [0, 1]: uint8 is divided by 255, floats kept."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return to_unit_float(images, dtype="float64")
    return images.reshape(len(images), -1).astype(np.float64)


def bernoulli_nll(images, probabilities):
    """-log p(x | probabilities) per image in nats, for x in [0, 1] (Bernoulli decoder).

    Probabilities are clipped to [1e-7, 1 - 1e-7]; `bernoulli_log_likelihood` on logits is exact.
    """
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return -np.sum(images * np.log(p) + (1 - images) * np.log1p(-p), axis=-1)


def bernoulli_log_likelihood(images, logits):
    """log p(x | sigmoid(logits)) summed over the last axis, in float64, from the logits.

    x * l - softplus(l), with softplus(l) = max(l, 0) + log1p(exp(-|l|)): no overflow, no
    log(0), and no clipping of confident pixels. `images` broadcasts against `logits`.
    """
    logits = np.asarray(logits, dtype=np.float64)
    softplus = np.maximum(logits, 0) + np.log1p(np.exp(-np.abs(logits)))
    return np.sum(images * logits - softplus, axis=-1)


def gaussian_kl(mu, log_var):
    """KL(N(mu, exp(log_var)) || N(0, I)) per row, in nats."""
    mu, log_var = np.asarray(mu, np.float64), np.asarray(log_var, np.float64)
    return -0.5 * np.sum(1 + log_var - mu**2 - np.exp(log_var), axis=-1)


def reconstruction_errors(model, images, batch_size=1000):
    """(BCE in nats, MSE per pixel) of each image's reconstruction (its decoded posterior
    mean), two float64 arrays of shape (N,); the BCE is exact, from the decoder's logits."""
    images = as_unit_images(images)
    bce, mse = np.empty(len(images)), np.empty(len(images))
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        logits = model.reconstruct(images[part], logits=True).astype(np.float64)
        bce[part] = -bernoulli_log_likelihood(images[part], logits)
        mse[part] = np.mean((np.exp(-np.logaddexp(0.0, -logits)) - images[part]) ** 2, axis=1)
    return bce, mse
