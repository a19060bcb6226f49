"""Hyper-parameter sweeps on Optuna: many trainings, in parallel processes or on many machines.

A sweep is an Optuna study in a storage every worker shares: by default a journal file in the
sweep folder (one machine), or any database Optuna's RDBStorage takes (PostgreSQL for many
machines). Each trial is a normal `Trainer` run in its own folder under `<sweep>/trials/`,
measured by `evaluate.evaluate_model`. `Sweep(folder).run(trials=N)` returns when the study
holds N finished or failed trials, so running it again with a larger N adds the difference.
Optuna is an optional extra (`pip install 'fastvae-numpy[sweep]'`); training never needs it.
"""
import contextlib
import dataclasses
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from fastvae.config import Config
from fastvae.errors import ConfigError, FastvaeError
from fastvae.rundir import process_alive

JOURNAL = "journal.log"
TRIALS = "trials"
SETTINGS_ATTR = "fastvae_sweep"
DEFAULT_OBJECTIVES = ("reconstruction_bce", "fid_samples")
MAXIMIZED = ("accuracy", "recognis")       # metrics (by substring) that are better when larger
KINDS = ("float", "log", "int", "logint", "choice")
PER_MACHINE = ("backend", "cuda_graph", "device_noise")  # may differ between the workers
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")
POLL_SECONDS = 1.0
INTERRUPTED = "interrupted (Ctrl-C)"
EVALUATION = ("eval_images", "eval_k", "kid_subsets", "classifier_epochs")  # SweepSettings


def require_optuna():
    """The optuna module, or a one-line error saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise FastvaeError("sweeps need Optuna: pip install 'fastvae-numpy[sweep]' "
                           "(or pip install optuna 'psycopg[binary]')") from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


# ----- the search space -----

@dataclass(frozen=True)
class Param:
    """One swept setting: a Config field, how it is drawn, and its range or choices."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     log=self.kind == "logint")
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")

    def text(self):
        if self.kind == "choice":
            return f"{self.name}=choice:{','.join(str(c) for c in self.choices)}"
        return f"{self.name}={self.kind}:{self.low:g}:{self.high:g}"


def _typed(field, text):
    """`text` as a value of the Config field `field` (int, float, bool or str)."""
    kind = type(field.default)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"{field.name} takes true or false, not {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{field.name} takes a {kind.__name__}, not {text!r}") from None


def parse_param(text):
    """A Param from `name=kind:spec`: `gamma=log:0.01:10`, `latent_dim=int:8:128` (or
    `logint:`), `lr_decoder=float:1e-4:1e-3`, `reconstruction=choice:pixel,feature`."""
    name, _, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    name = name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "extras"}
    if name not in fields:
        raise ConfigError(f"cannot sweep {name!r}: not a setting (one of {', '.join(fields)})")
    field = fields[name]
    if isinstance(field.default, tuple):
        raise ConfigError(f"cannot sweep {name}: it holds several numbers")
    if kind not in KINDS or not rest:
        raise ConfigError(f"sweep parameter {text!r}: write NAME=KIND:SPEC with KIND one of "
                          f"{', '.join(KINDS)}, e.g. gamma=log:0.01:10 or "
                          f"reconstruction=choice:pixel,feature")
    if kind == "choice":
        return Param(name, kind, choices=tuple(_typed(field, c) for c in rest.split(",")))
    try:
        low, high = (float(part) for part in rest.split(":"))
    except ValueError:
        raise ConfigError(f"sweep parameter {text!r}: a range is LOW:HIGH, two numbers") from None
    if not low < high or (kind in ("log", "logint") and low <= 0):
        raise ConfigError(f"sweep parameter {text!r}: need LOW < HIGH (and LOW > 0 for log)")
    if kind in ("int", "logint") and (low != int(low) or high != int(high)):
        raise ConfigError(f"sweep parameter {text!r}: an int range needs whole numbers")
    if kind in ("int", "logint") and not isinstance(field.default, int):
        raise ConfigError(f"{name} is not a whole number: use float or log")
    return Param(name, kind, low, high)


@dataclass(frozen=True)
class Objective:
    """One metric of `evaluate.METRICS` and whether it is minimised or maximised."""

    metric: str
    direction: str

    def text(self):
        return f"{self.metric}:{'max' if self.direction == 'maximize' else 'min'}"


