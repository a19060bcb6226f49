"""The `fastvae` command: a thin layer of flags over library calls.

train, reconstruct, sample, evaluate, sweep, bench, gradcheck; `fastvae COMMAND --help` for each.
A user's mistake (a fastvae.errors.FastvaeError) ends in one line on stderr and exit status 2;
anything else is a bug and shows its traceback (set FASTVAE_DEBUG=1 to see one for a user
error too).
"""
import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path

from fastvae import backend
from fastvae.config import Config, field_comments
from fastvae.errors import ConfigError, FastvaeError
from fastvae.trainer import Interrupted

MAX_SAMPLES = 1024  # the most `fastvae sample` draws into one picture (a 32 x 32 grid)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def _add_config_flags(parser):
    """One flag per Config field, absent from the namespace unless given."""
    group = parser.add_argument_group("model and training settings (defaults: fastvae.Config)")
    comments = field_comments()
    for field in dataclasses.fields(Config):
        if field.name == "extras":
            continue
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{comments.get(field.name, '')} (default {default!r})".strip()
        help_text = help_text.replace("%", "%%")   # argparse %-formats help: "60 %" is text
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text,
                               default=argparse.SUPPRESS)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=type(default[0]), nargs="+", help=help_text,
                               default=argparse.SUPPRESS, metavar="N")
        else:
            group.add_argument(flag, type=type(default), help=help_text, default=argparse.SUPPRESS)


def build_config(args, base=None):
    """Config from `base` (or the defaults), then the TOML file, then the flags given."""
    values = (base or Config()).to_dict()
    if getattr(args, "config", None):
        values.update(read_toml(args.config))
    names = {field.name for field in dataclasses.fields(Config)}
    values.update({name: value for name, value in vars(args).items() if name in names})
    return Config.from_dict(values)


def read_toml(path):
    """The settings in TOML file `path`; ConfigError if it cannot be read or parsed."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read the settings file {path}: {error.strerror or error}",
                          "config") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}", "config") from error


def as_flags(message):
    """A library message with its setting names (`batch_size`) written as flags (--batch-size)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda match: "--" + match[1].replace("_", "-"),
                  message)


def cmd_train(args):
    from fastvae import trainer
    base = trainer.saved_config(args.run_dir) if args.resume else None
    config = build_config(args, base)
    run = trainer.Trainer(config, args.run_dir, data_dir=args.data_dir,
                          download=not args.no_download, progress=not args.quiet)
    metrics = run.fit(resume=args.resume, overwrite=args.overwrite)
    if metrics:
        last = metrics[-1]
        print(f"trained {last['epoch']} epochs: test BCE {last['test_bce']:.2f} nats/image, "
              f"test MSE {last['test_mse']:.4f}; outputs in {args.run_dir}")
    return 0


def _load_model(args):
    from fastvae.state import load_model
    return load_model(args.checkpoint, args.backend, args.precision)


def cmd_reconstruct(args):
    from fastvae import data, images, metrics, viz
    model = _load_model(args)
    if args.images:
        originals, names = images.load_digits(args.images), [str(p) for p in args.images]
    else:
        test, _ = data.load_split(model.config.dataset, "test", args.data_dir,
                                  not args.no_download)
        indices = args.indices or list(range(16))
        bad = [i for i in indices if not 0 <= i < len(test)]
        if bad:
            raise ConfigError(f"test-set indices must lie in 0..{len(test) - 1}, got {bad}")
        originals = data.to_unit_float(test[indices], dtype="float64")
        names = [f"test[{i}]" for i in indices]
    recon = model.reconstruct(originals)
    bce, mse = metrics.reconstruction_errors(model, originals)
    print(f"{'image':<24} {'BCE (nats)':>10} {'MSE':>8}")
    for name, b, m in zip(names, bce, mse):
        print(f"{name:<24} {b:>10.2f} {m:>8.4f}")
    viz.save_comparison(args.output, originals, recon, ncols=min(8, len(originals)),
                        title="originals and reconstructions")
    print(f"wrote {args.output}")
    return 0


