import os
import types

import numpy as np
import pytest

from fastvae import Backend, gradcheck, kernels
from fastvae.backend import default_backend_name
from fastvae.config import Config
from fastvae.errors import CheckpointError
from fastvae.kernels import numpy_ref
from fastvae.model import VAEGAN
from fastvae.state import TrainState, load_model


@pytest.mark.parametrize("overrides", [
    {},
    {"gamma": 1.0},
    {"reconstruction": "feature", "feature_layer": 0},
    {"reconstruction": "feature", "activation": "tanh", "discriminator_activation": "leaky_relu"},
    {"mode": "vae"},
    {"kl_weight": 0.3},
    {"mode": "vae", "kl_weight": 2.5},
    {"real_label": 0.9},
], ids=["pixel", "pixel-gamma-1", "feature", "feature-tanh-leaky", "vae", "kl-weight", "vae-kl-weight",
        "real-label"])
def test_each_networks_gradient_of_its_own_loss_matches_finite_differences(overrides):
    checks = gradcheck.model_checks(gradcheck.small_config(**overrides), seed=1)
    expected = 2 if overrides.get("mode") == "vae" else 3
    assert len(checks) == expected
    assert all(check.error < 1e-6 for check in checks), gradcheck.report(checks)


def test_real_label_smooths_only_the_discriminators_real_target():
    """BCE(l, t) = softplus(l) - l t, so a real label of 0.9 adds 0.1 x mean(real logits) to the
    discriminator's loss and nothing to the decoder's or the encoder's."""
    config = gradcheck.small_config()
    rng = np.random.default_rng(0)
    x = rng.random((6, config.image_size))
    eps, prior_z = rng.standard_normal((2, 6, config.latent_dim))
    losses = {}
    for label in (1.0, 0.9):
        model = VAEGAN(config.replace(real_label=label), Backend("numpy", "float64"))
        losses[label] = model.compute_gradients(x, eps=eps, prior_z=prior_z)
    probability = model.discriminate(x)
    mean_logit = np.mean(np.log(probability) - np.log1p(-probability))
    assert losses[0.9]["disc_real"] - losses[1.0]["disc_real"] == pytest.approx(0.1 * mean_logit)
    for name in ("decoder", "encoder", "disc_fake"):
        assert losses[0.9][name] == pytest.approx(losses[1.0][name], rel=1e-12)


def test_adversarial_loss_never_reaches_the_encoder():
    """Encoder gradients are those of KL + reconstruction alone, whatever gamma does elsewhere."""
    rng = np.random.default_rng(0)
    config = gradcheck.small_config()
    x = rng.uniform(size=(4, config.image_size))
    eps = rng.standard_normal((4, config.latent_dim))
    prior = rng.standard_normal((4, config.latent_dim))
    grads = []
    for gamma in (0.3, 3.0):
        model = VAEGAN(config.replace(gamma=gamma), Backend("numpy", "float64"))
        model.compute_gradients(x, eps, prior)
        grads.append({name: np.array(g) for name, g in model.grads.items()})
    np.testing.assert_allclose(grads[0]["encoder"], grads[1]["encoder"], rtol=1e-12)
    np.testing.assert_allclose(grads[0]["discriminator"], grads[1]["discriminator"], rtol=1e-12)
    assert not np.allclose(grads[0]["decoder"], grads[1]["decoder"])


@pytest.mark.parametrize("mode", ["vaegan", "vae"])
def test_kl_weight_scales_the_kl_in_the_encoder_loss_and_is_reported_unweighted(mode):
    rng = np.random.default_rng(2)
    config = gradcheck.small_config(mode=mode)
    x = rng.uniform(size=(5, config.image_size))
    eps, prior = rng.standard_normal((2, 5, config.latent_dim))
    results = [VAEGAN(config.replace(kl_weight=w), Backend("numpy", "float64"))
               .compute_gradients(x, eps, prior) for w in (1.0, 0.25)]
    plain, weighted = ({k: float(v) for k, v in r.items()} for r in results)
    assert weighted["kl"] == pytest.approx(plain["kl"], rel=1e-12)
    assert weighted["encoder"] == pytest.approx(0.25 * plain["kl"] + plain["reconstruction"],
                                                rel=1e-12)


def _train(subset, steps, batch=64, **overrides):
    model = VAEGAN(Config(seed=0, **overrides))
    state = TrainState(model)
    rng = np.random.default_rng(0)
    history = []
    while len(history) < steps:
        order = rng.permutation(len(subset))
        for start in range(0, len(subset) - batch + 1, batch):
            x = model.backend.asarray(subset[order[start:start + batch]])
            history.append({k: float(v) for k, v in state.step(x).items()})
            if len(history) == steps:
                break
    return model, history


