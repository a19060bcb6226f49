"""Larsen's equilibrium gating: which of the discriminator's and the decoder's updates run.

The authors' code (and pythae) train the discriminator only while it is not far ahead and the
decoder only while the discriminator is not far behind, judged by the discriminator's mean
BCE on real and on generated images against an equilibrium (0.68, about -log 0.5) and a
margin; when both would stop, both train. The masks are computed from the step's 0-d loss
arrays with array operations, never a host branch, so a recorded CUDA graph decides afresh
on every replay.
"""


def equilibrium_masks(disc_real, disc_fake, equilibrium, margin, xp):
    """(train_discriminator, train_decoder) as 0-d float64 arrays holding 1.0 or 0.0.

    The discriminator skips its update while its real or fake BCE is below
    equilibrium - margin; the decoder skips while either is above equilibrium + margin;
    never both: where both would skip, both update.
    """
    lowest, highest = xp.minimum(disc_real, disc_fake), xp.maximum(disc_real, disc_fake)
    train_discriminator = xp.asarray(lowest >= equilibrium - margin)
    train_decoder = xp.asarray(highest <= equilibrium + margin)
    neither = xp.logical_not(xp.logical_or(train_discriminator, train_decoder))
    return (xp.asarray(xp.logical_or(train_discriminator, neither), dtype=xp.float64),
            xp.asarray(xp.logical_or(train_decoder, neither), dtype=xp.float64))
