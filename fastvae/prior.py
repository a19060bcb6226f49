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
from fastvae.logspace import log_mean_exp

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
        points = np.asarray(points, np.float64)
        terms = _log_density_terms(self.weights, self.means, self._cholesky)
        log_components = np.log(len(self.weights))   # the sum is k times the mean
        return np.concatenate([log_mean_exp(_log_joint(block, pairs, terms), axis=1)
                               + log_components
                               for block, pairs in _PairBlocks(points, keep_bytes=0)])

    def arrays(self):
        return {"weights": self.weights, "means": self.means, "covariances": self.covariances}

    def describe(self):
        return f"a {len(self.weights)}-component Gaussian mixture fitted to the posterior means"


def _pair_products(points):
    """x_i x_j for i <= j of each row, (n, d(d+1)/2): the quadratic features in which every
    component's log density, and every second moment, is one matrix product."""
    upper_rows, upper_cols = np.triu_indices(points.shape[1])
    columns = points.T.copy()               # row gathers: ~4x faster than column gathers
    return (columns[upper_rows] * columns[upper_cols]).T


class _PairBlocks:
    """Consecutive blocks of `rows` points with their pair products, iterated once per EM
    iteration: the products of the first `keep_bytes` worth of blocks are made once and kept,
    the rest's are made again on every pass."""

    def __init__(self, points, rows=2048, keep_bytes=2**28):
        self.blocks = [points[start:start + rows] for start in range(0, len(points), rows)]
        pair_count = points.shape[1] * (points.shape[1] + 1) // 2
        self.kept = []
        for block in self.blocks:
            keep_bytes -= len(block) * pair_count * block.itemsize
            if keep_bytes < 0:
                break
            self.kept.append(_pair_products(block))

    def __iter__(self):
        for index, block in enumerate(self.blocks):
            yield block, (self.kept[index] if index < len(self.kept) else _pair_products(block))


def _log_density_terms(weights, means, cholesky):
    """(quadratic (d(d+1)/2, k), linear (d, k), constant (k,)) such that log w_j +
    log N(x | mean_j, L_j L_j^T) = constant_j + x . linear_j - pairs(x) . quadratic_j / 2."""
    k, dim = means.shape
    inverse = np.linalg.inv(cholesky)                           # L_j^-1
    precision = inverse.transpose(0, 2, 1) @ inverse            # (L_j L_j^T)^-1
    linear = np.einsum("kij,kj->ki", precision, means)
    upper_rows, upper_cols = np.triu_indices(dim)
    off_diagonal_twice = np.where(upper_rows == upper_cols, 1.0, 2.0)
    quadratic = precision[:, upper_rows, upper_cols] * off_diagonal_twice
    constant = (np.log(weights) - np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(1)
                - 0.5 * dim * np.log(2 * np.pi) - 0.5 * np.einsum("ki,ki->k", linear, means))
    return quadratic.T, linear.T, constant


def _log_joint(points, pairs, terms):
    """log w_j + log N(x | component j) for every row and component, (n, k)."""
    quadratic, linear, constant = terms
    return constant + points @ linear - 0.5 * (pairs @ quadratic)


def _unpack_symmetric(upper, dim):
    """(k, d(d+1)/2) upper triangles -> (k, d, d) symmetric matrices."""
    upper_rows, upper_cols = np.triu_indices(dim)
    out = np.zeros((len(upper), dim, dim))
    out[:, upper_rows, upper_cols] = upper
    out[:, upper_cols, upper_rows] = upper
    return out


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
    blocks, log_components = _PairBlocks(points), np.log(components)  # sum: k x mean
    previous, done = -np.inf, 0
    while done < iterations:
        done += 1
        terms = _log_density_terms(weights, means, np.linalg.cholesky(covariances))
        counts, first, second, total = 1e-12, 0.0, 0.0, 0.0
        for block, pairs in blocks:     # the E and M steps: every sum is over rows
            log_joint = _log_joint(block, pairs, terms)
            log_likelihood = log_mean_exp(log_joint, axis=1) + log_components
            responsibilities = np.exp(log_joint - log_likelihood[:, None])
            counts = counts + responsibilities.sum(axis=0)
            first = first + responsibilities.T @ block
            second = second + responsibilities.T @ pairs
            total += float(log_likelihood.sum())
        weights, means = counts / n, first / counts[:, None]
        covariances = (_unpack_symmetric(second / counts[:, None], dim)
                       - means[:, :, None] * means[:, None, :] + floor)
        if total / n - previous < tolerance:
            break
        previous = total / n
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