def test_training_on_real_mnist_lowers_the_reconstruction_loss(mnist_subset):
    model, history = _train(mnist_subset, 300)
    reconstruction = [h["reconstruction"] for h in history]
    assert all(np.isfinite(v) for h in history for v in h.values())
    # measured: about 624 nats over the first 10 steps, about 168 over the last 20
    assert np.mean(reconstruction[-20:]) < 0.45 * np.mean(reconstruction[:10])
    assert np.mean(reconstruction[-20:]) < 230
    test_images = mnist_subset[:100]
    error = np.mean((model.reconstruct(test_images) - test_images) ** 2)
    assert error < 0.06


def test_same_seed_gives_identical_losses(mnist_subset):
    _, first = _train(mnist_subset[:512], 12)
    _, second = _train(mnist_subset[:512], 12)
    assert first == second
    third = TrainState(VAEGAN(Config(seed=1))).step(Backend().asarray(mnist_subset[:64]))
    assert float(third["reconstruction"]) != first[0]["reconstruction"]


def test_an_extra_backend_needs_no_change_to_layers_or_model(mnist_subset):
    calls = {}

    def counted(op):
        def call(*args):
            calls[op] = calls.get(op, 0) + 1
            return getattr(numpy_ref, op)(*args)
        return call

    module = types.SimpleNamespace(xp=np, unavailable_reason=lambda: None,
                                   **{op: counted(op) for op in kernels.OPS})
    kernels.register("counting", module)
    try:
        assert "counting" in kernels.available()
        x = mnist_subset[:32]
        reference = TrainState(VAEGAN(Config(seed=5), "numpy"))
        extra = TrainState(VAEGAN(Config(seed=5), "counting"))
        for _ in range(3):
            want = reference.step(reference.backend.asarray(x))
            got = extra.step(extra.backend.asarray(x))
        assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}
        assert set(calls) >= {"dense_forward", "dense_backward", "bce_with_logits",
                              "kl_reparam_forward", "kl_reparam_backward", "adam_update"}
    finally:
        kernels.unregister("counting")


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(KeyError, match="numpy"):
        VAEGAN(Config(), "tpu")


@pytest.mark.parametrize("bad, message", [
    ({"latent_dim": 0}, "latent_dim"),
    ({"lr_decoder": 0.0}, "learning rates"),
    ({"activation": "swish"}, "unknown activation"),
    ({"mode": "vae", "reconstruction": "feature"}, "feature reconstruction"),
    ({"feature_layer": 5}, "feature_layer"),
    ({"kl_weight": 0.0}, "kl_weight"),
    ({"equilibrium": 0.0}, "equilibrium"),
    ({"margin": -0.1}, "margin"),
    ({"lr_schedule": "step"}, "unknown lr_schedule 'step'"),
    ({"lr_final": 0.0}, "lr_final"),
    ({"lr_final": 1.5}, "lr_final"),
])
def test_invalid_settings_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        Config(**bad)


def test_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        Config.from_dict({"colour": "blue"})


def test_inference_api_takes_and_returns_numpy(mnist_subset):
    model = VAEGAN(Config(latent_dim=16))
    mu, log_var = model.encode(mnist_subset[:10])
    assert mu.shape == log_var.shape == (10, 16) and isinstance(mu, np.ndarray)
    assert model.reconstruct(mnist_subset[:3]).shape == (3, 784)
    samples = model.sample(5, seed=1)
    assert samples.shape == (5, 784) and samples.min() >= 0 and samples.max() <= 1
    np.testing.assert_array_equal(samples, model.sample(5, seed=1))
    assert model.discriminate(mnist_subset[:4]).shape == (4,)
    with pytest.raises(ValueError, match="784"):
        model.encode(np.zeros((2, 100)))


def test_checkpoint_round_trip_continues_training_identically(tmp_path, mnist_subset):
    x = mnist_subset[:64]
    state = TrainState(VAEGAN(Config(seed=2)))
    state.step(state.backend.asarray(x))
    state.save(tmp_path / "a.npz", extra={"epoch": 1})
    restored, extra = TrainState.load(tmp_path / "a.npz")
    assert restored.model.config == state.model.config and extra == {"epoch": 1}
    assert restored.steps == state.steps == {name: 1 for name in state.optimizers}
    want = state.step(state.backend.asarray(x))
    got = restored.step(restored.backend.asarray(x))
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}