def cmd_sample(args):
    from fastvae import viz
    if not 1 <= args.n <= MAX_SAMPLES:
        raise ConfigError(f"-n must lie in 1..{MAX_SAMPLES}, got {args.n}: one picture holds "
                          f"at most {MAX_SAMPLES} samples (run again with another --seed for "
                          f"more)")
    _check_seed(args.seed)
    model = _load_model(args)
    viz.save_grid(args.output, model.sample(args.n, seed=args.seed), title="decoded prior samples")
    print(f"wrote {args.output}")
    return 0


def cmd_evaluate(args):
    from fastvae import classifier, data, evaluate
    from fastvae.files import write_atomic
    if min(args.k, args.kid_subsets, args.classifier_epochs) < 1:
        raise ConfigError("--k, --kid-subsets and --classifier-epochs must be at least 1")
    if min(args.samples, args.limit) < 0:
        raise ConfigError("--samples and --limit must not be negative")
    _check_seed(args.seed)
    model = _load_model(args)
    dataset, download = model.config.dataset, not args.no_download
    test, labels = data.load_split(dataset, "test", args.data_dir, download, args.limit or None)
    if len(test) < 2 or args.samples == 1:
        raise ConfigError("the distances need at least 2 test images and 2 samples")
    train, _ = data.load_split(dataset, "train", args.data_dir, download, len(test))
    digits = classifier.load_or_train_classifier(
        args.data_dir, dataset, epochs=args.classifier_epochs, backend=model.backend.name,
        download=download, progress=True)
    results = evaluate.evaluate_model(
        model, test, labels, digits, k=args.k, seed=args.seed, n_samples=args.samples,
        reference_images=train, kid_subsets=args.kid_subsets)
    print(f"{args.checkpoint}: {len(test)} {dataset} test images, k = {args.k}, samples "
          f"from {model.prior.describe()}")
    print(evaluate.format_table(results))
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "dataset": dataset,
                  "images": len(test), "k": args.k, "seed": args.seed,
                  "prior": model.prior.describe(),
                  "classifier": {"settings": dataclasses.asdict(digits.settings),
                                 **digits.info},
                  "metrics": results}
        text = json.dumps(report, indent=2).encode()
        write_atomic(args.json, lambda file: file.write(text))
        print(f"wrote {args.json}")
    return 0


def _check_seed(seed):
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")


def cmd_gradcheck(args):
    from fastvae import gradcheck
    checks = gradcheck.layer_checks(args.seed) + gradcheck.all_model_checks(args.seed)
    compared = args.backend or [name for name in backend.available_backends()
                                if name != "numpy"]
    for name in compared:
        for dtype in ("float32", "float64"):
            checks += gradcheck.compare_kernels(name, dtype, args.seed)
    for name in backend.bf16_backends():
        if name == "numpy" or name in compared:
            checks += gradcheck.compare_bf16_kernels(name, args.seed)
    print(gradcheck.report(checks))
    failed = [check for check in checks if not check.ok]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_sweep(args):
    """Run (or with --show only report) an Optuna sweep; the work is fastvae.sweep's."""
    from fastvae import sweep, sweep_report
    file_config, file_sweep = sweep.read_sweep_file(args.config) if args.config else ({}, {})
    given = {name for name in vars(args) if name in {f.name for f in dataclasses.fields(Config)}}
    space = file_sweep.pop("space", []) + (args.param or [])
    objectives = args.objective or file_sweep.pop("objectives", ())
    file_sweep.pop("objectives", None)
    local = {name: getattr(args, name) for name in sweep.PER_MACHINE if name in given}
    runner = sweep.Sweep(args.run_dir, args.storage, args.study, args.heartbeat,
                         data_dir=args.data_dir, download=not args.no_download, local=local)
    if not args.show:
        if args.trials is None:
            raise ConfigError("say how many trials the sweep should hold: --trials N")
        settings = None                  # join the stored sweep as it is
        if space or args.config or given - set(sweep.PER_MACHINE):
            config = build_config(argparse.Namespace(**{**vars(args), "config": None}),
                                  Config.from_dict({**Config().to_dict(), **file_config}))
            evaluation = {key: getattr(args, key) for key in sweep.EVALUATION
                          if getattr(args, key) is not None}
            settings = sweep.SweepSettings(
                config, space, objectives,
                **{**file_sweep, **evaluation})
        try:
            runner.run(settings, args.trials, args.workers, args.threads)
        except KeyboardInterrupt:
            print(sweep_report.report(runner))
            print("fastvae sweep: interrupted; the interrupted trials run again, with their "
                  "settings, when the same command runs again", file=sys.stderr)
            return 130
    print(sweep_report.report(runner))
    return 0


