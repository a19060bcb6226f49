"""Test-set measures of a trained model: likelihood bounds, reconstruction error, and distances
between real and generated images in a digit classifier's feature space.

Units: BCE, KL, the negative ELBO and the importance-weighted bound are nats per image (sums
over the 784 pixels or the latent dimensions, means over the images); MSE is per pixel.

- `negative_elbo`: -log p(x|z) + KL(q(z|x) || p(z)) with one posterior sample z and the KL in
  closed form; `importance_weighted_nll`: the IWAE bound (Burda et al. 2016)
  -log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), which is tighter (smaller) than the
  negative ELBO in expectation and tends to -log p(x) as k grows.
- `frechet_distance`: FID's formula (Heusel et al. 2017) on Gaussians fitted to two feature
  sets; `kernel_distance`: KID (Binkowski et al. 2018), the unbiased MMD^2 with the cubic
  polynomial kernel, averaged over random subsets. The features come from
  `fastvae.classifier.Classifier.features`, an MNIST classifier's penultimate layer, so the
  numbers compare models with each other, not with FIDs computed with Inception on ImageNet.
- `recognisable`: an image the same classifier puts in one class with probability >= 0.9 and
  whose features lie within the Mahalanobis radius of its class's centroid that holds 99 % of
  the real reference images (`class_regions`); the test images' own share is the ceiling.
  `class_shares`: the share of images assigned to each digit (mode coverage: 0.1 each when even).
"""
import math

import numpy as np

from fastvae.logspace import log_mean_exp
from fastvae.metrics import (
    as_unit_images,
    bernoulli_log_likelihood,
    gaussian_kl,
    reconstruction_errors,
)
from fastvae.prior import StandardNormal

LOG_2PI = math.log(2 * math.pi)

# Every key `evaluate_model` returns, in table order, with its unit or meaning.
METRICS = {
    "reconstruction_bce": "nats/image, BCE of the decoded posterior mean",
    "reconstruction_bce_per_pixel": "nats/pixel, the same per pixel",
    "reconstruction_mse": "per pixel, squared error of the decoded posterior mean",
    "kl": "nats/image, KL(q(z|x) || N(0, I))",
    "negative_elbo": "nats/image, 1 posterior sample, KL in closed form",
    "iwae_nll": "nats/image, importance-weighted bound on -log p(x)",
    "classifier_accuracy_real": "classifier accuracy on the test images",
    "classifier_accuracy_reconstructions": "classifier accuracy on their reconstructions",
    "fid_reconstructions": "Frechet distance, test images vs reconstructions",
    "kid_reconstructions": "KID (unbiased MMD^2), test images vs reconstructions",
    "kid_reconstructions_std": "its standard deviation over subsets",
    "fid_samples": "Frechet distance, test images vs decoded prior samples",
    "fid_samples_normal": "the same for decoded N(0, I) samples (the prior trained with)",
    "kid_samples": "KID, test images vs decoded prior samples",
    "kid_samples_std": "its standard deviation over subsets",
    "fid_train_images": "Frechet distance, test vs training images (the floor)",
    "kid_train_images": "KID, test vs training images (the floor)",
    "confident_samples": "share of prior samples the classifier gives one class p >= 0.9",
    "confident_real": "the same share for the test images (the ceiling)",
    "recognisable_samples": "share of prior samples with p >= 0.9 in real digits' region",
    "recognisable_real": "the same share for the test images (the ceiling)",
    "recognisable_samples_normal": "the recognisable share of decoded N(0, I) samples",
    "sample_class_min": "smallest share of the samples that any digit gets (even: 0.1)",
    "sample_class_max": "largest share of the samples that any digit gets (even: 0.1)",
    **{f"sample_class_{digit}": f"share of the samples the classifier calls {digit}"
       for digit in range(10)},
}
RECOGNISABLE = 0.9  # the class probability above which a digit counts as recognisable


def decoder_logits(model, z, max_rows=4096):
    """The decoder's output logits for latent codes `z` (N, latent), as float64 NumPy."""
    return model.decode(z, logits=True, batch_size=max_rows).astype(np.float64)


def negative_elbo(model, images, eps=None, seed=0):
    """-log p(x|z) + KL(q(z|x) || p(z)) per image, z = mu + sigma * eps, one sample each.

    `eps` (N, latent) fixes the noise; otherwise it is drawn from `seed`.
    """
    images = as_unit_images(images)
    mu, log_var = (a.astype(np.float64) for a in model.encode(images))
    if eps is None:
        eps = np.random.default_rng(seed).standard_normal(mu.shape)
    z = mu + np.exp(0.5 * log_var) * eps
    return -bernoulli_log_likelihood(images, decoder_logits(model, z)) + gaussian_kl(mu, log_var)


