import json

import numpy as np
import pytest

from fastvae import cli, data, evaluate, kernels, metrics
from fastvae.classifier import (
    Classifier,
    load_or_train_classifier,
    softmax_cross_entropy,
    train_classifier,
)
from fastvae.config import Config
from fastvae.model import VAEGAN
from fastvae.state import TrainState

FAST = "numba" if "numba" in kernels.available() else "numpy"
CLASSIFIER_EPOCHS = 2  # 97.6 % on the test set; the default 10 epochs reach 98.5 %


def correlated_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + shift


# ----- Fréchet distance -----

def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    x = correlated_features(2000, 16, seed=0)
    assert evaluate.frechet_distance(x, x) == pytest.approx(0, abs=1e-8)
    shifts = [0.0, 0.1, 0.3, 1.0, 3.0]
    distances = [evaluate.frechet_distance(x, x + s) for s in shifts]
    assert all(a < b for a, b in zip(distances, distances[1:]))
    # a shift moves only the mean: the distance is |shift|^2 summed over the 16 features
    assert distances == pytest.approx([16 * s**2 for s in shifts], rel=1e-7, abs=1e-8)
    # another sample of the same distribution is close; a different covariance is not
    assert evaluate.frechet_distance(x, correlated_features(2000, 16, seed=1)) < 0.2
    assert evaluate.frechet_distance(x, 2 * x) > 1.0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    var1, var2 = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = evaluate.frechet_distance_from_statistics(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(closed, rel=1e-10)
    # the same from samples of the two Gaussians (sampling error only)
    x = mu1 + np.sqrt(var1) * rng.standard_normal((40000, 20))
    y = mu2 + np.sqrt(var2) * rng.standard_normal((40000, 20))
    assert evaluate.frechet_distance(x, y) == pytest.approx(closed, rel=0.02)
    # rotating both distributions by one orthogonal matrix changes nothing
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    rotated = evaluate.frechet_distance_from_statistics(
        q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(closed, rel=1e-9)


def test_trace_sqrt_product_agrees_with_the_eigenvalues_of_the_nonsymmetric_product():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 12, 12))
    sigma1, sigma2 = a @ a.T, b @ b.T + np.eye(12)
    expected = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real))
    assert evaluate.trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected, rel=1e-9)
    root = evaluate.sqrt_psd(sigma1)
    np.testing.assert_allclose(root @ root, sigma1, atol=1e-9)
    # fewer samples than features: a singular covariance needs no epsilon and gives no NaN
    few = rng.standard_normal((5, 12))
    assert np.isfinite(evaluate.frechet_distance(few, few + 1))


# ----- kernel distance -----

def test_kernel_distance_is_about_zero_for_a_set_with_itself_and_positive_when_shifted():
    x = correlated_features(600, 16, seed=0)
    kid = lambda y: evaluate.kernel_distance(x, y, subsets=20, subset_size=300)
    (same, _), (other, _) = kid(x), kid(correlated_features(600, 16, seed=1))
    shifts = [kid(x + s)[0] for s in (0.25, 0.5, 1.0)]
    assert all(a < b for a, b in zip(shifts, shifts[1:]))
    assert shifts[0] > 0.1 and max(abs(same), abs(other)) < 0.05 * shifts[1]
    # all 600 rows in every subset: X against itself is -2 / (m - 1) x (mean of the kernel's
    # diagonal - mean of all its entries), an O(1/m) offset of the unbiased estimator
    full, std = evaluate.kernel_distance(x, x, subsets=2, subset_size=600)
    k = evaluate.polynomial_kernel(x, x)
    assert std == 0 and full == pytest.approx(-2 / 599 * (np.diag(k).mean() - k.mean()))
    assert abs(full) < 0.01 * np.diag(k).mean()


# ----- likelihood bounds on a small trained model -----

@pytest.fixture(scope="module")
def tiny_model(mnist_dir):
    """A small plain VAE trained for 300 steps on 500 MNIST images, and 200 test images."""
    images, _ = data.load_split("mnist", "train", mnist_dir, download=False, limit=500)
    test, labels = data.load_split("mnist", "test", mnist_dir, download=False, limit=200)
    config = Config(mode="vae", latent_dim=8, encoder_widths=(128,), decoder_widths=(128,),
                    lr_encoder=1e-3, lr_decoder=1e-3, batch_size=50, seed=0)
    model = VAEGAN(config)
    state = TrainState(model)
    x = data.to_unit_float(images)
    rng = np.random.default_rng(0)
    for _ in range(30):
        for batch in data.iterate_batches(x, 50, rng):
            state.step(batch)
    return model, data.to_unit_float(test, dtype="float64"), labels


