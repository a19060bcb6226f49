"""The mixture prior: EM recovers a known mixture, its density and samples are right, and a
training run fits it, saves it, resumes to the same one and refuses one it cannot fit."""
import numpy as np
import pytest

from fastvae import cli, evaluate, prior
from fastvae.errors import CheckpointError, ConfigError, TrainingError
from fastvae.state import load_model, read_checkpoint
from fastvae.trainer import Trainer
from tests.test_cli import small_config

TRUE_MEANS = np.array([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]])
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])
TRUE_COVARIANCES = np.array([[[1.0, 0.3], [0.3, 0.5]], [[0.4, 0.0], [0.0, 0.4]],
                             [[0.6, -0.2], [-0.2, 0.3]]])


def true_mixture():
    return prior.GaussianMixture(TRUE_WEIGHTS, TRUE_MEANS, TRUE_COVARIANCES)


def test_em_recovers_a_known_mixture():
    points = true_mixture().sample(20000, np.random.default_rng(1))
    fitted = prior.fit_mixture(points, 3, seed=0, tolerance=1e-7)
    order = np.argsort(fitted.means[:, 0] + 0.1 * fitted.means[:, 1])
    expected = np.argsort(TRUE_MEANS[:, 0] + 0.1 * TRUE_MEANS[:, 1])
    # 20,000 points: standard errors of about 0.01 on means and weights
    np.testing.assert_allclose(fitted.means[order], TRUE_MEANS[expected], atol=0.05)
    np.testing.assert_allclose(fitted.weights[order], TRUE_WEIGHTS[expected], atol=0.02)
    np.testing.assert_allclose(fitted.covariances[order], TRUE_COVARIANCES[expected], atol=0.05)
    one = prior.fit_mixture(points, 1)
    assert fitted.log_density(points).mean() > one.log_density(points).mean() + 0.5


def test_log_density_is_the_weighted_sum_of_gaussian_densities():
    mixture, points = true_mixture(), np.random.default_rng(2).normal(size=(7, 2)) * 3
    expected = np.zeros(len(points))
    for weight, mean, covariance in zip(TRUE_WEIGHTS, TRUE_MEANS, TRUE_COVARIANCES):
        offset = points - mean
        quadratic = np.einsum("ij,jk,ik->i", offset, np.linalg.inv(covariance), offset)
        expected += (weight * np.exp(-0.5 * quadratic)
                     / np.sqrt(np.linalg.det(2 * np.pi * covariance)))
    np.testing.assert_allclose(mixture.log_density(points), np.log(expected), rtol=1e-12)


def test_pair_blocks_hold_each_rows_upper_triangle_kept_or_recomputed():
    points = np.random.default_rng(4).normal(size=(10, 3))
    rows, cols = np.triu_indices(3)
    expected = np.einsum("ni,nj->nij", points, points)[:, rows, cols]
    blocks = prior._PairBlocks(points, rows=4, keep_bytes=2 * 4 * 6 * 8 + 8)  # two of three
    for _ in range(2):   # the second pass reads the kept blocks and recomputes the last
        passes = list(blocks)
        np.testing.assert_array_equal(np.concatenate([block for block, _ in passes]), points)
        np.testing.assert_allclose(np.concatenate([pairs for _, pairs in passes]), expected,
                                   rtol=1e-15)
    assert len(blocks.kept) == 2


