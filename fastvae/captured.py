"""The training step recorded once as a CUDA graph and replayed (cupy backend).

With networks this small, an eager GPU step is some two hundred kernel launches issued from
Python, and the GPU mostly waits for them. Replaying a recorded graph issues the whole step
(forward, the three gradients, the noise draws and the three optimizer updates) as one launch.
A replay reads the batch from a fixed input buffer and writes the losses into the same 0-d
arrays every time; the optimizers count their steps on the device.
"""
import numpy as np


class CapturedStep:
    """`model.train_step` for batches of `batch_size` rows, replayed as a CUDA graph."""

    def __init__(self, model, batch_size):
        capture = getattr(model.backend.ops, "capture_graph", None)
        if capture is None:
            raise ValueError(f"CUDA graphs need the cupy backend; this model runs on "
                             f"{model.backend.name!r} (leave the graph off there)")
        if model.backend.device_rng is None:
            raise ValueError("a CUDA graph replays its noise draws, so the noise must be drawn "
                             "on the device: turn device_noise back on, or the graph off")
        self.model = model
        self.x = model.backend.zeros((batch_size, model.config.image_size))
        for optimizer in model.optimizers.values():
            optimizer.count_on_device()
        self._warm_up()
        self.graph = capture(lambda: model.train_step(self.x))  # runs nothing: counts stay

    def _warm_up(self):
        """One eager step with fixed noise, then undone: it compiles every kernel and makes
        every buffer the graph uses, and leaves weights, optimizer state and noise stream as
        they were."""
        model = self.model
        saved = {name: (model.params[name].copy(),
                        {key: value.copy() if hasattr(value, "copy") else value
                         for key, value in optimizer.state().items()})
                 for name, optimizer in model.optimizers.items()}
        zeros = np.zeros((len(self.x), model.config.latent_dim))
        model.apply_gradients(model.compute_gradients(self.x, eps=zeros, prior_z=zeros))
        for name, (params, state) in saved.items():
            model.params[name][...] = params
            model.optimizers[name].load_state(state)

    def train_step(self, x):
        """One replayed step on batch `x`; returns the losses as 0-d device arrays.

        The arrays are the graph's own: the next call overwrites them, so read or add them
        up before then (work queued on the same stream is ordered before the next replay).
        """
        if x.shape != self.x.shape:
            raise ValueError(f"this captured step takes batches of shape {self.x.shape}, "
                             f"got {x.shape}")
        if x is not self.x:
            self.x[...] = x
        self.graph.launch()   # advances the optimizers' device counts (by their masks)
        return self.graph.result
