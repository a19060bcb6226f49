"""The learning-rate schedule: its factors, and the trainer training each epoch at them."""
import numpy as np
import pytest
from run_helpers import SMALL

from fastvae.config import Config
from fastvae.optim import Adam
from fastvae.schedule import lr_factor
from fastvae.trainer import Trainer


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_decaying_schedule_falls_from_one_to_the_final_fraction(schedule):
    factors = [lr_factor(schedule, 0.1, epoch, 5) for epoch in range(5)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert factors[2] == pytest.approx(0.55)   # halfway, cosine and linear agree
    if schedule == "cosine":   # slow at both ends: 0.5 (1 + cos(pi/4)) of the way
        assert factors[1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)))
    else:
        assert factors[1] == pytest.approx(1 - 0.9 / 4)


def test_constant_and_one_epoch_runs_keep_the_full_rate():
    assert [lr_factor("constant", 0.1, epoch, 4) for epoch in range(4)] == [1.0] * 4
    assert lr_factor("cosine", 0.1, 0, 1) == lr_factor("linear", 0.1, 0, 1) == 1.0


def test_the_trainer_trains_each_epoch_at_the_scheduled_rate(tmp_path, mnist_dir, monkeypatch):
    """Every update of every network gets its lr_* times the epoch's factor (the rates
    the update kernel is given, read at each call)."""
    rates = []
    original = Adam.update

    def recording(optimizer, step, apply=None):
        rates.append((optimizer, optimizer.lr))
        return original(optimizer, step, apply)

    monkeypatch.setattr(Adam, "update", recording)
    config = Config(**SMALL, epochs=3, lr_schedule="linear", lr_final=0.2,
                    lr_encoder=4e-4, lr_decoder=3e-4, lr_discriminator=1e-4)
    trainer = Trainer(config, tmp_path, mnist_dir, progress=False)
    trainer.fit()
    names = {id(optimizer): name for name, optimizer in trainer.state.optimizers.items()}
    per_epoch = len(rates) // 3
    assert per_epoch == 3 * 10   # three networks, 320 images in batches of 32
    for epoch, factor in enumerate([1.0, 0.6, 0.2]):
        for optimizer, rate in rates[epoch * per_epoch:(epoch + 1) * per_epoch]:
            base = getattr(config, "lr_" + names[id(optimizer)])
            assert rate == pytest.approx(base * factor, rel=1e-12)