def log_importance_weights(model, images, eps, max_rows=4096):
    """log p(x, z_i) - log q(z_i | x) for z_i = mu + sigma * eps[:, i]; shape (N, k), float64.

    `eps` has shape (N, k, latent). The decoder runs on at most `max_rows` codes at a time.
    """
    images = as_unit_images(images)
    mu, log_var = (a.astype(np.float64)[:, None, :] for a in model.encode(images))
    z = mu + np.exp(0.5 * log_var) * eps
    log_q = -0.5 * np.sum(eps**2 + log_var + LOG_2PI, axis=-1)
    log_prior = -0.5 * np.sum(z**2 + LOG_2PI, axis=-1)
    n, k = eps.shape[:2]
    log_px = np.empty((n, k))
    rows_per_image = max(1, max_rows // k)
    for start in range(0, n, rows_per_image):
        part = slice(start, start + rows_per_image)
        logits = decoder_logits(model, z[part], max_rows).reshape(-1, k, images.shape[1])
        log_px[part] = bernoulli_log_likelihood(images[part, None, :], logits)
    return log_px + log_prior - log_q


def importance_weighted_nll(model, images, k=100, seed=0, eps=None, max_rows=4096):
    """The IWAE bound -log (1/k) sum_i w_i >= -log p(x) per image, in nats (float64).

    With k = 1 it is the negative ELBO with a sampled KL; it decreases towards -log p(x) as k
    grows. Images go through in groups of max(1, max_rows // k), so memory stays at about
    max_rows x 784 float64 numbers whatever k and the number of images. `eps` (N, k, latent)
    fixes the noise; otherwise each group's noise is drawn from one generator seeded `seed`.
    """
    images = as_unit_images(images)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    latent = model.config.latent_dim
    group = max(1, max_rows // k)
    bounds = np.empty(len(images))
    for start in range(0, len(images), group):
        part = slice(start, start + group)
        noise = (rng.standard_normal((len(images[part]), k, latent)) if eps is None
                 else np.asarray(eps, np.float64)[part])
        bounds[part] = -log_mean_exp(log_importance_weights(model, images[part], noise, max_rows))
    return bounds


def test_metrics(model, images, batch_size=1000, seed=0):
    """Means over `images`: BCE and MSE of the reconstructions (decoded posterior means), the
    KL of the posterior from the prior, and the negative ELBO (one posterior sample), in nats.

    Likelihood terms are computed from the decoder's logits in float64 (exact, no clipping).
    """
    images = as_unit_images(images)
    rng = np.random.default_rng(seed)
    totals = {"reconstruction_bce": 0.0, "reconstruction_mse": 0.0, "kl": 0.0,
              "negative_elbo": 0.0}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        mu, log_var = (a.astype(np.float64) for a in model.encode(batch))
        kl = gaussian_kl(mu, log_var)
        z = mu + np.exp(0.5 * log_var) * rng.standard_normal(mu.shape)
        bce, mse = reconstruction_errors(model, batch, batch_size)
        totals["reconstruction_bce"] += bce.sum()
        totals["reconstruction_mse"] += mse.sum()
        totals["kl"] += kl.sum()
        totals["negative_elbo"] += (kl - bernoulli_log_likelihood(
            batch, decoder_logits(model, z))).sum()
    results = {key: float(value / len(images)) for key, value in totals.items()}
    results["reconstruction_bce_per_pixel"] = results["reconstruction_bce"] / images.shape[1]
    return results


# ----- distances between feature sets -----

def feature_statistics(features):
    """Mean and covariance (float64, rows are samples, n - 1 normalisation) of a feature set."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need a (n >= 2, d) feature array, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def sqrt_psd(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix, via eigh.

    With matrix = V diag(w) V^T, the root is V diag(sqrt(w)) V^T; eigenvalues that rounding
    made slightly negative are set to 0.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(sigma1 sigma2) for symmetric PSD sigma1, sigma2, without a general sqrtm.

    sigma1 sigma2 is not symmetric, so FID implementations usually call scipy.linalg.sqrtm
    (a Schur decomposition) and discard the imaginary rounding noise. Instead: with
    A = sigma1^(1/2) (symmetric, from `sqrt_psd`), sigma1 sigma2 = A (A sigma2), and
    M = (A sigma2) A = A sigma2 A has the same eigenvalues (XY and YX share their spectrum).
    M is symmetric PSD (x^T A sigma2 A x = (Ax)^T sigma2 (Ax) >= 0), so `eigvalsh` gives its
    eigenvalues, all real and >= 0 up to rounding (clipped at 0), and
    tr sqrt(sigma1 sigma2) = sum_i sqrt(lambda_i(M)). Everything stays real and float64, and
    a singular sigma (fewer samples than features) needs no regularising epsilon.
    """
    root1 = sqrt_psd(sigma1)
    middle = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sum(np.sqrt(np.clip(eigenvalues, 0, None))))


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2):
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    distance = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * trace_sqrt_product(sigma1, sigma2))
    return float(max(distance, 0.0))