def parse_objective(text):
    """An Objective from `metric` or `metric:min` / `metric:max` (default: min, except
    accuracies and recognisable shares)."""
    from fastvae.evaluate import METRICS
    metric, _, way = text.partition(":")
    if metric not in METRICS:
        raise ConfigError(f"unknown objective {metric!r}: use one of {', '.join(METRICS)}")
    if way not in ("", "min", "max"):
        raise ConfigError(f"objective {text!r}: the direction is min or max")
    larger = way == "max" or (not way and any(word in metric for word in MAXIMIZED))
    return Objective(metric, "maximize" if larger else "minimize")


@dataclass
class SweepSettings:
    """Everything a sweep holds fixed: the trials' Config, the space, the objectives and how
    each trial is measured. Stored with the study, so every worker runs the same sweep."""

    config: Config = dataclasses.field(default_factory=Config)
    space: tuple = ()
    objectives: tuple = ()
    eval_images: int = 2000      # first N test images measured (0: all 10,000)
    eval_k: int = 1              # importance samples of the IWAE bound
    kid_subsets: int = 10        # KID subsets of 1,000
    classifier_epochs: int = 10  # the evaluation classifier's (trained once, cached)

    def __post_init__(self):
        self.space = tuple(parse_param(p) if isinstance(p, str) else p for p in self.space)
        self.objectives = tuple(parse_objective(o) if isinstance(o, str) else o
                                for o in (self.objectives or DEFAULT_OBJECTIVES))
        if not self.space:
            raise ConfigError("a sweep needs at least one parameter, e.g. gamma=log:0.01:10")
        names = [p.name for p in self.space]
        if len(set(names)) < len(names):
            raise ConfigError(f"a setting is swept twice: {', '.join(names)}")
        if min(self.eval_images, self.eval_k - 1, self.kid_subsets - 1,
               self.classifier_epochs - 1) < 0:
            raise ConfigError("eval_images must be >= 0; eval_k, kid_subsets and "
                              "classifier_epochs >= 1")

    def to_dict(self):
        return {"config": self.config.to_dict(), "space": [p.text() for p in self.space],
                "objectives": [o.text() for o in self.objectives],
                **{key: getattr(self, key) for key in EVALUATION}}

    @classmethod
    def from_dict(cls, values):
        return cls(**{**values, "config": Config.from_dict(values["config"])})

    def differences(self, other):
        """What differs from `other`, ignoring the settings a machine may choose for itself."""
        mine, theirs = self.to_dict(), other.to_dict()
        for values in (mine, theirs):
            values["config"] = {k: v for k, v in values["config"].items() if k not in PER_MACHINE}
        found = [f"{key} {theirs[key]!r} -> {mine[key]!r}" for key in mine
                 if key != "config" and mine[key] != theirs[key]]
        return found + [f"{key} {theirs['config'][key]!r} -> {value!r}"
                        for key, value in mine["config"].items()
                        if value != theirs["config"][key]]


