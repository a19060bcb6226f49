"""Optimizers over one flat parameter buffer each, so a network updates in one kernel call.

An optimizer holds its hyper-parameters and moment buffers; the step count is its caller's
(`fastvae.state.TrainState` keeps one per network, on the device when a CUDA graph replays
the update), passed to `update` as a number or a 0-d device array.

`params16` (a bf16 backend's flat weight copy, `layers.pack_bf16_weights`) is rewritten by the
same update kernel, so the products' weights are refreshed once per step at no extra pass.
"""


def _bf16_copy(params16):
    """The update kernels' keyword for the bf16 weight copy (none on an fp32 backend)."""
    return {} if params16 is None else {"param16": params16}


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction; defaults as DCGAN and VAE-GAN use them."""

    def __init__(self, params, grads, *, lr=2e-4, betas=(0.5, 0.999), eps=1e-8, backend,
                 params16=None):
        self.params, self.grads, self.backend = params, grads, backend
        self.params16 = params16
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.exp_avg = backend.zeros(params.shape)
        self.exp_avg_sq = backend.zeros(params.shape)

    def update(self, step, apply=None):
        """Apply the gradients as update number `step` (1 for the first; sets bias correction);
        `apply`, a 0-d 1.0/0.0 array, skips the update where 0 (moments unchanged too)."""
        self.backend.ops.adam_update(
            self.params, self.grads, self.exp_avg, self.exp_avg_sq,
            self.lr, self.betas[0], self.betas[1], self.eps, step, apply,
            **_bf16_copy(self.params16),
        )

    def state(self):
        """The arrays to checkpoint (they stay on the backend)."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state(self, arrays):
        self.exp_avg[...] = self.backend.asarray(arrays["exp_avg"])
        self.exp_avg_sq[...] = self.backend.asarray(arrays["exp_avg_sq"])


class SGD:
    """Stochastic gradient descent with heavy-ball momentum."""

    def __init__(self, params, grads, *, lr=1e-2, momentum=0.9, backend, params16=None):
        self.params, self.grads, self.backend = params, grads, backend
        self.params16 = params16
        self.lr, self.momentum = lr, momentum
        self.velocity = backend.zeros(params.shape)

    def update(self, step, apply=None):
        """Apply the gradients (the update does not depend on the step number); `apply` 0 (a
        0-d array) skips it."""
        self.backend.ops.sgd_update(self.params, self.grads, self.velocity, self.lr,
                                    self.momentum, apply, **_bf16_copy(self.params16))

    def state(self):
        return {"velocity": self.velocity}

    def load_state(self, arrays):
        self.velocity[...] = self.backend.asarray(arrays["velocity"])


def make_optimizer(config, network, params, grads, backend, params16=None):
    """The optimizer of `network` ("encoder", ...) as `config` sets it (lr_*, betas_*);
    `params16`: the network's bf16 weight copy on a bf16 backend, refreshed by each update."""
    lr = getattr(config, "lr_" + network)
    betas = getattr(config, "betas_" + network)
    if config.optimizer == "sgd":
        return SGD(params, grads, lr=lr, momentum=betas[0], backend=backend, params16=params16)
    return Adam(params, grads, lr=lr, betas=betas, backend=backend, params16=params16)


def clip_norm(grads, max_norm, xp):
    """Scale `grads` down to L2 norm `max_norm` if larger (on the device, no sync)."""
    grads *= xp.minimum(1.0, max_norm / (xp.linalg.norm(grads) + 1e-12)).astype(grads.dtype)
