"""Optimizers over one flat parameter buffer each, so a network updates in one kernel call."""


class StepCount:
    """The number of updates applied, on the host, or in a 0-d device array once
    `count_on_device()` (a recorded CUDA graph advances it on every replay, and a masked
    update may or may not advance it without the host knowing)."""

    def __init__(self):
        self._host_count = 0
        self.device_step = None

    def count_on_device(self):
        if self.device_step is None:
            self.device_step = self.backend.xp.asarray(float(self._host_count))

    @property
    def step_count(self):
        """The count as an int (reading a device count waits for the device)."""
        return int(self.device_step) if self.device_step is not None else self._host_count

    @step_count.setter
    def step_count(self, count):
        self._host_count = int(count)
        if self.device_step is not None:
            self.device_step[...] = count

    def _advance(self, apply):
        """Count one update (`apply` of one, with a mask) and return the new count."""
        if apply is not None:
            self.count_on_device()
        if self.device_step is None:
            self._host_count += 1
            return self._host_count
        self.device_step += 1.0 if apply is None else apply
        return self.device_step


class Adam(StepCount):
    """Adam (Kingma & Ba 2015) with bias correction; defaults as DCGAN and VAE-GAN use them."""

    def __init__(self, params, grads, *, lr=2e-4, betas=(0.5, 0.999), eps=1e-8, backend):
        self.params, self.grads, self.backend = params, grads, backend
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        StepCount.__init__(self)
        self.exp_avg = backend.zeros(params.shape)
        self.exp_avg_sq = backend.zeros(params.shape)

    def step(self, apply=None):
        """One update; `apply` (a 0-d 1.0/0.0 array) skips it where 0, step count included."""
        self.backend.ops.adam_update(
            self.params, self.grads, self.exp_avg, self.exp_avg_sq,
            self.lr, self.betas[0], self.betas[1], self.eps, self._advance(apply), apply,
        )

    def state(self):
        """Arrays and counters to checkpoint (arrays stay on the backend)."""
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state(self, state):
        self.step_count = int(state["step_count"])
        self.exp_avg[...] = self.backend.asarray(state["exp_avg"])
        self.exp_avg_sq[...] = self.backend.asarray(state["exp_avg_sq"])


class SGD(StepCount):
    """Stochastic gradient descent with heavy-ball momentum."""

    def __init__(self, params, grads, *, lr=1e-2, momentum=0.9, backend):
        self.params, self.grads, self.backend = params, grads, backend
        self.lr, self.momentum = lr, momentum
        StepCount.__init__(self)
        self.velocity = backend.zeros(params.shape)

    def step(self, apply=None):
        """One update; `apply` (a 0-d 1.0/0.0 array) skips it where 0, step count included."""
        self._advance(apply)
        self.backend.ops.sgd_update(self.params, self.grads, self.velocity, self.lr,
                                    self.momentum, apply)

    def state(self):
        return {"step_count": self.step_count, "velocity": self.velocity}

    def load_state(self, state):
        self.step_count = int(state["step_count"])
        self.velocity[...] = self.backend.asarray(state["velocity"])
