"""Losses of the VAE-GAN, each returning its value and its gradient.

Reduction, which sets the scale of gamma: sums over pixels, latent dimensions or features,
means over the batch. Gradients go into `grad_out` when given (no allocation), else a new array.
"""
from fastvae.backend import resolve


def _grad_buffer(backend, like, grad_out):
    return backend.empty(like.shape) if grad_out is None else grad_out


def bce(logits, target, *, weight=1.0, grad_out=None, backend=None):
    """Binary cross-entropy of sigmoid(logits) against target (array, or 1.0 / 0.0).

    Fuses the sigmoid into the loss (logits form), so nothing overflows or takes log(0).
    """
    backend = resolve(backend)
    grad_out = _grad_buffer(backend, logits, grad_out)
    loss = backend.ops.bce_with_logits(logits, target, weight / logits.shape[0], grad_out)
    return loss, grad_out


def adversarial(logits, real, *, weight=1.0, label=1.0, grad_out=None, backend=None):
    """BCE of the discriminator's logits against the label real (`label`: 1, or below for
    one-sided label smoothing) or fake (0).

    The generator's non-saturating loss is `adversarial(fake_logits, real=True)`.
    """
    return bce(logits, label if real else 0.0, weight=weight, grad_out=grad_out,
               backend=backend)


def squared_error(pred, target, *, weight=1.0, grad_out=None, backend=None):
    """0.5 x squared distance per sample (Larsen's learned-similarity loss; MSE up to scale)."""
    backend = resolve(backend)
    grad_out = _grad_buffer(backend, pred, grad_out)
    loss = backend.ops.squared_error(pred, target, weight / pred.shape[0], grad_out)
    return loss, grad_out


def reparameterize(mu, log_var, eps, *, weight=1.0, z_out=None, backend=None):
    """z = mu + sigma * eps, and weight x KL(N(mu, sigma^2) || N(0, I)) per sample."""
    backend = resolve(backend)
    z_out = _grad_buffer(backend, mu, z_out)
    kl = backend.ops.kl_reparam_forward(mu, log_var, eps, weight / mu.shape[0], z_out)
    return z_out, kl


def reparameterize_backward(grad_z, mu, log_var, eps, *, weight=1.0, grad_mu=None,
                            grad_log_var=None, backend=None):
    """Gradients of (loss through z) + weight x KL with respect to mu and log_var."""
    backend = resolve(backend)
    grad_mu = _grad_buffer(backend, mu, grad_mu)
    grad_log_var = _grad_buffer(backend, log_var, grad_log_var)
    backend.ops.kl_reparam_backward(
        grad_z, mu, log_var, eps, weight / mu.shape[0], grad_mu, grad_log_var
    )
    return grad_mu, grad_log_var