def test_importance_weighted_bound_is_tighter_than_the_elbo(tiny_model):
    model, images, _ = tiny_model
    # the single-sample ELBO per image, averaged over 20 noise draws to tame its variance
    elbo = np.mean([evaluate.negative_elbo(model, images, seed=s) for s in range(20)], axis=0)
    bounds = {k: evaluate.importance_weighted_nll(model, images, k=k, seed=1)
              for k in (1, 10, 200)}
    assert 80 < elbo.mean() < 300  # it learned something, and nats are per image
    assert bounds[200].mean() < bounds[10].mean() < bounds[1].mean()
    assert bounds[200].mean() < elbo.mean() - 1.0
    # per image too (both are estimates: allow a few nats of noise)
    assert np.mean(bounds[200] <= elbo) > 0.95 and np.all(bounds[200] <= elbo + 3.0)


def test_iwae_with_one_sample_is_the_single_sample_elbo(tiny_model):
    model, images, _ = tiny_model
    eps = np.random.default_rng(2).standard_normal((len(images), 1, model.config.latent_dim))
    iwae = evaluate.importance_weighted_nll(model, images, k=1, eps=eps)
    elbo = evaluate.negative_elbo(model, images, eps=eps[:, 0])
    # same noise: they differ exactly by the sampled minus the closed-form KL
    mu, log_var = (a.astype(np.float64) for a in model.encode(images))
    z = mu + np.exp(0.5 * log_var) * eps[:, 0]
    log_q = -0.5 * np.sum(eps[:, 0] ** 2 + log_var + np.log(2 * np.pi), axis=1)
    log_p = -0.5 * np.sum(z**2 + np.log(2 * np.pi), axis=1)
    sampled_kl, closed_kl = log_q - log_p, evaluate.gaussian_kl(mu, log_var)
    np.testing.assert_allclose(iwae - elbo, sampled_kl - closed_kl, atol=1e-6)
    # ... which is zero in expectation: average over many noise draws
    draws = np.random.default_rng(3).standard_normal((len(images), 50, model.config.latent_dim))
    z = mu[:, None] + np.exp(0.5 * log_var)[:, None] * draws
    log_q = -0.5 * np.sum(draws**2 + log_var[:, None] + np.log(2 * np.pi), axis=2)
    log_p = -0.5 * np.sum(z**2 + np.log(2 * np.pi), axis=2)
    gap = (log_q - log_p) - closed_kl[:, None]
    assert abs(gap.mean()) < 4 * gap.std() / np.sqrt(gap.size)


def test_iwae_batching_does_not_change_the_result_and_log_mean_exp_is_stable(tiny_model):
    model, images, _ = tiny_model
    eps = np.random.default_rng(4).standard_normal((20, 30, model.config.latent_dim))
    wide = evaluate.importance_weighted_nll(model, images[:20], k=30, eps=eps)
    narrow = evaluate.importance_weighted_nll(model, images[:20], k=30, eps=eps, max_rows=7)
    np.testing.assert_allclose(wide, narrow, rtol=1e-6)  # float32 BLAS rounding
    assert evaluate.log_mean_exp(np.array([[-2000.0, -2000.0], [1000.0, 1000.0 - np.log(3)]])
                                 ) == pytest.approx([-2000.0, 1000.0 + np.log(2 / 3)])


def test_test_metrics_keeps_its_keys_and_uses_exact_likelihoods(tiny_model):
    model, images, _ = tiny_model
    results = evaluate.test_metrics(model, images)
    assert {"reconstruction_bce", "reconstruction_mse", "kl", "negative_elbo"} <= set(results)
    recon = model.reconstruct(images)
    assert results["reconstruction_bce"] == pytest.approx(
        metrics.bernoulli_nll(images, recon).mean(), rel=1e-3)
    assert results["reconstruction_bce_per_pixel"] * 784 == pytest.approx(
        results["reconstruction_bce"])


# ----- classifier -----