def test_damaged_checkpoints_are_refused_clearly(tmp_path):
    path = tmp_path / "model.npz"
    TrainState(VAEGAN(gradcheck.small_config(dtype="float32"))).save(path)
    data = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "truncated.npz")
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a fastvae checkpoint"):
        load_model(tmp_path / "foreign.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.npz")
    assert list(tmp_path.glob(".*tmp")) == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_numba_training_step_allocates_nothing_of_array_size_in_steady_state(precision):
    import tracemalloc
    if "numba" not in kernels.available():
        pytest.skip("numba is not installed")
    reason = kernels.load("numba").bf16_unavailable_reason()
    if precision == "bf16" and reason:
        pytest.skip(reason)
    state = TrainState(VAEGAN(Config(seed=0, precision=precision), "numba"))
    x = state.backend.asarray(np.random.default_rng(0).random((128, 784)))
    for _ in range(3):
        state.step(x)                            # compile, allocate every buffer once
    tracemalloc.start()
    try:
        for _ in range(3):
            state.step(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    smallest_activation = 128 * 128 * 4          # one (batch, latent) float32 array
    assert peak < smallest_activation // 4, f"a steady-state step allocated {peak} bytes"


def test_corrupted_or_mismatched_checkpoints_are_refused(tmp_path):
    import io
    import json
    import zipfile
    path = tmp_path / "model.npz"
    TrainState(VAEGAN(gradcheck.small_config(dtype="float32"))).save(path)

    def rewrite(target, change):
        """Copy the checkpoint with its header or one array changed, zip checksums intact."""
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in archive.files}
        change(arrays)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        target.write_bytes(buffer.getvalue())

    def flip_a_parameter(arrays):
        arrays["params/decoder"] = arrays["params/decoder"].copy()
        arrays["params/decoder"][3] += 1.0

    rewrite(tmp_path / "flipped.npz", flip_a_parameter)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(tmp_path / "flipped.npz")

    def other_architecture(arrays):
        header = json.loads(arrays["header"].tobytes())
        header["config"]["latent_dim"] = 4
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    rewrite(tmp_path / "other.npz", other_architecture)
    with pytest.raises(CheckpointError, match="does not fit this model: params/encoder"):
        load_model(tmp_path / "other.npz")

    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:           # damage an array's stored bytes: its CRC
        entry = archive.getinfo("params/decoder.npy")  # fails (the middle of the file may fall
    start = entry.header_offset                      # in a local header's unused extra field)
    name_length, extra_length = int.from_bytes(raw[start + 26:start + 28], "little"), \
        int.from_bytes(raw[start + 28:start + 30], "little")
    raw[start + 30 + name_length + extra_length + entry.compress_size // 2] ^= 0xFF
    (tmp_path / "damaged.npz").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "damaged.npz")
    assert zipfile.is_zipfile(path)


def test_a_backend_with_a_device_generator_draws_the_noise_there():
    drawn = []

    def device_normal(generator, out):
        drawn.append(out.shape)
        out[...] = generator.standard_normal(out.shape)
        return out

    module = types.SimpleNamespace(xp=np, unavailable_reason=lambda: None,
                                   make_generator=lambda seed: np.random.default_rng(seed),
                                   standard_normal=device_normal,
                                   **{op: getattr(numpy_ref, op) for op in kernels.OPS})
    kernels.register("device-rng", module)
    try:
        x = np.random.default_rng(0).random((8, 12))
        config = gradcheck.small_config(dtype="float32", seed=3)
        on_device = VAEGAN(config, "device-rng")
        on_device.compute_gradients(on_device.backend.asarray(x))
        assert drawn == [(8, 3), (8, 3)]                  # eps and the prior samples
        host = VAEGAN(config.replace(device_noise=False), "device-rng")
        reference = VAEGAN(config, "numpy")
        got = host.compute_gradients(host.backend.asarray(x))
        want = reference.compute_gradients(reference.backend.asarray(x))
        assert len(drawn) == 2 and float(got["kl"]) == float(want["kl"])
    finally:
        kernels.unregister("device-rng")


def test_boolean_settings_have_on_and_off_flags():
    from fastvae import cli
    parser = cli.make_parser()
    assert cli.build_config(parser.parse_args(["train", "--no-device-noise"])).device_noise is False
    assert cli.build_config(parser.parse_args(["train"])).device_noise is True


def test_the_default_backend_switch_reaches_a_model_built_without_one():
    from fastvae import use_backend
    backend = "numba" if "numba" in kernels.available() else "counting-default"
    if backend != "numba":
        kernels.register(backend, numpy_ref)
    try:
        with use_backend(backend):
            model = VAEGAN(gradcheck.small_config(dtype="float32"))
        assert model.backend.name == model.config.backend == backend
        default = VAEGAN(gradcheck.small_config(dtype="float32")).backend.name
        assert default == (os.environ.get("FASTVAE_BACKEND") or default_backend_name())
    finally:
        kernels.unregister("counting-default")