def test_samples_follow_the_weights_means_and_covariances():
    samples = true_mixture().sample(60000, np.random.default_rng(3))
    nearest = np.argmin(((samples[:, None] - TRUE_MEANS) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(nearest) / len(samples), TRUE_WEIGHTS, atol=0.01)
    for j in range(3):   # the components barely overlap: nearest mean ~ component
        mine = samples[nearest == j]
        np.testing.assert_allclose(mine.mean(0), TRUE_MEANS[j], atol=0.05)
        np.testing.assert_allclose(np.cov(mine.T), TRUE_COVARIANCES[j], atol=0.06)


def test_more_components_than_points_is_refused():
    with pytest.raises(ConfigError, match="lower `prior_components`"):
        prior.fit_mixture(np.zeros((4, 2)), 5)


def test_a_mixture_run_saves_its_prior_and_samples_from_it(tmp_path, mnist_dir):
    config = small_config(epochs=1, prior_components=4)
    Trainer(config, tmp_path, mnist_dir, progress=False).fit()
    model = load_model(tmp_path / "checkpoint.npz")
    assert model.prior.kind == "mixture" and model.prior.means.shape == (4, config.latent_dim)
    samples = model.sample(6, seed=5)
    z = model.prior.sample(6, np.random.default_rng(5))
    np.testing.assert_array_equal(samples, model.decode(z))
    normal = Trainer(small_config(epochs=1, prior="normal"), tmp_path / "n", mnist_dir,
                     progress=False)
    normal.fit()
    assert load_model(tmp_path / "n" / "checkpoint.npz").prior.kind == "normal"
    _, arrays = read_checkpoint(tmp_path / "n" / "checkpoint.npz")
    assert not [key for key in arrays if key.startswith("prior/")]


def test_the_mixture_is_fitted_to_the_training_images_posterior_means(tmp_path, mnist_dir):
    config = small_config(epochs=1, prior_components=3, prior_images=200)
    trainer = Trainer(config, tmp_path, mnist_dir, progress=False)
    trainer.fit()
    mu, _ = trainer.model.encode(trainer.model.backend.to_numpy(trainer.train_images[:200]))
    expected = prior.fit_mixture(mu, 3, seed=config.seed)
    np.testing.assert_array_equal(trainer.model.prior.means, expected.means)
    np.testing.assert_array_equal(trainer.model.prior.covariances, expected.covariances)


def test_a_resumed_run_fits_the_same_prior_as_an_uninterrupted_one(tmp_path, mnist_dir):
    config = small_config(epochs=2, prior_components=4)
    Trainer(config, tmp_path / "a", mnist_dir, progress=False).fit()
    Trainer(config.replace(epochs=1), tmp_path / "b", mnist_dir, progress=False).fit()
    first = load_model(tmp_path / "b" / "checkpoint.npz").prior.means.copy()
    Trainer(config, tmp_path / "b", mnist_dir, progress=False).fit(resume=True)
    straight, resumed = (load_model(tmp_path / run / "checkpoint.npz").prior
                         for run in ("a", "b"))
    for key, value in straight.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[key], value)
    assert not np.array_equal(first, resumed.means)   # refitted after the new epoch


def test_too_few_training_images_for_the_mixture_are_refused_before_training(tmp_path,
                                                                              mnist_dir):
    config = small_config(epochs=1, prior_components=300)   # 256 training images
    with pytest.raises(TrainingError, match="lower `prior_components`"):
        Trainer(config, tmp_path, mnist_dir, progress=False).fit()
    assert not (tmp_path / "metrics.csv").exists()


def test_a_checkpoint_whose_prior_does_not_fit_the_latent_is_refused(tmp_path, mnist_dir):
    from fastvae import archive
    config = small_config(epochs=1, prior_components=2)
    Trainer(config, tmp_path, mnist_dir, progress=False).fit()
    header, arrays = read_checkpoint(tmp_path / "checkpoint.npz")
    arrays["prior/means"] = np.zeros((2, config.latent_dim + 1))
    header["sha256"] = archive.digest(arrays)
    archive.write(tmp_path / "bad.npz", header, arrays)
    with pytest.raises(CheckpointError, match="invalid prior"):
        load_model(tmp_path / "bad.npz")


def test_evaluate_reports_the_normal_priors_samples_beside_the_mixtures(tmp_path, mnist_dir):
    from fastvae import data
    from fastvae.classifier import train_classifier
    images, labels = data.load_split("mnist", "train", mnist_dir, download=False, limit=1000)
    digits = train_classifier(images[:1000], labels[:1000], epochs=1, widths=(32,))
    Trainer(small_config(epochs=1, prior_components=4), tmp_path, mnist_dir,
            progress=False).fit()
    model = load_model(tmp_path / "checkpoint.npz")
    args = dict(k=2, n_samples=300, kid_subsets=2, kid_subset_size=100)
    mixture = evaluate.evaluate_model(model, images[:300], labels[:300], digits, **args)
    model.prior = prior.StandardNormal(model.config.latent_dim)
    normal = evaluate.evaluate_model(model, images[:300], labels[:300], digits, **args)
    assert mixture["fid_samples_normal"] == normal["fid_samples"] == normal["fid_samples_normal"]
    assert mixture["fid_samples"] != normal["fid_samples"]
    assert normal["recognisable_samples_normal"] == normal["recognisable_samples"]


def test_the_prior_setting_is_checked_by_name():
    with pytest.raises(ConfigError, match="unknown prior 'flat'"):
        small_config(prior="flat")
    with pytest.raises(ConfigError, match="prior_components"):
        small_config(prior_components=0)
    assert cli.build_config(cli.make_parser().parse_args(
        ["train", "--prior", "normal"])).prior == "normal"
