"""Equilibrium gating's masks: which updates run for given discriminator losses."""
import numpy as np
import pytest

from fastvae import Backend
from fastvae.gating import equilibrium_masks
from fastvae.gradcheck import small_config
from fastvae.model import VAEGAN
from fastvae.state import TrainState

EQUILIBRIUM, MARGIN = 0.68, 0.4   # the authors' values: skip D below 0.28, G above 1.08


@pytest.mark.parametrize("real, fake, train_d, train_g", [
    (0.68, 0.68, 1.0, 1.0),   # at equilibrium: both train
    (0.10, 0.70, 0.0, 1.0),   # D far ahead on real images: D waits
    (0.70, 0.20, 0.0, 1.0),   # ... or on generated ones
    (0.70, 1.50, 1.0, 0.0),   # D far behind on generated images: G waits
    (1.20, 0.50, 1.0, 0.0),   # ... or on real ones
    (0.10, 1.50, 1.0, 1.0),   # both would wait: both train instead
    (0.29, 1.07, 1.0, 1.0),   # just inside the bounds: both train
])
def test_masks_follow_the_equilibrium_rule(real, fake, train_d, train_g):
    masks = equilibrium_masks(np.asarray(real), np.asarray(fake), EQUILIBRIUM, MARGIN, np)
    for mask, want in zip(masks, (train_d, train_g)):
        assert isinstance(mask, np.ndarray) and mask.shape == () and mask.dtype == np.float64
        assert float(mask) == want


def _one_step_changes(**gating):
    """Which networks' parameters one gated training step changed, and the step counts."""
    state = TrainState(VAEGAN(small_config(gating=True, **gating), Backend("numpy", "float64")))
    before = {name: params.copy() for name, params in state.model.params.items()}
    state.step(np.random.default_rng(0).uniform(size=(8, state.model.config.image_size)))
    changed = {name: not np.array_equal(before[name], params)
               for name, params in state.model.params.items()}
    return changed, state.steps


@pytest.mark.parametrize("gating, skipped", [
    ({"equilibrium": 5.0, "margin": 0.1}, "discriminator"),  # BCE ~0.7 < 4.9: D far ahead
    ({"equilibrium": 0.05, "margin": 0.01}, "decoder"),      # BCE ~0.7 > 0.06: D far behind
    ({"equilibrium": 0.69, "margin": 5.0}, None),            # inside the margin: all update
])
def test_a_gated_step_leaves_the_skipped_network_and_its_count_untouched(gating, skipped):
    changed, counts = _one_step_changes(**gating)
    for name in ("encoder", "decoder", "discriminator"):
        assert changed[name] == (name != skipped), name
        assert counts[name] == (0 if name == skipped else 1), name


def test_gating_off_updates_every_network_whatever_the_losses():
    state = TrainState(VAEGAN(small_config(equilibrium=5.0, margin=0.1),
                              Backend("numpy", "float64")))
    state.step(np.random.default_rng(0).uniform(size=(8, state.model.config.image_size)))
    assert state.steps == {name: 1 for name in state.optimizers}
