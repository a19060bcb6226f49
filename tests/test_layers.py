import numpy as np
import pytest

from fastvae import Backend, gradcheck
from fastvae.layers import Activation, Linear, NeuralNetwork, ReLU, Sigmoid, Tanh, pack_parameters


@pytest.fixture(scope="module")
def layer_report():
    return gradcheck.layer_checks(seed=3)


def test_every_layer_backward_matches_finite_differences(layer_report):
    names = {check.name.split(":")[0] for check in layer_report}
    assert {"Linear", "ReLU", "LeakyReLU", "Sigmoid", "Tanh"} <= names
    failures = [(c.name, c.error) for c in layer_report if not c.error < 1e-6]
    assert not failures


def test_gradcheck_detects_a_wrong_backward(monkeypatch):
    from fastvae.kernels import numpy_ref
    original = numpy_ref.activation_backward

    def off_by_a_bit(activation, y, grad_out, out):
        original(activation, y, grad_out, out)
        out *= 1.01
        return out

    monkeypatch.setattr(numpy_ref, "activation_backward", off_by_a_bit)
    backend = Backend("numpy", "float64")
    checks = gradcheck.check_layer("ReLU", ReLU(backend), np.random.default_rng(0).standard_normal((4, 5)),
                                   np.random.default_rng(1))
    assert not all(check.ok for check in checks)


def test_activations_fuse_at_construction_and_the_final_sigmoid_stays_separate():
    backend = Backend("numpy", "float64")
    rng = np.random.default_rng(0)
    first = Linear(4, 3, activation="relu", rng=rng, backend=backend)
    network = NeuralNetwork([first, Linear(3, 1, rng=rng, backend=backend), Sigmoid(backend)],
                            backend)
    x = rng.standard_normal((5, 4))
    probabilities = network.forward(x).copy()
    logits = network.forward(x, logits=True)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-12)
    hidden = np.maximum(x @ first.weight + first.bias, 0)
    np.testing.assert_allclose(logits, hidden @ network.layers[1].weight, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown activation"):
        Linear(2, 2, activation="swish")


def test_a_layer_added_after_a_forward_leaves_the_others_as_they_were():
    """A network is run as built: adding a layer after a forward applies no activation twice
    (this once computed tanh(tanh(x)))."""
    backend = Backend("numpy", "float64")
    rng = np.random.default_rng(1)
    first = Linear(4, 3, rng=rng, backend=backend)
    network = NeuralNetwork([first, Tanh(backend)], backend)
    x = rng.standard_normal((5, 4))
    network.forward(x)
    second = Linear(3, 2, rng=rng, backend=backend)
    network.add(second)
    want = np.tanh(x @ first.weight + first.bias) @ second.weight + second.bias
    np.testing.assert_allclose(network.forward(x), want, rtol=1e-12)
    assert first.activation == "identity"


def test_taps_are_found_by_name_whatever_comes_before_them():
    """A tap is a named layer's output: a layer put in front (here an identity activation, as
    a Dropout would be) does not move it, and backward can start from it by name."""
    backend = Backend("numpy", "float64")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4))
    features = Linear(4, 3, activation="relu", rng=rng, backend=backend)
    head = Linear(3, 1, rng=rng, backend=backend)
    plain = NeuralNetwork(backend=backend).add(features, "features").add(head)
    padded = NeuralNetwork([Activation(backend)], backend).add(features, "features").add(head)
    _, kept = plain.forward(x, keep=("features",))
    want = np.maximum(x @ features.weight + features.bias, 0)
    np.testing.assert_allclose(kept["features"], want, rtol=1e-12)
    _, kept = padded.forward(x, keep=("features",))
    np.testing.assert_allclose(kept["features"], want, rtol=1e-12)
    grad = padded.backward(np.ones((6, 3)), start="features")
    np.testing.assert_allclose(grad, ((want > 0) * 1.0) @ features.weight.T, rtol=1e-12)
    with pytest.raises(KeyError, match="features"):
        plain.forward(x, keep=("feature",))


def test_inference_buffers_stay_bounded_over_many_batch_sizes():
    """Decoding 20 batch sizes keeps a bounded set of buffers (it once kept one per size)."""
    from fastvae.model import VAEGAN
    model = VAEGAN(gradcheck.small_config(dtype="float32"))

    def held():
        return sum(len(layer._buffers) for layer in model.decoder.layers)

    model.decode(np.zeros((3, model.config.latent_dim)))
    few = held()
    for rows in range(1, 21):
        model.decode(np.zeros((rows, model.config.latent_dim)))
    assert held() <= 4 * few


def test_first_layer_input_gradient_is_skipped_when_not_wanted():
    backend = Backend("numpy", "float64")
    layer = Linear(4, 3, rng=np.random.default_rng(0), backend=backend)
    layer.forward(np.ones((2, 4)))
    assert layer.backward(np.ones((2, 3)), input_grad=False) is None
    np.testing.assert_allclose(layer.grad_bias, [2.0, 2.0, 2.0])


def test_same_rng_seed_gives_the_same_initialisation_and_init_options_differ():
    he = Linear(100, 50, rng=np.random.default_rng(7), init="he")
    again = Linear(100, 50, rng=np.random.default_rng(7), init="he")
    glorot = Linear(100, 50, rng=np.random.default_rng(7), init="glorot")
    np.testing.assert_array_equal(he.weight, again.weight)
    assert abs(float(he.weight.std()) - np.sqrt(2 / 100)) < 0.01
    assert float(np.abs(glorot.weight).max()) <= np.sqrt(6 / 150)
    with pytest.raises(ValueError, match="unknown init"):
        Linear(3, 3, init="xavier-ish")


def test_packed_parameters_are_views_of_one_buffer():
    backend = Backend("numpy", "float64")
    layers = [Linear(3, 2, backend=backend), Linear(2, 4, backend=backend)]
    before = [np.array(layer.weight) for layer in layers]
    params, grads = pack_parameters(layers, backend)
    assert params.size == 3 * 2 + 2 + 2 * 4 + 4
    np.testing.assert_array_equal(layers[1].weight, before[1])
    params[:] = 0.5
    assert float(layers[0].weight[0, 0]) == 0.5 and float(layers[1].bias[-1]) == 0.5
    layers[0].forward(np.ones((1, 3)))
    layers[0].backward(np.ones((1, 2)))
    assert grads[:6].sum() == 6
