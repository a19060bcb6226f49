import numpy as np
import pytest

from fastvae import Backend
from fastvae import gradcheck
from fastvae.layers import Linear, NeuralNetwork, ReLU, Sigmoid, Tanh, pack_parameters


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


def test_linear_and_activation_fuse_but_final_sigmoid_stays_separate():
    backend = Backend("numpy", "float64")
    rng = np.random.default_rng(0)
    network = NeuralNetwork([Linear(4, 3, rng=rng, backend=backend), ReLU(backend),
                             Linear(3, 2, rng=rng, backend=backend), Tanh(backend),
                             Linear(2, 1, rng=rng, backend=backend), Sigmoid(backend)], backend)
    stages = network.stages()
    assert [type(s).__name__ for s in stages] == ["Linear", "Linear", "Linear", "Sigmoid"]
    assert [s.activation for s in stages[:3]] == ["relu", "tanh", "identity"]
    x = rng.standard_normal((5, 4))
    probabilities = network.forward(x).copy()
    logits = network.forward(x, logits=True)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-12)


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
    before = [np.array(l.weight) for l in layers]
    params, grads = pack_parameters(layers, backend)
    assert params.size == 3 * 2 + 2 + 2 * 4 + 4
    np.testing.assert_array_equal(layers[1].weight, before[1])
    params[:] = 0.5
    assert float(layers[0].weight[0, 0]) == 0.5 and float(layers[1].bias[-1]) == 0.5
    layers[0].forward(np.ones((1, 3)))
    layers[0].backward(np.ones((1, 2)))
    assert grads[:6].sum() == 6
