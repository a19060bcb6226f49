"""Time `TrainState.step` alone, and with --ops where its time goes, kernel call by kernel call.

    python bench/step_time.py --batch-size 512 --precision bf16 [--backend numba] [--ops]

A quick probe beside `fastvae bench` (which times the step against its references): the mean
of --steps steps after --warmup ones, in this process's thread settings, so it shows what a
thread setting or another job on the machine does to the step. With --ops every function of
the backend's kernel table is wrapped with a timer (which adds a little to the step) and the
table lists each one's time per step and calls per step; "rest" is what runs between them
(NumPy copies in the model, Python).
"""
import argparse
import collections
import time

import numpy as np

from fastvae import Config, kernels
from fastvae.model import VAEGAN
from fastvae.state import TrainState


def timed_steps(state, images, steps):
    """Mean seconds of one step over `steps` steps."""
    started = time.perf_counter()
    for _ in range(steps):
        state.step(images)
    return (time.perf_counter() - started) / steps


def wrap_ops(ops, totals, counts):
    """Replace each kernel-table function of `ops` by a timing wrapper (the model calls them
    through the module, so the wrapper sees every call)."""
    def wrapper(name, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            totals[name] += time.perf_counter() - started
            counts[name] += 1
            return result
        return timed

    for name in kernels.OPS + ("to_bf16",):
        function = getattr(ops, name, None)
        if callable(function):
            setattr(ops, name, wrapper(name, function))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ops", action="store_true", help="time each kernel call too")
    args = parser.parse_args(argv)
    config = Config(backend=args.backend, precision=args.precision, batch_size=args.batch_size)
    model = VAEGAN(config)
    state = TrainState(model)
    rng = np.random.default_rng(0)
    images = model.backend.asarray(rng.random((args.batch_size, config.image_size)))
    timed_steps(state, images, args.warmup)
    step = timed_steps(state, images, args.steps)
    print(f"{args.backend} {args.precision}, batch {args.batch_size}: {step * 1e3:.2f} ms a "
          f"step (mean of {args.steps})")
    if not args.ops:
        return
    totals, counts = collections.defaultdict(float), collections.Counter()
    wrap_ops(model.backend.ops, totals, counts)
    timed_steps(state, images, 3)
    totals.clear()
    counts.clear()
    wrapped = timed_steps(state, images, args.steps)
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {name:22s} {seconds / args.steps * 1e3:7.2f} ms  x{counts[name] // args.steps}")
    print(f"  {'rest':22s} {(wrapped - sum(totals.values()) / args.steps) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