def test_softmax_cross_entropy_gradient_matches_central_differences():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(5, 10)) * 3, rng.integers(0, 10, 5)
    loss, grad = softmax_cross_entropy(logits, labels, np)
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(5), labels])
    assert loss == pytest.approx(expected, rel=1e-12)
    numeric = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        step = np.zeros_like(logits)
        step[index] = 1e-6
        numeric[index] = (softmax_cross_entropy(logits + step, labels, np)[0]
                          - softmax_cross_entropy(logits - step, labels, np)[0]) / 2e-6
    np.testing.assert_allclose(grad, numeric, atol=1e-7)
    big, _ = softmax_cross_entropy(np.array([[1e4, -1e4]]), np.array([1]), np)
    assert big == pytest.approx(2e4)


@pytest.fixture(scope="module")
def classifier_cache(mnist_dir, tmp_path_factory):
    """A cache folder holding the classifier trained for CLASSIFIER_EPOCHS epochs."""
    folder = tmp_path_factory.mktemp("classifier-cache")
    model = load_or_train_classifier(mnist_dir, epochs=CLASSIFIER_EPOCHS, backend=FAST,
                                     cache_dir=folder, download=False)
    return folder, model


def test_classifier_reaches_97_percent_and_is_cached(classifier_cache, mnist_dir, monkeypatch):
    folder, model = classifier_cache
    test, labels = data.load_split("mnist", "test", mnist_dir, download=False)
    assert model.accuracy(test, labels) >= 0.97
    assert model.info["test_accuracy"] == pytest.approx(model.accuracy(test, labels))
    assert model.predict(test[:7]).shape == (7,)
    assert model.features(test[:7]).shape == (7, 256)
    cached = list(folder.glob("classifier-*.npz"))
    assert len(cached) == 1 and not list(folder.glob(".*tmp"))
    # the second call loads the file, trains nothing, and gives the same predictions
    monkeypatch.setattr("fastvae.classifier.train_classifier",
                        lambda *a, **k: pytest.fail("retrained a cached classifier"))
    again = load_or_train_classifier(mnist_dir, epochs=CLASSIFIER_EPOCHS, cache_dir=folder,
                                     download=False)
    np.testing.assert_array_equal(again.logits(test[:500]), model.logits(test[:500]))
    assert isinstance(Classifier.load(cached[0]), Classifier)


def test_classifier_training_is_seeded():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (256, 784), dtype=np.uint8), rng.integers(0, 10, 256)
    first, second, other = (train_classifier(images, labels, epochs=1, seed=s, widths=(16, 8))
                            for s in (0, 0, 1))
    np.testing.assert_array_equal(first.params["network"], second.params["network"])
    assert not np.array_equal(first.params["network"], other.params["network"])


# ----- recognisable share and mode coverage -----

def test_recognisable_needs_confidence_and_features_inside_the_class_region():
    probabilities = np.array([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.92, 0.08]])
    features = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.2], [9.0, 0.0]])
    regions = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.eye(2) / 0.25, 1.0)   # radius 0.5
    # row 1 is not confident, row 3 is confident but far outside class 0's region
    np.testing.assert_array_equal(evaluate.recognisable(probabilities, features, regions),
                                  [True, False, True, False])
    np.testing.assert_array_equal(evaluate.class_shares(probabilities), [0.75, 0.25])  # a tie: 0


def test_class_regions_hold_the_chosen_share_and_follow_the_covariance():
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 10.0, 0.1, 1.0])      # the Mahalanobis distance undoes the scales
    features = np.concatenate([rng.normal(0, 1, (5000, 4)), rng.normal(5, 1, (5000, 4))]) * scale
    probabilities = np.repeat(np.eye(3)[:2], 5000, axis=0)    # class 2 is never predicted
    regions = evaluate.class_regions(features, probabilities, quantile=0.9)
    centroids, precision, radius = regions
    np.testing.assert_allclose(centroids[:2], [[0] * 4, 5 * scale], atol=0.3)
    assert np.isnan(centroids[2]).all()
    np.testing.assert_allclose(np.diag(precision), 1 / scale**2, rtol=0.05)
    assert radius == pytest.approx(np.sqrt(7.78), rel=0.03)   # chi-square(4) 90 % point
    inside = evaluate.recognisable(probabilities, features, regions)
    assert inside.mean() == pytest.approx(0.9, abs=0.005)   # the radius is fitted on half
    # a point one radius away along the widest axis is inside, along the narrowest outside
    probe = np.array([[0.0, 0.9 * radius * 10.0, 0, 0], [0, 0, 1.1 * radius * 0.1, 0]])
    np.testing.assert_array_equal(evaluate.recognisable(np.eye(3)[[0, 0]], probe, regions),
                                  [True, False])
    assert not evaluate.recognisable(np.eye(3)[[2]], probe[:1], regions).any()


