"""The training state: everything that changes while a model trains, and the training step.

`TrainState(model)` owns the model's optimizers and their step counts, the step itself
(gradients, clipping, updates), the non-finite check, the noise generator's state in
checkpoints, and the CUDA-graph replay of the step. The model (`fastvae.model.VAEGAN`, or
anything with `backend`, `params`, `grads` and `compute_gradients`) only computes.

Checkpoints are archives (`fastvae.archive`) whose header holds the format version, the
config, the step counts, the noise generator's state and caller extras (epoch, data order,
history).
"""
import numpy as np

from fastvae import archive
from fastvae.config import Config
from fastvae.errors import CheckpointError, ConfigError
from fastvae.gating import equilibrium_masks
from fastvae.model import VAEGAN
from fastvae.optim import clip_norm, make_optimizer
from fastvae.prior import from_arrays

FORMAT = "fastvae-checkpoint"
VERSION = 1
HEADER_KEYS = ("config", "step_counts", "noise_rng", "extra", "sha256")


class TrainState:
    """A model with its optimizers, step counts and (on the cupy backend) a recorded step.

    `optimizers` maps each name of `model.params` to its optimizer (default: as the model's
    config sets them); `clip_grad_norm` > 0 clips each network's gradient to that L2 norm
    before its update (default: the config's); `gating`, (equilibrium, margin), turns on
    Larsen's equilibrium gating of the discriminator's and decoder's updates (default: the
    config's `gating`, `equilibrium`, `margin`).
    """

    def __init__(self, model, optimizers=None, clip_grad_norm=None, gating=None):
        self.model, self.backend = model, model.backend
        config = getattr(model, "config", None)
        if optimizers is None:
            params16 = getattr(model, "params16", {})  # bf16 weight copies, updated in step
            optimizers = {name: make_optimizer(config, name, model.params[name],
                                               model.grads[name], model.backend,
                                               params16.get(name))
                          for name in model.params}
        self.optimizers = optimizers
        self.base_lr = {name: optimizer.lr for name, optimizer in optimizers.items()}
        self.clip_grad_norm = (config.clip_grad_norm if clip_grad_norm is None
                               else clip_grad_norm)
        if gating is None and getattr(config, "gating", False):
            gating = (config.equilibrium, config.margin)
        self.gating = gating if "discriminator" in optimizers else None  # (equilibrium, margin)
        self._host_steps = {name: 0 for name in optimizers}   # updates applied, per network
        self._device_steps = None  # the counts as 0-d device arrays, advanced there: with a
        self._graph = None         # graph (a replay reads no host number) or with gating (a
        if self.gating:            # masked update advances its count only on the device)
            self._count_on_device()

    @property
    def steps(self):
        """Updates applied, per network (reading device counts waits for the device)."""
        if self._device_steps is None:
            return dict(self._host_steps)
        return {name: int(count) for name, count in self._device_steps.items()}

    @steps.setter
    def steps(self, counts):
        self._host_steps = {name: int(counts[name]) for name in self.optimizers}
        if self._device_steps is not None:
            for name, counter in self._device_steps.items():
                counter[...] = self._host_steps[name]

    def _count_on_device(self):
        self._device_steps = {name: self.backend.xp.asarray(float(count))
                              for name, count in self.steps.items()}

    # ----- the step -----

    def step(self, *batch):
        """One update of every network on `batch` (the arguments of compute_gradients);
        returns the losses as 0-d backend arrays.

        With a recorded graph (`capture_graph`) the step is replayed: its losses are the
        graph's own arrays, overwritten by the next step, so read or add them up before.
        """
        if self._graph is not None:
            return self._graph.replay(*batch)
        losses = self.model.compute_gradients(*batch)
        self._apply_updates(losses)
        return losses

    def update_masks(self, losses):
        """Per network, None (update) or equilibrium gating's 0-d mask, computed on the device
        from the step's discriminator losses (see fastvae.gating)."""
        masks = dict.fromkeys(self.optimizers)
        if self.gating and losses is not None:
            masks["discriminator"], masks["decoder"] = equilibrium_masks(
                losses["disc_real"], losses["disc_fake"], *self.gating, self.backend.xp)
        return masks

    def _apply_updates(self, losses=None):
        """Clip and update each network: the one place that decides which updates run (gating
        needs the step's `losses`; without them every network updates)."""
        xp = self.backend.xp
        for name, mask in self.update_masks(losses).items():
            optimizer = self.optimizers[name]
            if self.clip_grad_norm > 0:
                clip_norm(optimizer.grads, self.clip_grad_norm, xp)
            optimizer.update(self._advance(name, mask), mask)

    def _advance(self, name, mask=None):
        """The number of `name`'s next update (advanced by `mask` where one is given): counted
        on the host, or on the device with a graph or gating."""
        if self._device_steps is not None:
            counter = self._device_steps[name]
            counter += 1.0 if mask is None else mask
            return counter
        self._host_steps[name] += 1
        return self._host_steps[name]

    def scale_lr(self, factor):
        """Train each network at `factor` x its optimizer's starting learning rate (the
        learning-rate schedule's step; see fastvae.schedule). A recorded graph holds the rates
        it was recorded with, so a changed rate records it again."""
        rates = {name: base * factor for name, base in self.base_lr.items()}
        if all(self.optimizers[name].lr == rate for name, rate in rates.items()):
            return
        for name, rate in rates.items():
            self.optimizers[name].lr = rate
        if self._graph is not None:
            self.capture_graph(len(self._graph.x))

    def non_finite_networks(self):
        """Names of the networks with a NaN or infinite parameter (one host read each)."""
        xp = self.backend.xp
        return [name for name, params in self.model.params.items()
                if not bool(xp.isfinite(params).all())]

    # ----- CUDA graph -----

    def capture_graph(self, batch_size):
        """Record the step for batches of `batch_size` rows as a CUDA graph; `step` then
        replays it (one launch for the whole step). Needs the cupy backend with device noise."""
        self._graph = None
        self._graph = CapturedStep(self, batch_size)
        return self

    @property
    def graph(self):
        """The recorded step, or None when steps launch eagerly."""
        return self._graph

    # ----- checkpoints -----

    def arrays(self):
        """Every array of the training state, as NumPy, keyed by name."""
        to_numpy = self.backend.to_numpy
        arrays = {f"params/{name}": to_numpy(p) for name, p in self.model.params.items()}
        prior = getattr(self.model, "prior", None)
        arrays.update({f"prior/{key}": value for key, value in
                       (prior.arrays() if prior is not None else {}).items()})
        for name, optimizer in self.optimizers.items():
            for key, value in optimizer.state().items():
                arrays[f"optimizer/{name}/{key}"] = to_numpy(value)
        return arrays

    def save(self, path, extra=None):
        """Write a checkpoint atomically: config, parameters, optimizer state and step counts,
        the noise generator's state, and `extra` (anything JSON can hold)."""
        arrays = self.arrays()
        header = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.model.config.to_dict(),
            "step_counts": self.steps,
            "noise_rng": self.backend.rng.bit_generator.state,
            "extra": extra or {},
            "sha256": archive.digest(arrays),
        }
        archive.write(path, header, arrays)

    def restore(self, header, arrays, path="checkpoint"):
        """Copy a checkpoint's state (from `read_checkpoint`) into this one; returns its extra.

        The model must have the checkpoint's architecture."""
        for key, value in self.arrays().items():
            if key.startswith("prior/"):   # a fitted prior is optional (see below)
                continue
            if key not in arrays or arrays[key].shape != value.shape:
                found = arrays[key].shape if key in arrays else "nothing"
                raise CheckpointError(f"{path} does not fit this model: {key} should have "
                                      f"shape {value.shape}, found {found}")
        bad = [name for name in self.model.params
               if not np.isfinite(arrays[f"params/{name}"]).all()]
        if bad:
            raise CheckpointError(f"{path} holds non-finite parameters in the "
                                  f"{' and '.join(bad)} (saved from a run that diverged): use "
                                  f"an earlier checkpoint, or train again with a lower learning "
                                  f"rate")
        for name, params in self.model.params.items():
            params[...] = self.backend.asarray(arrays[f"params/{name}"])
        refresh = getattr(self.model, "refresh_bf16_weights", None)
        if refresh is not None:
            refresh()
        for name, optimizer in self.optimizers.items():
            prefix = f"optimizer/{name}/"
            optimizer.load_state({key[len(prefix):]: value for key, value in arrays.items()
                                  if key.startswith(prefix)})
        if hasattr(self.model, "prior"):
            try:
                self.model.prior = from_arrays(self.model.config.latent_dim,
                                               {key[len("prior/"):]: value for key, value in
                                                arrays.items() if key.startswith("prior/")})
            except (KeyError, ValueError, np.linalg.LinAlgError) as error:
                raise CheckpointError(f"{path} holds an invalid prior ({error}): use another "
                                      f"checkpoint") from error
        self.steps = header["step_counts"]   # the device counts too, where there are any
        self.backend.rng.bit_generator.state = header["noise_rng"]
        return header["extra"]

    @classmethod
    def load(cls, path, backend=None, precision=None):
        """(state, extra): a VAEGAN rebuilt from the checkpoint's config, on `backend` (a name
        or Backend; default: the one it was saved from) and at `precision` (default: the saved
        one), with its training state."""
        header, arrays = read_checkpoint(path)
        config = checkpoint_config(header, path)
        if precision:
            config = config.replace(precision=precision)
        state = cls(VAEGAN(config, backend))
        return state, state.restore(header, arrays, path)


