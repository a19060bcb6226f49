"""Test-set measures of a trained model: reconstruction error, KL and the ELBO."""
import numpy as np


def bernoulli_nll(images, probabilities):
    """-log p(x | probabilities) per image in nats, for x in [0, 1] (Bernoulli decoder)."""
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return -np.sum(images * np.log(p) + (1 - images) * np.log1p(-p), axis=1)


def test_metrics(model, images, batch_size=1000, seed=0):
    """Means over `images`: BCE and MSE of the reconstructions (decoded posterior means), the
    KL of the posterior from the prior, and the negative ELBO (one posterior sample), in nats."""
    rng = np.random.default_rng(seed)
    totals = {"reconstruction_bce": 0.0, "reconstruction_mse": 0.0, "kl": 0.0,
              "negative_elbo": 0.0}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        mu, log_var = model.encode(batch)
        mean_recon = model.decode(mu)
        kl = -0.5 * np.sum(1 + log_var - mu**2 - np.exp(log_var), axis=1)
        z = mu + np.exp(0.5 * log_var) * rng.standard_normal(mu.shape)
        totals["reconstruction_bce"] += bernoulli_nll(batch, mean_recon).sum()
        totals["reconstruction_mse"] += np.mean((mean_recon - batch) ** 2, axis=1).sum()
        totals["kl"] += kl.sum()
        totals["negative_elbo"] += (bernoulli_nll(batch, model.decode(z)) + kl).sum()
    return {key: float(value / len(images)) for key, value in totals.items()}