@pytest.fixture(scope="module")
def digit_regions(classifier_cache, mnist_dir):
    """The 2-epoch classifier, the regions of 5,000 training images, 2,000 test images."""
    _, model = classifier_cache
    train, _ = data.load_split("mnist", "train", mnist_dir, download=False, limit=5000)
    test, labels = data.load_split("mnist", "test", mnist_dir, download=False, limit=2000)
    regions = evaluate.class_regions(model.features(train), model.probabilities(train))
    return model, regions, test, labels


def quality(model, regions, images):
    return evaluate.sample_class_metrics(model.probabilities(images), model.features(images),
                                         regions)


def test_real_test_images_are_recognisable_and_cover_every_digit_evenly(digit_regions):
    model, regions, test, labels = digit_regions
    metrics = quality(model, regions, test)
    assert metrics["recognisable_samples"] >= 0.85   # the ceiling
    assert metrics["confident_samples"] >= metrics["recognisable_samples"]
    truth = np.bincount(labels, minlength=10) / len(labels)
    for digit in range(10):
        assert metrics[f"sample_class_{digit}"] == pytest.approx(truth[digit], abs=0.02)
    assert metrics["sample_class_min"] > 0.07 and metrics["sample_class_max"] < 0.13


def test_uniform_noise_is_not_recognisable(digit_regions):
    model, regions, _, _ = digit_regions
    noise = np.random.default_rng(0).uniform(0, 1, (2000, 784))
    assert np.mean(model.probabilities(noise).max(axis=1) >= 0.9) > 0.5  # confident, yet
    assert quality(model, regions, noise)["confident_samples"] > 0.5
    assert quality(model, regions, noise)["recognisable_samples"] < 0.01  # outside the regions


def test_a_sample_set_of_one_digit_covers_one_class(digit_regions):
    model, regions, test, labels = digit_regions
    metrics = quality(model, regions, test[labels == 3])
    assert metrics["sample_class_3"] >= 0.95
    assert metrics["sample_class_max"] == metrics["sample_class_3"]
    assert metrics["sample_class_min"] == 0.0
    assert sum(metrics[f"sample_class_{d}"] > 0.02 for d in range(10)) == 1


def test_probabilities_are_the_softmax_of_the_logits(digit_regions):
    model, _, test, _ = digit_regions
    logits = model.logits(test[:50]).astype(np.float64)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.probabilities(test[:50]), expected, rtol=1e-12)


# ----- the command -----

def test_evaluate_command_writes_every_metric(tiny_model, classifier_cache, mnist_dir,
                                              tmp_path, monkeypatch, capsys):
    model, _, _ = tiny_model
    folder, _ = classifier_cache
    monkeypatch.setenv("FASTVAE_CACHE", str(folder))  # where the command finds the classifier
    checkpoint, output = tmp_path / "model.npz", tmp_path / "eval.json"
    TrainState(model).save(checkpoint)
    assert cli.main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(mnist_dir),
                     "--no-download", "--limit", "300", "--k", "20", "--kid-subsets", "5",
                     "--classifier-epochs", str(CLASSIFIER_EPOCHS), "--json", str(output)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(output.read_text())
    metrics = report["metrics"]
    assert list(metrics) == list(evaluate.METRICS)
    assert all(np.isfinite(value) for value in metrics.values())
    assert all(key in printed for key in evaluate.METRICS)
    assert report["images"] == 300 and report["k"] == 20
    assert metrics["iwae_nll"] < metrics["negative_elbo"]
    assert metrics["classifier_accuracy_real"] >= 0.95
    assert metrics["fid_train_images"] < metrics["fid_samples"]
    assert metrics["recognisable_real"] >= 0.85
    assert metrics["confident_real"] >= metrics["recognisable_real"]
    assert sum(metrics[f"sample_class_{d}"] for d in range(10)) == pytest.approx(1.0)


def test_evaluate_command_rejects_bad_flags(tmp_path, capsys):
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "x.npz"), "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err
