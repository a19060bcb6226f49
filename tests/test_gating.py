"""Equilibrium gating's masks: which updates run for given discriminator losses."""
import numpy as np
import pytest

from fastvae.gating import equilibrium_masks

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