def read_sweep_file(path):
    """(Config values, sweep values) from a TOML file: its top-level keys are settings, and an
    optional [sweep] table holds `params` (name = "kind:spec"), `objectives` and the
    SweepSettings fields."""
    try:
        import tomllib
    except ImportError:                      # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read the settings file {path}: {error}") from None
    sweep = dict(values.pop("sweep", {}))
    params = sweep.pop("params", {})
    if isinstance(params, dict):
        params = [f"{name}={spec}" for name, spec in params.items()]
    sweep["space"] = list(params)
    known = {f.name for f in dataclasses.fields(SweepSettings)} - {"config"}
    unknown = sorted(set(sweep) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys in [sweep]: {', '.join(unknown)}")
    return values, sweep


# ----- counting trials -----

def retried_numbers(trials):
    """Numbers of the failed trials that a later trial retries (same settings, run again)."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


def counted(trials):
    """The trials that count towards --trials: all but retried failures and surplus ones,
    ordered by the trial each one stands for (a retry takes its original's place)."""
    retried = retried_numbers(trials)
    kept = [t for t in trials if not t.user_attrs.get("surplus")
            and not (t.state.name == "FAIL" and t.number in retried)]
    return sorted(kept, key=lambda t: (t.system_attrs.get("failed_trial", t.number), t.number))


def progress(trials):
    """Counts of the counted trials by state: done, failed, running, waiting."""
    states = [t.state.name for t in counted(trials)]
    return {"done": states.count("COMPLETE"), "failed": states.count("FAIL"),
            "running": states.count("RUNNING"), "waiting": states.count("WAITING")}


# ----- the sweep -----

class Sweep:
    """An Optuna study of fastvae trainings, with its folder of trial runs.

    `storage` is None for the journal file `<folder>/journal.log`, or an RDB URL such as
    `postgresql://user@host/db`. With a database, a worker that dies mid-trial stops its
    heartbeat (every `heartbeat` seconds) and its trial is failed and retried after
    2 x `heartbeat`; with the journal (Optuna gives it no heartbeat) a trial whose worker
    process is gone from this machine is failed and retried the same way.
    """

    def __init__(self, folder, storage=None, study_name="fastvae", heartbeat=60,
                 data_dir=None, download=True, max_retry=3, local=None):
        self.folder, self.url, self.study_name = Path(folder), storage, study_name
        self.local = dict(local or {})       # this machine's PER_MACHINE settings
        unknown = sorted(set(self.local) - set(PER_MACHINE))
        if unknown:
            raise ConfigError(f"only {', '.join(PER_MACHINE)} may differ between machines, "
                              f"not {', '.join(unknown)}")
        self.heartbeat, self.max_retry = int(heartbeat), max_retry
        self.data_dir, self.download = data_dir, download
        if self.heartbeat < 1:
            raise ConfigError("the heartbeat interval must be at least 1 second")
        self.optuna = require_optuna()
        self.retry = self.optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.storage = self._open_storage()

    def _open_storage(self):
        storages = self.optuna.storages
        if self.url is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            backend = storages.journal.JournalFileBackend(str(self.folder / JOURNAL))
            return storages.journal.JournalStorage(backend)
        try:
            return storages.RDBStorage(database_url(self.url), heartbeat_interval=self.heartbeat,
                                       grace_period=2 * self.heartbeat,
                                       heartbeat_stale_trial_callback=self.retry)
        except ImportError as error:
            raise FastvaeError(f"cannot open {self.url}: {error} (for PostgreSQL: pip install "
                               "'psycopg[binary]')") from None
        except Exception as error:   # SQLAlchemy's errors: a wrong URL, no server, no rights
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise FastvaeError(f"cannot open the sweep storage {self.url}: {first}") from None

    @property
    def has_heartbeat(self):
        return self.url is not None

    def settings(self):
        """The SweepSettings stored with the study, or None when there is no such study."""
        try:
            study = self.optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:
            return None
        values = study.user_attrs.get(SETTINGS_ATTR)
        return SweepSettings.from_dict(values) if values else None

    def study(self, settings=None):
        """The study, created with `settings` or joined; joining with other settings is an
        error naming what differs. Without `settings` the study must exist."""
        stored = self.settings()
        if settings is None:
            if stored is None:
                raise ConfigError(f"no sweep {self.study_name!r} in {self.where()}: start one "
                                  f"with its parameters")
            settings = stored
        elif stored is not None and settings.differences(stored):
            raise ConfigError(f"sweep {self.study_name!r} in {self.where()} was started with "
                              f"other settings ({'; '.join(settings.differences(stored))}): "
                              f"use its own, or another study name")
        study = self.optuna.create_study(
            study_name=self.study_name, storage=self.storage, load_if_exists=True,
            directions=[o.direction for o in settings.objectives],
            sampler=self.optuna.samplers.TPESampler(constant_liar=True, n_startup_trials=8))
        if stored is None:
            study.set_user_attr(SETTINGS_ATTR, settings.to_dict())
        return study, settings

    def where(self):
        return self.url or str(self.folder / JOURNAL)

    def trials(self):
        study, _ = self.study()
        return study.get_trials(deepcopy=False)

    # ----- running -----

    def run(self, settings, trials, workers=1, threads=None, report=print):
        """Run trials in `workers` processes until the study holds `trials` finished or
        failed ones. `threads` > 0 pins each worker's Numba and BLAS threads (None: the cores
        shared out when workers > 1, else unpinned; 0: unpinned). Returns the progress
        counts; Ctrl-C stops every worker at its next step (the interrupted trials are
        retried next time) and raises KeyboardInterrupt."""
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
        if trials < 0 or workers < 1 or threads < 0:
            raise ConfigError("trials must be >= 0, workers >= 1 and threads >= 0")
        study, settings = self.study(settings)
        now = progress(study.get_trials(deepcopy=False))
        needed = trials - now["done"] - now["failed"]
        if needed <= 0:
            report(f"sweep {self.study_name}: {trials - needed}/{trials} finished "
                   f"({now['failed']} failed): nothing to do")
            return now
        ensure_classifier(settings, self.data_dir, self.download, self.local.get("backend"))
        context = multiprocessing.get_context("spawn")
        arguments = (str(self.folder), self.url, self.study_name, self.heartbeat,
                     self.max_retry, self.data_dir, self.download, self.local, trials)
        with _thread_environment(threads):
            processes = [context.Process(target=_worker_main, args=arguments, daemon=False)
                         for _ in range(min(workers, needed))]
            for process in processes:
                process.start()
        return self._watch(processes, trials, report)

    def _watch(self, processes, trials, report):
        """Print progress whenever it changes until every worker has exited."""
        shown, interrupted = None, False
        while True:
            try:
                alive = [p for p in processes if p.is_alive()]
                now = progress(self.storage.get_all_trials(self._study_id(), deepcopy=False))
                if now != shown:
                    report(f"sweep {self.study_name}: {now['done'] + now['failed']}/{trials} "
                           f"finished ({now['failed']} failed), {now['running']} running")
                    shown = now
                if not alive:
                    break
                alive[0].join(POLL_SECONDS)
            except KeyboardInterrupt:
                interrupted = True
                for process in processes:        # a SIGINT to this process alone: pass it on
                    if process.is_alive() and process.pid:
                        os.kill(process.pid, signal.SIGINT)
        broken = [p.exitcode for p in processes if p.exitcode not in (0, 130, -signal.SIGINT)]
        if interrupted or any(p.exitcode in (130, -signal.SIGINT) for p in processes):
            raise KeyboardInterrupt
        if broken:
            raise FastvaeError(f"{len(broken)} sweep worker(s) ended with exit status "
                               f"{', '.join(map(str, broken))}; see their messages above")
        return shown

    def _study_id(self):
        return self.storage.get_study_id_from_name(self.study_name)

    def work(self, trials):
        """One worker's loop (in this process): run trials while the study needs them, wait
        while others run (their trials may yet fail and be retried), stop at `trials`."""
        study, settings = self.study()
        objective = TrialObjective(self, settings, trials)
        while True:
            self.fail_lost_trials(study)
            all_trials = study.get_trials(deepcopy=False)
            now = progress(all_trials)
            if now["done"] + now["failed"] >= trials:
                return
            if now["waiting"] or len(counted(all_trials)) < trials:
                self._run_one(study, objective)
            else:
                time.sleep(POLL_SECONDS)

    def _run_one(self, study, objective):
        try:
            with objective.gate.held():
                study.optimize(objective, n_trials=1, catch=(Exception,))
        except KeyboardInterrupt:
            trial = objective.latest()
            if trial is not None and trial.state.name == "FAIL" \
                    and trial.user_attrs.get("error") == INTERRUPTED:
                self.retry(study, trial)     # run again, with the same settings, next time
            raise
        except ValueError as error:      # Optuna's tell, when a trial taken for lost returns
            trial = objective.latest()
            if trial is None or trial.state.name != "FAIL" or "Cannot tell" not in str(error):
                raise
            print(f"fastvae sweep: trial {trial.number} was taken for lost (its heartbeat "
                  f"came late) and is retried; this worker's result is dropped",
                  file=sys.stderr)

    def fail_lost_trials(self, study):
        """Fail (and retry) running trials whose worker is gone: by Optuna's heartbeat with a
        database; with the journal, by the worker's process id on this machine."""
        if self.has_heartbeat:
            self.optuna.storages.fail_stale_trials(study)
            return
        host = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=(self._state("RUNNING"),)):
            worker = trial.user_attrs.get("worker", {})   # a retry copies its original's
            pid = worker.get("pid")
            if worker.get("trial") != trial.number or worker.get("host") != host \
                    or process_alive(pid):
                continue
            try:
                self.storage.set_trial_user_attr(trial._trial_id, "error",
                                                 f"worker process {pid} died mid-trial")
                failed = self.storage.set_trial_state_values(trial._trial_id,
                                                             self._state("FAIL"))
            except self.optuna.exceptions.UpdateFinishedTrialError:
                continue                           # another worker got there first
            if failed:
                self.retry(study, self.storage.get_trial(trial._trial_id))

    def _state(self, name):
        return getattr(self.optuna.trial.TrialState, name)


def database_url(url):
    """`url` with psycopg 3 named as the driver of a plain postgresql:// URL: SQLAlchemy 2.0
    would take psycopg2 for it and 2.1 takes psycopg; the sweep extra installs psycopg."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@contextlib.contextmanager
def _thread_environment(threads):
    """Thread-count variables for the worker processes started inside (inherited at spawn)."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    if threads:
        os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker_main(folder, url, study_name, heartbeat, max_retry, data_dir, download, local,
                 trials):
    """A worker process: open the storage and work; exit 130 on Ctrl-C, 2 on a user error."""
    try:
        Sweep(folder, url, study_name, heartbeat, data_dir, download, max_retry,
              local).work(trials)
    except KeyboardInterrupt:
        sys.exit(130)
    except FastvaeError as error:
        print(f"fastvae sweep worker {os.getpid()}: error: {error}", file=sys.stderr)
        sys.exit(2)


def ensure_classifier(settings, data_dir=None, download=True, backend=None):
    """The evaluation classifier, trained now (once, then cached) rather than by every worker."""
    from fastvae import classifier
    return classifier.load_or_train_classifier(
        data_dir, settings.config.dataset, epochs=settings.classifier_epochs,
        backend=backend or settings.config.backend or None, download=download, progress=True)


class InterruptGate:
    """Ctrl-C held back while Optuna books a trial (a trial it asked for but never ran would
    stay running for ever), let through while the trial trains; a held one raises on leaving."""

    def __init__(self):
        self.pending = False

    def _hold(self, signum, frame):
        self.pending = True

    @contextlib.contextmanager
    def _handler(self, handler):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def held(self):
        with self._handler(self._hold):
            yield
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def open(self):
        if self.pending:
            raise KeyboardInterrupt
        with self._handler(signal.default_int_handler):
            yield


class TrialObjective:
    """Optuna's objective: one trial is one training run in `<sweep>/trials/NNNN`, then the
    evaluation; every measure and any error message are kept as the trial's user attributes."""

    def __init__(self, sweep, settings, trials):
        self.sweep, self.settings, self.trials = sweep, settings, trials
        self.trial = None        # the trial of the latest call
        self.gate = InterruptGate()
        self.evaluation = None   # (classifier, test images, labels), loaded once per worker

    def latest(self):
        """The latest trial as stored now (another worker may have failed it), or None."""
        storage = self.sweep.storage
        return None if self.trial is None else storage.get_trial(self.trial._trial_id)

    def __call__(self, trial):
        from fastvae.trainer import Interrupted
        self.trial = trial
        started = time.perf_counter()
        try:
            if self._surplus(trial):
                trial.set_user_attr("surplus", True)
                raise self.sweep.optuna.TrialPruned("the sweep already has its trials")
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(),
                                           "trial": trial.number,
                                           "threads": os.environ.get("NUMBA_NUM_THREADS")})
            with self.gate.open():
                values = self._train_and_measure(trial)
        except self.sweep.optuna.TrialPruned:
            raise
        except (Interrupted, KeyboardInterrupt):
            trial.set_user_attr("error", INTERRUPTED)
            raise KeyboardInterrupt from None
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}")
            if not isinstance(error, FastvaeError):
                trial.set_user_attr("traceback", traceback.format_exc())
            print(f"fastvae sweep: trial {trial.number} failed: {type(error).__name__}: "
                  f"{error}", file=sys.stderr)
            raise
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return values

    def _surplus(self, trial):
        """Whether two workers asked at once and this trial is one more than the sweep needs."""
        order = [t.number for t in counted(trial.study.get_trials(deepcopy=False))]
        return trial.number in order and order.index(trial.number) >= self.trials

    def _train_and_measure(self, trial):
        from fastvae.trainer import Trainer
        params = {p.name: p.suggest(trial) for p in self.settings.space}
        config = self.settings.config.replace(**self.sweep.local, **params)
        run_dir = self.sweep.folder / TRIALS / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trainer = Trainer(config, run_dir, data_dir=self.sweep.data_dir,
                          download=self.sweep.download, progress=False)
        started = time.perf_counter()
        trainer.fit(overwrite=True)
        trial.set_user_attr("train_seconds", time.perf_counter() - started)
        started = time.perf_counter()
        metrics = self.measure(trainer.model)
        trial.set_user_attr("eval_seconds", time.perf_counter() - started)
        trial.set_user_attr("metrics", metrics)
        values = [metrics[o.metric] for o in self.settings.objectives]
        bad = [o.metric for o, v in zip(self.settings.objectives, values) if not math.isfinite(v)]
        if bad:
            raise FastvaeError(f"the objective {', '.join(bad)} is not finite")
        return values

    def measure(self, model):
        """evaluate.evaluate_model on the first eval_images test images (as many samples)."""
        from fastvae import data, evaluate
        settings = self.settings
        if self.evaluation is None:
            test, labels = data.load_split(settings.config.dataset, "test", self.sweep.data_dir,
                                           self.sweep.download, settings.eval_images or None)
            digits = ensure_classifier(settings, self.sweep.data_dir, self.sweep.download,
                                       self.sweep.local.get("backend"))
            self.evaluation = digits, test, labels
        digits, test, labels = self.evaluation
        results = evaluate.evaluate_model(model, test, labels, digits, k=settings.eval_k,
                                          n_samples=len(test), kid_subsets=settings.kid_subsets)
        return {key: float(value) for key, value in results.items()}
