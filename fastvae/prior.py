"""The distribution decoded samples are drawn from: N(0, I), or a Gaussian mixture fitted
after training to the training images' posterior means.

A VAE's aggregate posterior does not fill N(0, I): the regions between the digits' clusters
decode to smudges. Fitting a mixture to the codes the encoder actually produces and sampling
from it is Ghosh et al.'s ex-post density estimation ("From Variational to Deterministic
Autoencoders", ICLR 2020, section 4). Training is unchanged: the discriminator still sees
decoded N(0, I) samples.
"""
import numpy as np

from fastvae.errors import ConfigError

PRIORS = ("normal", "mixture")


class StandardNormal:
    """N(0, I) in `dim` dimensions: the prior the model is trained with."""

    kind = "normal"

    def __init__(self, dim):
        self.dim = dim

    def sample(self, n, rng):
        return rng.standard_normal((n, self.dim))

    def arrays(self):
        return {}

    def describe(self):
        return "N(0, I)"


class GaussianMixture:
    """A mixture of full-covariance Gaussians: `weights` (k,), `means` (k, d),
    `covariances` (k, d, d); `iterations` is how many EM iterations `fit_mixture` ran."""

    kind = "mixture"
    iterations = 0

    def __init__(self, weights, means, covariances):
        self.weights = np.asarray(weights, np.float64)
        self.means = np.asarray(means, np.float64)
        self.covariances = np.asarray(covariances, np.float64)
        self.dim = self.means.shape[1]
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covariances.shape != (k, d, d):
            raise ValueError(f"a mixture of {k} components in {d} dimensions needs weights "
                             f"({k},) and covariances ({k}, {d}, {d}), got "
                             f"{self.weights.shape} and {self.covariances.shape}")
        self._cholesky = np.linalg.cholesky(self.covariances)

    def sample(self, n, rng):
        """`n` points: a component by its weight, then a draw from that Gaussian."""
        component = rng.choice(len(self.weights), size=n, p=self.weights / self.weights.sum())
        noise = rng.standard_normal((n, self.dim))
        return self.means[component] + np.einsum("nij,nj->ni", self._cholesky[component], noise)

    def log_density(self, points):
        """log p(x) of each row of `points`, (n,)."""
        return _log_sum_exp(_component_log_densities(points, self.weights, self.means,
                                                     self._cholesky))

    def arrays(self):
        return {"weights": self.weights, "means": self.means, "covariances": self.covariances}

    def describe(self):
        return f"a {len(self.weights)}-component Gaussian mixture fitted to the posterior means"


def _component_log_densities(points, weights, means, cholesky, rows=1024):
    """log w_j + log N(x | mean_j, L_j L_j^T) for every row and component, (n, k): per block
    of `rows` points one product with every component's whitening matrix at once."""
    points = np.asarray(points, np.float64)
    k, dim = means.shape
    whiten = np.linalg.inv(cholesky)                       # (k, d, d): L_j^-1
    stacked = whiten.transpose(2, 0, 1).reshape(dim, k * dim)
    shift = np.einsum("kij,kj->ki", whiten, means)
    constant = (np.log(weights) - np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(1)
                - 0.5 * dim * np.log(2 * np.pi))
    out = np.empty((len(points), k))
    for start in range(0, len(points), rows):
        whitened = (points[start:start + rows] @ stacked).reshape(-1, k, dim) - shift
        out[start:start + rows] = constant - 0.5 * np.einsum("nkd,nkd->nk", whitened, whitened)
    return out


def _weighted_covariances(points, responsibilities, counts, means, rows=1024):
    """Each component's covariance about its mean under the responsibilities, (k, d, d)."""
    dim = points.shape[1]
    second = np.zeros((len(counts), dim * dim))
    for start in range(0, len(points), rows):
        block = points[start:start + rows]
        outer = (block[:, :, None] * block[:, None, :]).reshape(len(block), dim * dim)
        second += responsibilities[start:start + rows].T @ outer
    second = second.reshape(-1, dim, dim) / counts[:, None, None]
    return second - means[:, :, None] * means[:, None, :]


def _log_sum_exp(values):
    top = values.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(values - top).sum(axis=1))


def fit_mixture(points, components, seed=0, iterations=200, tolerance=1e-3, ridge=1e-6):
    """A GaussianMixture fitted to `points` (n, d) by EM (Dempster et al. 1977).

    Means start at `components` distinct points drawn with `seed`, covariances at the data's;
    EM stops when the mean log-likelihood gains less than `tolerance` nats in an iteration.
    `ridge` times the data's mean variance is added to each covariance's diagonal so that a
    component on a few points, or a latent dimension the encoder does not use, stays
    invertible.
    """
    points = np.asarray(points, np.float64)
    n, dim = points.shape
    if not 1 <= components <= n:
        raise ConfigError(f"a mixture of {components} components needs between 1 and "
                          f"{n} points to fit: lower `prior_components`")
    rng = np.random.default_rng(seed)
    floor = ridge * max(float(points.var(axis=0).mean()), 1e-12) * np.eye(dim)
    means = points[rng.choice(n, components, replace=False)]
    covariances = np.repeat((np.cov(points.T).reshape(dim, dim) + floor)[None], components, 0)
    weights = np.full(components, 1.0 / components)
    previous, done = -np.inf, 0
    while done < iterations:
        done += 1
        log_joint = _component_log_densities(points, weights, means,
                                             np.linalg.cholesky(covariances))
        log_likelihood = _log_sum_exp(log_joint)
        responsibilities = np.exp(log_joint - log_likelihood[:, None])
        counts = responsibilities.sum(axis=0) + 1e-12
        weights = counts / n
        means = responsibilities.T @ points / counts[:, None]
        covariances = _weighted_covariances(points, responsibilities, counts, means) + floor
        mean_log_likelihood = float(log_likelihood.mean())
        if mean_log_likelihood - previous < tolerance:
            break
        previous = mean_log_likelihood
    mixture = GaussianMixture(weights, means, covariances)
    mixture.iterations = done   # EM iterations run
    return mixture


def fit_prior(model, images, components, seed=0):
    """Fit a `components`-Gaussian mixture to the posterior means of `images` and make it
    `model.prior` (what `model.sample` draws from); returns it."""
    mu, _ = model.encode(np.asarray(images))
    model.prior = fit_mixture(mu, components, seed=seed)
    return model.prior


def from_arrays(dim, arrays):
    """The prior a checkpoint's `prior/*` arrays describe (none: N(0, I))."""
    if not arrays:
        return StandardNormal(dim)
    mixture = GaussianMixture(arrays["weights"], arrays["means"], arrays["covariances"])
    if mixture.dim != dim:
        raise ValueError(f"the mixture has {mixture.dim} dimensions, the latent {dim}")
    return mixture

