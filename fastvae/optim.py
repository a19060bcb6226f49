"""Optimizers over one flat parameter buffer each, so a network updates in one kernel call.

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
        self.step_count = 0
        self.device_step = None  # the count as a device scalar too, once count_on_device()
        self.exp_avg = backend.zeros(params.shape)
        self.exp_avg_sq = backend.zeros(params.shape)

    def count_on_device(self):
        """Keep the step count in a device scalar as well, advanced by a device kernel, so
        that a step captured as a CUDA graph applies the right bias correction each replay."""
        self.device_step = self.backend.xp.asarray(float(self.step_count))

    def step(self):
        self.step_count += 1
        step = self.step_count
        if self.device_step is not None:
            self.device_step += 1
            step = self.device_step
        self.backend.ops.adam_update(
            self.params, self.grads, self.exp_avg, self.exp_avg_sq,
            self.lr, self.betas[0], self.betas[1], self.eps, step, **_bf16_copy(self.params16),
        )

    def state(self):
        """Arrays and counters to checkpoint (arrays stay on the backend)."""
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state(self, state):
        self.step_count = int(state["step_count"])
        if self.device_step is not None:
            self.device_step[...] = self.step_count
        self.exp_avg[...] = self.backend.asarray(state["exp_avg"])
        self.exp_avg_sq[...] = self.backend.asarray(state["exp_avg_sq"])


class SGD:
    """Stochastic gradient descent with heavy-ball momentum."""

    def __init__(self, params, grads, *, lr=1e-2, momentum=0.9, backend, params16=None):
        self.params, self.grads, self.backend = params, grads, backend
        self.params16 = params16
        self.lr, self.momentum = lr, momentum
        self.step_count = 0
        self.velocity = backend.zeros(params.shape)

    def count_on_device(self):
        """Nothing to do: SGD's update does not depend on the step count."""

    def step(self):
        self.step_count += 1
        self.backend.ops.sgd_update(self.params, self.grads, self.velocity, self.lr,
                                    self.momentum, **_bf16_copy(self.params16))

    def state(self):
        return {"step_count": self.step_count, "velocity": self.velocity}

    def load_state(self, state):
        self.step_count = int(state["step_count"])
        self.velocity[...] = self.backend.asarray(state["velocity"])
