#!/usr/bin/env bash
# The sweep's overhead and its 2-worker speed-up, with bench/sweep_speed.toml's trials (small
# trainings over gamma alone, so every trial costs the same whichever values are drawn):
#   1. N trials by `fastvae sweep` with 1 worker (pinned to 1 thread, and unpinned) and with
#      2 workers pinned to 1 thread each: wall time and trials per hour of each;
#   2. the same N trials (their settings from the 1-worker sweep) by `fastvae train` then
#      `fastvae evaluate` with the sweep's evaluation settings, one after the other.
# usage: bash bench/sweep_speed.sh [OUT_DIR (default /tmp/sweep-speed)] [N (default 8)]
# Needs the evaluation classifier cached (any earlier `fastvae sweep`/`evaluate` trains it).
# Run it on a quiet machine (`cat /proc/loadavg` near 0): other jobs on the cores make
# OpenMP's threads wait on each other and the timings mean nothing.
set -euo pipefail
out=${1:-/tmp/sweep-speed}
trials=${2:-8}
rm -rf "$out" && mkdir -p "$out"

seconds() {   # wall seconds of a command, its output into $out/log
    local start end
    start=$(date +%s.%N)
    "$@" >>"$out/log" 2>&1
    end=$(date +%s.%N)
    python3 -c "print(f'{$end - $start:.1f}')"
}

line() {  # label, seconds
    python3 -c "print(f'$1: $trials trials in $2 s, {3600 * $trials / $2:.0f} trials/h, ' \
                      f'load average $(cut -d' ' -f1-3 /proc/loadavg)')"
}

for setup in "1 1" "1 0" "2 1"; do
    read -r workers threads <<<"$setup"
    wall=$(seconds fastvae sweep --config bench/sweep_speed.toml --run-dir "$out/w$workers-t$threads" \
                   --trials "$trials" --workers "$workers" --threads "$threads")
    line "fastvae sweep, $workers worker(s), threads ${threads/#0/unpinned}" "$wall"
done

export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
total=0
while IFS=, read -r number flags evaluation; do
    # shellcheck disable=SC2086
    train=$(seconds fastvae train $flags --quiet --run-dir "$out/train-$number")
    # shellcheck disable=SC2086
    evaluate=$(seconds fastvae evaluate --checkpoint "$out/train-$number/checkpoint.npz" \
                       $evaluation)
    total=$(python3 -c "print($total + $train + $evaluate)")
done < <(python3 - "$out/w1-t1/trials.csv" bench/sweep_speed.toml <<'EOF'
# Each done trial as "number,train flags,evaluate flags": the file's fixed settings with the
# trial's swept values, and the sweep's own evaluation settings.
import csv, sys
from fastvae.sweep import SweepSettings, read_sweep_file
fixed, table = read_sweep_file(sys.argv[2])
settings = SweepSettings(space=table.pop("space"), **table)
def flag(key, value):
    return f"--{key.replace('_', '-')} {value}"
evaluation = (f"--limit {settings.eval_images} --samples {settings.eval_images} "
              f"--k {settings.eval_k} --kid-subsets {settings.kid_subsets}")
for row in csv.DictReader(open(sys.argv[1])):
    if row["state"] == "done":
        flags = [flag(k, v) for k, v in fixed.items()]
        flags += [flag(p.name, row[p.name]) for p in settings.space]
        print(f"{row['trial']},{' '.join(flags)},{evaluation}")
EOF
)
line "fastvae train + fastvae evaluate, one by one, 1 thread" "$(printf %.1f "$total")"
python3 - "$out/w1-t1/trials.csv" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["state"] == "done"]
inside = sum(float(r["train_seconds"]) + float(r["eval_seconds"]) for r in rows)
wall = sum(float(r["wall_seconds"]) for r in rows)
print(f"1-worker sweep: {wall:.1f} s in its trials (Optuna's start to end), of which "
      f"{inside:.1f} s training and evaluating: {100 * (wall - inside) / inside:.2f} % around them")
EOF