def _checkpoint_flags(parser):
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.npz from fastvae train")
    parser.add_argument("--backend", default=None, help="run on this backend (default: saved one)")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                        help="matrix products in fp32 or bf16 (default: the saved setting)")


def _data_flags(parser):
    parser.add_argument("--data-dir", default=None,
                        help="folder with the dataset files (default $FASTVAE_DATA or the cache)")
    parser.add_argument("--no-download", action="store_true", help="never download data")


def make_parser():
    parser = argparse.ArgumentParser(prog="fastvae", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the VAE-GAN, writing pictures and checkpoints")
    train.add_argument("--config", help="TOML file of settings (flags override it)")
    train.add_argument("--run-dir", default="runs/mnist", help="where outputs go (default runs/mnist)")
    train.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="start again in a run directory that holds a checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _data_flags(train)
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    reconstruct = commands.add_parser("reconstruct", help="reconstruct test images or PNG files")
    _checkpoint_flags(reconstruct)
    _data_flags(reconstruct)
    source = reconstruct.add_mutually_exclusive_group()
    source.add_argument("--indices", type=int, nargs="+", help="test-set indices (default 0..15)")
    source.add_argument("--images", type=Path, nargs="+", help="PNG (or other) image files")
    reconstruct.add_argument("--output", default="reconstructions.png")
    reconstruct.set_defaults(func=cmd_reconstruct)

    sample = commands.add_parser("sample", help="decode samples of the prior into a grid")
    _checkpoint_flags(sample)
    sample.add_argument("-n", type=int, default=64, help="how many (default 64)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--output", default="samples.png")
    sample.set_defaults(func=cmd_sample)

    evaluate = commands.add_parser(
        "evaluate", help="test-set likelihood bounds, reconstruction error, classifier "
                         "accuracy, FID, KID and the share of recognisable samples")
    _checkpoint_flags(evaluate)
    _data_flags(evaluate)
    evaluate.add_argument("--limit", type=int, default=0, help="first N test images (0: all)")
    evaluate.add_argument("--k", type=int, default=100,
                          help="importance samples per image for the IWAE bound (default 100)")
    evaluate.add_argument("--samples", type=int, default=0,
                          help="prior samples for FID/KID (default: as many as test images)")
    evaluate.add_argument("--kid-subsets", type=int, default=100,
                          help="random subsets of 1000 averaged for KID (default 100)")
    from fastvae.classifier import ClassifierSettings
    epochs = ClassifierSettings.epochs
    evaluate.add_argument("--classifier-epochs", type=int, default=epochs,
                          help="epochs of the feature classifier, trained once and cached in "
                               f"~/.cache/fastvae or $FASTVAE_CACHE (default {epochs})")
    evaluate.add_argument("--seed", type=int, default=0, help="noise and sampling seed")
    evaluate.add_argument("--json", help="also write the results to this JSON file")
    evaluate.set_defaults(func=cmd_evaluate)

    sweep = commands.add_parser(
        "sweep", help="many trainings over a search space on Optuna (needs the sweep extra), "
                      "and the Pareto front they find")
    sweep.add_argument("--run-dir", default="runs/sweep",
                       help="the sweep's folder: journal storage, trials/NNNN runs, report "
                            "(default runs/sweep)")
    sweep.add_argument("--config", help="TOML file of settings, with an optional [sweep] table "
                                         "(params, objectives, eval_images, ...)")
    sweep.add_argument("--param", action="append", metavar="NAME=KIND:SPEC",
                       help="a swept setting: gamma=log:0.01:10, latent_dim=int:8:128 "
                            "(logint:), lr_decoder=float:1e-4:1e-3, "
                            "reconstruction=choice:pixel,feature; repeat for more")
    sweep.add_argument("--objective", action="append", metavar="METRIC[:min|max]",
                       help="a measure of fastvae evaluate to optimise (default: "
                            "reconstruction_bce and fid_samples, the Pareto front); repeatable")
    sweep.add_argument("--trials", type=int,
                       help="the study holds this many finished or failed trials on return")
    sweep.add_argument("--workers", type=int, default=1, help="processes on this machine")
    sweep.add_argument("--threads", type=int,
                       help="pin each worker to N Numba/BLAS threads; 0: unpinned (default: "
                            "the cores shared out among 2 or more workers, else unpinned)")
    sweep.add_argument("--storage", help="an Optuna RDB URL, e.g. postgresql://user:pw@host/db "
                                         "(default: a journal file in --run-dir)")
    sweep.add_argument("--study", default="fastvae", help="the study's name (default fastvae)")
    sweep.add_argument("--heartbeat", type=int, default=60,
                       help="seconds between a worker's heartbeats in a database; a trial "
                            "silent for twice that is failed and retried (default 60)")
    sweep.add_argument("--show", action="store_true",
                       help="only print the trials (Pareto-optimal first), write trials.csv "
                            "and pareto.png")
    for key, meaning in (("eval_images", "test images measured, 0: all (default 2000)"),
                         ("eval_k", "importance samples of the IWAE bound (default 1)"),
                         ("kid_subsets", "KID subsets of 1000 (default 10)"),
                         ("classifier_epochs", "of the evaluation classifier (default 10)")):
        sweep.add_argument("--" + key.replace("_", "-"), type=int, help=meaning)
    _data_flags(sweep)
    _add_config_flags(sweep)
    sweep.set_defaults(func=cmd_sweep)

    gradcheck = commands.add_parser("gradcheck", help="check gradients and backend kernels")
    gradcheck.add_argument("--backend", action="append",
                           help="compare this backend's kernels with numpy (default: all found)")
    gradcheck.add_argument("--seed", type=int, default=0)
    gradcheck.set_defaults(func=cmd_gradcheck)

    try:
        from fastvae import bench
    except ImportError:
        bench = None
    if bench is not None:
        bench_parser = commands.add_parser("bench", help="benchmark the backends (pytest-benchmark)")
        bench.add_arguments(bench_parser)
        bench_parser.set_defaults(func=bench.main)
    return parser


def main(argv=None):
    """Run one command; Python warnings (NumPy's overflow notes, PIL's) are hidden so that a
    mistake reads as one line (FASTVAE_DEBUG=1 shows them, and tracebacks)."""
    args = make_parser().parse_args(argv)
    with warnings.catch_warnings():
        if not os.environ.get("FASTVAE_DEBUG"):
            warnings.simplefilter("ignore")
        return _run(args)


def _run(args):
    try:
        return args.func(args)
    except Interrupted as stop:
        print(f"fastvae {args.command}: {as_flags(str(stop))}", file=sys.stderr)
        return 128 + stop.signum
    except FastvaeError as error:
        if os.environ.get("FASTVAE_DEBUG"):
            raise
        print(f"fastvae {args.command}: error: {as_flags(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastvae {args.command}: interrupted; the last checkpoint written is intact",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
