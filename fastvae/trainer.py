"""The training loop: data in, a trained model, metrics, pictures and checkpoints out.

Everything the `fastvae train` command does is here, callable from Python:
`Trainer(config, run_dir).fit()`.
"""
import contextlib
import csv
import itertools
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fastvae import data, metrics, prior, rundir, schedule, viz
from fastvae.errors import ConfigError, FastvaeError, TrainingError
from fastvae.files import write_atomic
from fastvae.model import VAEGAN
from fastvae.prior import StandardNormal
from fastvae.state import TrainState, checkpoint_config, read_checkpoint

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.csv"
PICTURES = ("real.png", "reconstructions.png", "samples.png", "discriminator_losses.png",
            "losses.png", "interpolation.png")
LOSS_KEYS = ("discriminator", "disc_real", "disc_fake", "kl", "reconstruction", "adversarial",
             "encoder", "decoder")
METRIC_FIELDS = ("epoch", "steps") + LOSS_KEYS + ("test_bce", "test_mse", "seconds",
                                                  "samples_per_s")
SHOWN = 64
MEMORY_ADVICE = "lower `latent_dim` or the layer widths"
# settings a resumed run may change; changes of the last four are kept in the run's history
RESUMABLE = ("epochs", "backend", "cuda_graph", "lr_encoder", "lr_decoder", "lr_discriminator",
             "clip_grad_norm")
RECORDED = RESUMABLE[3:]
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