def frechet_distance(features1, features2):
    """FID's formula between Gaussians fitted to two feature sets (rows are samples)."""
    return frechet_distance_from_statistics(*feature_statistics(features1),
                                            *feature_statistics(features2))


def polynomial_kernel(x, y, degree=3, gamma=None, coef0=1.0):
    """(gamma x . y + coef0) ** degree for every pair of rows; gamma defaults to 1 / d."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x, y, **kernel):
    """The unbiased estimate of MMD^2 between the samples x (m, d) and y (n, d):

    mean over i != j of k(x_i, x_j) + mean over i != j of k(y_i, y_j) - 2 mean k(x_i, y_j).
    It is 0 in expectation when x and y come from one distribution, and can be slightly
    negative.
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples in each set")
    k_xx, k_yy = polynomial_kernel(x, x, **kernel), polynomial_kernel(y, y, **kernel)
    k_xy = polynomial_kernel(x, y, **kernel)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
                 + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1)) - 2 * k_xy.mean())


def kernel_distance(features1, features2, subsets=100, subset_size=1000, seed=0, **kernel):
    """KID: the unbiased polynomial-kernel MMD^2, averaged over random subsets.

    As Binkowski et al.: `subsets` times, draw `subset_size` rows of each set (without
    replacement within a draw; fewer if a set is smaller), and average the MMD^2 estimates.
    Returns (mean, standard deviation over the subsets).
    """
    x = np.asarray(features1, dtype=np.float64)
    y = np.asarray(features2, dtype=np.float64)
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                            y[rng.choice(len(y), size, replace=False)], **kernel)
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ----- what the classifier makes of generated images -----

def class_regions(features, probabilities, quantile=0.99):
    """Where real digits lie in feature space, as Lee et al. 2018 model it for detecting
    inputs unlike the training data: the centroid of each class (of the images predicted as
    it), one covariance shared by all classes, and the Mahalanobis radius around the predicted
    class's centroid that holds `quantile` of the images.

    Centroids and covariance come from the even rows, the radius from the odd ones: distances
    of the very images a covariance was fitted on are too small (with 300 images, a radius
    fitted in-sample held 27 % of the test images instead of 96 %).
    Returns (centroids (classes, d), precision (d, d), radius); a class nobody is predicted as
    gets NaN centroids (nothing lies inside it).
    """
    features = np.asarray(features, np.float64)
    predicted, classes = np.argmax(probabilities, axis=1), np.asarray(probabilities).shape[1]
    fit, held_out = slice(0, None, 2), slice(1, None, 2)
    centroids = np.full((classes, features.shape[1]), np.nan)
    for label in np.unique(predicted[fit]):
        centroids[label] = features[fit][predicted[fit] == label].mean(axis=0)
    centred = features[fit] - centroids[predicted[fit]]
    covariance = centred.T @ centred / len(centred)
    ridge = 1e-6 * max(float(np.mean(np.diag(covariance))), 1e-12)
    precision = np.linalg.pinv(covariance + ridge * np.eye(len(covariance)), hermitian=True)
    with np.errstate(invalid="ignore"):
        distances = mahalanobis(features[held_out], predicted[held_out], (centroids, precision))
    radius = float(np.quantile(np.nan_to_num(distances, nan=np.inf), quantile))
    return centroids, precision, radius


def mahalanobis(features, predicted, regions):
    """Each row's Mahalanobis distance from the centroid of its class `predicted` (NaN where
    that class has no centroid)."""
    centroids, precision = regions[:2]
    offset = np.asarray(features, np.float64) - centroids[predicted]
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", offset, precision, offset), 0.0))


def recognisable(probabilities, features, regions, threshold=RECOGNISABLE):
    """Per row: the top class has p >= threshold and the features lie inside the region of
    real images (`class_regions`). Confidence alone is not enough: the classifier, like any
    ReLU network, is sure of much uniform noise (37 % of noise images reach p >= 0.9 with the
    evaluation classifier), but noise lies far outside the region."""
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=1)
    with np.errstate(invalid="ignore"):
        inside = mahalanobis(features, predicted, regions) <= regions[2]
    return confident(probabilities, threshold) & inside