def read_checkpoint(path):
    """(header, arrays) of a checkpoint file, verified; CheckpointError if it is not a good one."""
    header, arrays = archive.read(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastvae checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {header.get('version')}; "
                              f"this fastvae reads version {VERSION}")
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing or not isinstance(header["config"], dict):
        raise CheckpointError(f"{path} is damaged: its header lacks "
                              f"{', '.join(missing) or 'a valid config'}; use another checkpoint")
    if archive.digest(arrays) != header.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its arrays do not match their checksum")
    return header, arrays


def checkpoint_config(header, path="checkpoint"):
    """The Config a checkpoint's header holds; CheckpointError if it is not a valid one."""
    try:
        return Config.from_dict(header["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an invalid config: {error}") from error


def load_model(path, backend=None, precision=None):
    """The trained VAEGAN of a checkpoint, for inference (see TrainState.load)."""
    return TrainState.load(path, backend, precision)[0].model


class CapturedStep:
    """A TrainState's step for batches of `batch_size` rows, recorded once as a CUDA graph.

    With networks this small, an eager GPU step is some two hundred kernel launches issued
    from Python, and the GPU mostly waits for them. A replay issues the whole step (forward,
    the three gradients, the noise draws, the three updates) as one launch: it reads the batch
    from a fixed input buffer and writes the losses into the same 0-d arrays every time, and
    the step counts advance on the device.
    """

    def __init__(self, state, batch_size):
        backend, model = state.backend, state.model
        capture = getattr(backend.ops, "capture_graph", None)
        if capture is None:
            raise ConfigError(f"CUDA graphs need the cupy backend; this model runs on "
                              f"{backend.name!r} (leave the graph off there)", "cuda_graph")
        if backend.device_rng is None:
            raise ConfigError("a CUDA graph replays its noise draws, so the noise must be "
                              "drawn on the device: turn device_noise back on, or the graph "
                              "off", "cuda_graph")
        self.state = state
        self.x = backend.zeros((batch_size, model.config.image_size))
        self._warm_up()
        counted_on_host = state._device_steps is None
        if counted_on_host:
            state._count_on_device()
        try:
            self.graph = capture(self._record)
        except BaseException:
            if counted_on_host:
                state._host_steps, state._device_steps = state.steps, None
            raise

    def _record(self):
        """The step as the graph records it: every count advanced on the device."""
        losses = self.state.model.compute_gradients(self.x)
        self.state._apply_updates(losses)
        return losses

    def _warm_up(self):
        """One eager step with fixed noise, then undone: it compiles every kernel and makes
        every buffer the graph uses, and leaves weights, optimizer state, step counts and
        noise stream as they were."""
        state, model = self.state, self.state.model
        saved = {name: (model.params[name].copy(),
                        {key: value.copy() for key, value in optimizer.state().items()})
                 for name, optimizer in state.optimizers.items()}
        counts = state.steps
        zeros = np.zeros((len(self.x), model.config.latent_dim))
        state._apply_updates(model.compute_gradients(self.x, eps=zeros, prior_z=zeros))
        for name, (params, arrays) in saved.items():
            model.params[name][...] = params
            state.optimizers[name].load_state(arrays)
        state.steps = counts

    def replay(self, x):
        """One replayed step on batch `x`; returns the graph's loss arrays."""
        if x.shape != self.x.shape:
            raise ValueError(f"this captured step takes batches of shape {self.x.shape}, "
                             f"got {x.shape}")
        if x is not self.x:
            self.x[...] = x
        self.graph.launch()   # advances the device counts (by the gating masks)
        return self.graph.result