class Interrupted(FastvaeError):
    """Training stopped on request (Ctrl-C, SIGTERM, SIGHUP) after saving a checkpoint it can
    resume from; `signum` is the signal that asked (SIGINT when stopped by `request_stop`)."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def interpolation_rows(model, images, steps=10):
    """Decoded straight lines in latent space between consecutive pairs of `images`."""
    mu, _ = model.encode(images)
    weights = np.linspace(0.0, 1.0, steps)[:, None]
    return [model.decode((1 - weights) * mu[i] + weights * mu[i + 1])
            for i in range(0, len(mu) - 1, 2)]


class Trainer:
    """Trains a VAEGAN on an MNIST-style dataset, writing everything into `run_dir`."""

    def __init__(self, config, run_dir, data_dir=None, download=True, progress=True,
                 log_every=50):
        if not str(run_dir).strip():
            raise TrainingError("the run directory is empty: name one with `run_dir`")
        self.config, self.run_dir = config, Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise TrainingError(f"run directory {self.run_dir} is a file: choose another `run_dir`")
        self.data_dir, self.download = data_dir, download
        self.progress, self.log_every = progress, log_every
        self.model = None
        self.state = None        # the model's TrainState: optimizers, step counts, the step
        self.epoch = 0
        self.history = []        # running means every log_every steps: {"epoch": x, loss: value}
        self.metrics = []        # one row per epoch
        self.partial = None      # where an interrupted epoch stopped
        self.stop_requested = False
        self.stop_signal = signal.SIGINT
        self.setting_changes = []  # {"epoch", "step", "setting", "from", "to"}: resumes changing one
        # the seed's third child stream: the model draws its weights and noise from the first two
        self.order_rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(3)[2])

    # ----- setup -----

    def load_data(self):
        """Training and test images as [0, 1] floats, moved to the backend once."""
        limit = self.config.train_limit or None
        train, _ = data.load_split(self.config.dataset, "train", self.data_dir, self.download,
                                   limit)
        test, _ = data.load_split(self.config.dataset, "test", self.data_dir, self.download,
                                  self.config.test_limit or None)
        if len(train) < self.config.batch_size:
            raise TrainingError(f"batch_size {self.config.batch_size} is larger than the "
                                f"{len(train)} training images: lower `batch_size`")
        fitted_on = min(len(train), self.config.prior_images)
        if self.config.prior == "mixture" and fitted_on < self.config.prior_components:
            raise TrainingError(f"the mixture prior's {self.config.prior_components} components "
                                f"need at least as many training images, and it is fitted to "
                                f"{fitted_on}: lower `prior_components` or use `prior` normal")
        backend = self.model.backend
        self.train_images = data.to_unit_float(train, backend.xp, backend.dtype)
        self.test_images = data.to_unit_float(test, np, "float64")
        self.shown = self.test_images[:SHOWN]

    def _model_bytes(self):
        """Memory of the model's parameters, gradients and two optimizer moments."""
        return 4 * self.config.parameter_count() * np.dtype(self.config.dtype).itemsize

    def check_memory(self):
        """ConfigError when the model cannot fit in this machine's memory."""
        needed, physical = self._model_bytes(), _physical_memory()
        if physical and needed > physical:
            raise ConfigError(f"the model needs about {needed / 1e9:.1f} GB, more than this "
                              f"machine's {physical / 1e9:.1f} GB of memory: {MEMORY_ADVICE}")

    def build_model(self):
        """The model of self.config, refused up front when it cannot fit in memory."""
        self.check_memory()
        try:
            return VAEGAN(self.config)
        except MemoryError as error:
            raise ConfigError(f"out of memory building the model (about "
                              f"{self._model_bytes() / 1e9:.1f} GB of parameters and optimizer "
                              f"state): {MEMORY_ADVICE}") from error

    def start(self, resume=False, overwrite=False):
        """Build the model (so an unknown or missing backend is the first error), restore it
        and the run's state from the run's checkpoint when resuming, and prepare the step."""
        self._check_resume(resume, overwrite)
        self.model = self.build_model()
        self.state = TrainState(self.model)
        self.config = self.model.config
        path = self.run_dir / CHECKPOINT
        if path.exists() and not (resume or overwrite):
            raise TrainingError(f"{self.run_dir} already holds a run ({path}): pass `resume` to "
                                f"continue it, `overwrite` to replace it, or another `run_dir`")
        if resume:
            self.resume_from(path)
        self.prepare_step()

    def _check_resume(self, resume, overwrite):
        """ConfigError or TrainingError when resume and overwrite cannot both be meant, or
        when there is no checkpoint file to resume."""
        path = self.run_dir / CHECKPOINT
        if resume and overwrite:
            raise ConfigError("`resume` and `overwrite` contradict each other: `resume` "
                              "continues the run's checkpoint, `overwrite` replaces it; pass "
                              "one", "overwrite")
        if path.exists() and not path.is_file():
            raise TrainingError(f"{path} is not a file, so it cannot be a checkpoint: move it "
                                f"away or choose another `run_dir`")
        if resume and not path.exists():
            raise TrainingError(f"`resume`: {self.run_dir} holds no checkpoint to continue "
                                f"(no {CHECKPOINT}): check `run_dir`, or drop `resume` to "
                                f"start a new run")

    def resume_from(self, path):
        """The training state and the run's history from checkpoint `path`, whose settings
        must be this run's (but for RESUMABLE ones; changes of RECORDED ones are listed)."""
        header, arrays = read_checkpoint(path)
        saved = checkpoint_config(header, path).to_dict()
        now = self.config.to_dict()
        changed = [f"{key} {value!r} -> {now[key]!r}" for key, value in saved.items()
                   if key not in RESUMABLE and value != now[key]]
        if changed:
            raise TrainingError(f"`resume` continues {path} with its own settings, but these "
                                f"differ: {'; '.join(changed)}. Drop those flags, or train "
                                f"into a new `run_dir`")
        extra = self.state.restore(header, arrays, path)
        self.epoch, self.history, self.metrics = extra["epoch"], extra["history"], extra["metrics"]
        self.order_rng.bit_generator.state = extra["order_rng"]
        self.partial = extra.get("partial")
        self.setting_changes = extra.get("setting_changes", [])
        step = (self.partial or {}).get("step", 0)
        for key in RECORDED:
            if saved[key] != now[key]:
                self.setting_changes.append({"epoch": self.epoch, "step": step, "setting": key,
                                             "from": saved[key], "to": now[key]})
                if self.progress:
                    tqdm.write(f"resuming with {key} {saved[key]!r} -> {now[key]!r} (kept in "
                               f"the checkpoint's setting_changes)")

    # ----- loop -----

    def fit(self, resume=False, overwrite=False):
        """Train for config.epochs epochs (from the last checkpoint when resuming).

        A run directory that already holds a checkpoint is refused unless `resume` (continue
        it) or `overwrite` (start again and replace it).

        One training at a time holds the run directory (a second is refused, naming the
        first's process), and it is checked for writability and free space before any work.

        Ctrl-C (SIGINT), SIGTERM and SIGHUP finish the current step, save a checkpoint there
        and raise `Interrupted`; `resume` then continues exactly as if nothing had happened.
        """
        self._check_resume(resume, overwrite)   # before the run directory is made
        self.check_memory()
        checkpoint_bytes = 3 * self._model_bytes() // 4   # parameters and the moments
        with rundir.claim(self.run_dir, 2 * checkpoint_bytes):
            self.start(resume, overwrite)
            rundir.remove_stale_temporaries(self.run_dir)
            self.load_data()
            if self.epoch == 0 and self.partial is None:
                viz.save_grid(self.run_dir / "real.png", self.shown, ncols=8,
                              title="real test images")
            with self._stop_on_signals():
                if self.epoch < self.config.epochs or self.config.prior == "normal":
                    self.model.prior = StandardNormal(self.config.latent_dim)  # refitted below
                while self.epoch < self.config.epochs:
                    self.train_epoch()
                    self.write_outputs()
                if self.config.prior == "mixture" and self.model.prior.kind != "mixture":
                    self.fit_prior()
                    self.write_outputs()
        return self.metrics

    def fit_prior(self):
        """After the last epoch: the mixture prior that samples are drawn from, fitted to the
        posterior means of the first config.prior_images training images."""
        images = self.model.backend.to_numpy(self.train_images[:self.config.prior_images])
        prior.fit_prior(self.model, images, self.config.prior_components,
                        seed=self.config.seed)

    def prepare_step(self):
        """On the cupy backend with noise drawn on the device (unless config.cuda_graph is
        off), record the training step once as a CUDA graph that every step then replays."""
        backend = self.model.backend
        if (self.config.cuda_graph and hasattr(backend.ops, "capture_graph")
                and backend.device_rng is not None):
            self.state.capture_graph(self.config.batch_size)

    def request_stop(self, signum=signal.SIGINT):
        """Stop at the end of the current step, saving a checkpoint there."""
        self.stop_requested, self.stop_signal = True, signum

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT, SIGTERM and SIGHUP request a stop; a second one acts as it would have."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            for number, handling in previous.items():   # a second signal stops at once
                signal.signal(number, handling)
            self.request_stop(signum)

        previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
        try:
            yield
        finally:
            for number, handling in previous.items():
                signal.signal(number, handling)

    def train_epoch(self):
        """One pass over the shuffled training set (the rest of it, after a mid-epoch resume)."""
        batch_size = self.config.batch_size
        steps = data.num_batches(len(self.train_images), batch_size)
        partial = self.partial or {}
        self.partial = None
        if partial:
            self.order_rng.bit_generator.state = partial["order_rng"]
        order_state = self.order_rng.bit_generator.state
        done = partial.get("step", 0)
        sums, count = partial.get("sums", {}), partial.get("count", 0)
        epoch_sums = partial.get("epoch_sums", {})
        self.state.scale_lr(schedule.lr_factor(self.config.lr_schedule, self.config.lr_final,
                                               self.epoch, self.config.epochs))
        started = time.perf_counter() - partial.get("seconds", 0.0)
        batches = data.iterate_batches(self.train_images, batch_size, self.order_rng)
        bar = tqdm(itertools.islice(batches, done, None), initial=done, total=steps,
                   desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not self.progress, leave=False)
        for step, batch in enumerate(bar, done + 1):
            for key, value in self.state.step(batch).items():
                sums[key] = sums.get(key, 0.0) + value  # a new array: a graph reuses `value`
            count += 1
            if count == self.log_every or step == steps:
                means = self._read_means(sums, count, step)
                for key, value in means.items():
                    epoch_sums[key] = epoch_sums.get(key, 0.0) + value * count
                self.history.append({"epoch": self.epoch + step / steps, **means})
                rate = step * batch_size / (time.perf_counter() - started)
                shown = {"rec": f"{means['reconstruction']:.1f}", "kl": f"{means['kl']:.1f}"}
                if "discriminator" in means:  # a plain VAE has none: no "disc=nan"
                    shown["disc"] = f"{means['discriminator']:.3f}"
                bar.set_postfix(**shown, img_s=f"{rate:.0f}")
                sums, count = {}, 0
            if self.stop_requested and step < steps:
                bar.close()
                self._read_means(sums, count or 1, step)  # never save a diverged state
                self.partial = {"order_rng": order_state, "step": step, "count": count,
                                "sums": {key: float(value) for key, value in sums.items()},
                                "epoch_sums": epoch_sums,
                                "seconds": time.perf_counter() - started}
                self.save_checkpoint()
                raise Interrupted(f"{signal.Signals(self.stop_signal).name}: interrupted at "
                                  f"epoch {self.epoch + 1}, step {step} of {steps}; checkpoint "
                                  f"saved in {self.run_dir}: continue with `resume`",
                                  self.stop_signal)
        bar.close()
        seconds = time.perf_counter() - started
        self.epoch += 1
        test_bce, test_mse = (float(np.mean(errors)) for errors in
                              metrics.reconstruction_errors(self.model, self.test_images))
        row = {"epoch": self.epoch, "steps": steps,
               **{key: epoch_sums.get(key, float("nan")) / steps for key in LOSS_KEYS},
               "test_bce": test_bce, "test_mse": test_mse, "seconds": seconds,
               "samples_per_s": steps * batch_size / seconds}
        self.metrics.append(row)
        if self.progress:
            tqdm.write(f"epoch {self.epoch}: reconstruction {row['reconstruction']:.2f} "
                       f"kl {row['kl']:.2f} test BCE {test_bce:.2f} ({seconds:.1f} s)")
        return row

    def _read_means(self, sums, count, step):
        """Running means of the losses (the one host read per logging interval); TrainingError
        if they or the parameters are not finite."""
        means = {key: float(value) / count for key, value in sums.items()}
        bad_losses = [key for key, value in means.items() if not math.isfinite(value)]
        bad_networks = self.state.non_finite_networks()
        if bad_losses or bad_networks:
            where = f"epoch {self.epoch + 1}, step {step}"
            what = (f"non-finite parameters in the {' and '.join(bad_networks)}" if bad_networks
                    else f"non-finite {', '.join(bad_losses)} loss")
            rates = ", ".join(f"`lr_{name}` {getattr(self.config, 'lr_' + name):g}"
                              for name in (bad_networks or self.model.params))
            path = self.run_dir / CHECKPOINT
            kept = (f"the last checkpoint, {path}, is kept (checked finite when saved): "
                    f"`resume` continues it with the new setting" if path.is_file()
                    else "no checkpoint was written yet")
            raise TrainingError(f"{what} at {where}: training diverged, most likely from a "
                                f"learning rate too high ({rates}) - lower it, or set "
                                f"`clip_grad_norm`; {kept}")
        return means

    # ----- outputs -----

    def write_outputs(self):
        """The checkpoint, metrics.csv and the pictures, each replaced atomically, in that
        order: metrics.csv never lists an epoch the checkpoint does not hold."""
        self.save_checkpoint()
        self.write_metrics()
        self.write_pictures()

    def write_metrics(self):
        def write(file):
            import io
            text = io.StringIO()
            writer = csv.DictWriter(text, METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(self.metrics)
            file.write(text.getvalue().encode())
        write_atomic(self.run_dir / METRICS, write)

    def write_pictures(self):
        model, out = self.model, self.run_dir
        viz.save_comparison(out / "reconstructions.png", self.shown[:32],
                            model.reconstruct(self.shown[:32]), ncols=8,
                            title=f"test images and reconstructions, epoch {self.epoch}")
        prior_name = "mixture prior" if model.prior.kind == "mixture" else "N(0, I)"
        viz.save_grid(out / "samples.png", model.sample(SHOWN, seed=self.config.seed), ncols=8,
                      title=f"decoded samples of the {prior_name}, epoch {self.epoch}")
        viz.save_rows(out / "interpolation.png", interpolation_rows(model, self.shown[:16]),
                      title="latent interpolation between test images")
        x = [h["epoch"] for h in self.history]
        curves = lambda keys: {k: [h.get(k, float("nan")) for h in self.history] for k in keys}
        if self.model.discriminator is not None:
            viz.plot_curves(out / "discriminator_losses.png",
                            curves(("discriminator", "disc_real", "disc_fake")),
                            "discriminator losses", x=x)
        viz.plot_curves(out / "losses.png",
                        curves(("reconstruction", "kl", "adversarial", "encoder", "decoder")),
                        "encoder and decoder losses", x=x, log_scale=True)

    def save_checkpoint(self):
        extra = {"epoch": self.epoch, "history": self.history, "metrics": self.metrics,
                 "order_rng": self.order_rng.bit_generator.state, "partial": self.partial,
                 "setting_changes": self.setting_changes}
        self.state.save(self.run_dir / CHECKPOINT, extra)


def _physical_memory():
    """Bytes of memory this machine has, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def saved_config(run_dir):
    """The Config of the checkpoint in `run_dir`, or None when there is none."""
    path = Path(run_dir) / CHECKPOINT
    return checkpoint_config(read_checkpoint(path)[0], path) if path.exists() else None