def confident(probabilities, threshold=RECOGNISABLE):
    """Per row: the top class has p >= threshold (confidence alone, which noise can reach)."""
    return np.asarray(probabilities).max(axis=1) >= threshold


def class_shares(probabilities):
    """Share of rows whose most likely class is each class, (classes,) summing to 1."""
    probabilities = np.asarray(probabilities)
    counts = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1])
    return counts / len(probabilities)


def sample_class_metrics(probabilities, features, regions):
    """recognisable_samples and the per-digit shares (with their min and max) as METRICS keys."""
    shares = class_shares(probabilities)
    results = {"confident_samples": float(np.mean(confident(probabilities))),
               "recognisable_samples": float(np.mean(recognisable(probabilities, features,
                                                                  regions))),
               "sample_class_min": float(shares.min()), "sample_class_max": float(shares.max())}
    results.update({f"sample_class_{digit}": float(share) for digit, share in enumerate(shares)})
    return results


# ----- the whole evaluation -----

def evaluate_model(model, images, labels, classifier, k=100, seed=0, n_samples=None,
                   reference_images=None, kid_subsets=100, kid_subset_size=1000,
                   max_rows=4096):
    """Every measure of METRICS for `model` on test `images` (uint8 or [0, 1]) and `labels`.

    `classifier` (fastvae.classifier.Classifier) supplies the accuracy and the features;
    `n_samples` prior samples are decoded (default: as many as images); `reference_images`
    (real images the model was not evaluated on, e.g. training images) give the floor of the
    distances, NaN without them, and the class regions of the recognisable share (without
    them: the test images' own). Returns a dict of floats keyed as METRICS.
    """
    images = as_unit_images(images)
    labels = np.asarray(labels)
    results = test_metrics(model, images, seed=seed)
    results["iwae_nll"] = float(np.mean(importance_weighted_nll(model, images, k, seed,
                                                                max_rows=max_rows)))
    recon = model.reconstruct(images)
    samples = model.sample(n_samples or len(images), seed=seed)
    results["classifier_accuracy_real"] = classifier.accuracy(images, labels)
    results["classifier_accuracy_reconstructions"] = classifier.accuracy(recon, labels)
    real = classifier.features(images)
    others = {"reconstructions": recon, "samples": samples}
    if reference_images is not None:
        others["train_images"] = as_unit_images(reference_images)
    features = {name: classifier.features(others[name]) for name in others}
    kid = dict(subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    for name in ("reconstructions", "samples", "train_images"):
        if name not in others:
            results[f"fid_{name}"] = results[f"kid_{name}"] = float("nan")
            continue
        results[f"fid_{name}"] = frechet_distance(real, features[name])
        results[f"kid_{name}"], std = kernel_distance(real, features[name], **kid)
        if f"kid_{name}_std" in METRICS:
            results[f"kid_{name}_std"] = std
    reference, reference_features = ((others["train_images"], features["train_images"])
                                     if reference_images is not None else (images, real))
    regions = class_regions(reference_features, classifier.probabilities(reference))
    real_probabilities = classifier.probabilities(images)
    results["confident_real"] = float(np.mean(confident(real_probabilities)))
    results["recognisable_real"] = float(np.mean(recognisable(real_probabilities, real, regions)))
    results.update(sample_class_metrics(classifier.probabilities(samples), features["samples"],
                                        regions))
    if model.prior.kind == "normal":
        results["fid_samples_normal"] = results["fid_samples"]
        results["recognisable_samples_normal"] = results["recognisable_samples"]
    else:
        rng = np.random.default_rng(seed)
        normal = model.decode(StandardNormal(model.config.latent_dim).sample(len(samples), rng))
        normal_features = classifier.features(normal)
        results["fid_samples_normal"] = frechet_distance(real, normal_features)
        results["recognisable_samples_normal"] = float(np.mean(recognisable(
            classifier.probabilities(normal), normal_features, regions)))
    return {key: results[key] for key in METRICS}


def format_table(results, columns=None):
    """A plain-text table of METRICS: one value column per result dict (named by `columns`)."""
    many = isinstance(results, (list, tuple))
    results = list(results) if many else [results]
    columns = list(columns) if columns else ["value"] * len(results)
    width = max(len(key) for key in METRICS)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{c:>12}" for c in columns) + "  meaning",
             "-" * (width + 14 * len(columns) + 30)]
    for key, meaning in METRICS.items():
        values = "  ".join(f"{_format(r.get(key, float('nan'))):>12}" for r in results)
        lines.append(f"{key:<{width}}  {values}  {meaning}")
    return "\n".join(lines)


def _format(value):
    if not np.isfinite(value):
        return "n/a"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
