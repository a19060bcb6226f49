"""The learning-rate schedule: the fraction of each network's `lr_*` that an epoch trains at.

Training policy, applied by the trainer at the start of every epoch (`TrainState.scale_lr`):
a function of the epoch alone, so a run resumed mid-epoch continues at the same rate.
"""
import math

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule, final, epoch, epochs):
    """The fraction of `lr_*` for 0-based `epoch` of `epochs`: 1 for "constant"; "cosine" and
    "linear" fall from 1 at the first epoch to `final` at the last."""
    if schedule == "constant" or epochs < 2:
        return 1.0
    progress = min(epoch, epochs - 1) / (epochs - 1)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - final) * progress
