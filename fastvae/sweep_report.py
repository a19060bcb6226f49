"""What a sweep found: its trials as rows, Pareto-optimal (or best) first, a CSV of every
trial, and a PNG of the Pareto front with each point labelled by its settings."""
import csv
import io
import math
from pathlib import Path

from fastvae.files import write_atomic
from fastvae.sweep import counted, progress, retried_numbers

CSV = "trials.csv"
FRONT = "pareto.png"

SHORT = {"gamma": "γ", "latent_dim": "z", "lr_encoder": "lr_e", "lr_decoder": "lr_d",
         "lr_discriminator": "lr_D", "reconstruction": "rec"}
STATES = {"COMPLETE": "done", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting",
          "PRUNED": "surplus"}


def dominates(a, b):
    """Whether point `a` is at least as good as `b` everywhere and better somewhere (both
    already signed so that smaller is better)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_ranks(points):
    """Rank of each point by non-dominated sorting: 1 for the Pareto front, 2 for the front of
    the rest, and so on (smaller is better in every coordinate)."""
    ranks, left, rank = [0] * len(points), set(range(len(points))), 1
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def trial_rows(trials, settings):
    """One dict per trial: number, state, Pareto rank (finished trials), the swept settings,
    the objectives and every other measure, seconds, error; ordered best first, then the
    unfinished, the failed and the retried ones."""
    retried = retried_numbers(trials)
    kept = {t.number for t in counted(trials)}
    rows = []
    for trial in trials:
        metrics = trial.user_attrs.get("metrics", {}) if trial.state.name == "COMPLETE" else {}
        state = STATES[trial.state.name]
        if trial.state.name == "FAIL" and trial.number in retried:
            state = "retried"
        error = trial.user_attrs.get("error") or "worker lost (no heartbeat)"
        row = {"trial": trial.number, "state": state, "rank": None,
               "retry_of": trial.system_attrs.get("failed_trial"),
               **{p.name: trial.params.get(p.name) for p in settings.space},
               **{o.metric: metrics.get(o.metric) for o in settings.objectives},
               "seconds": trial.user_attrs.get("seconds") if metrics else None,
               "train_seconds": trial.user_attrs.get("train_seconds") if metrics else None,
               "eval_seconds": trial.user_attrs.get("eval_seconds") if metrics else None,
               "wall_seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
               if metrics and trial.datetime_start else None,
               "error": error if trial.state.name == "FAIL" else "",
               "run_dir": trial.user_attrs.get("run_dir", ""), "counted": trial.number in kept}
        row.update({key: value for key, value in metrics.items() if key not in row})
        rows.append(row)
    done = [row for row in rows if row["state"] == "done"]
    signs = [1 if o.direction == "minimize" else -1 for o in settings.objectives]
    points = [[s * row[o.metric] for s, o in zip(signs, settings.objectives)] for row in done]
    for row, rank in zip(done, pareto_ranks(points)):
        row["rank"] = rank
    order = {"done": 0, "running": 1, "waiting": 2, "failed": 3, "retried": 4, "surplus": 5}
    first = settings.objectives[0]
    return sorted(rows, key=lambda row: (
        order[row["state"]], row["rank"] or 0,
        (1 if first.direction == "minimize" else -1) * (row[first.metric] or 0), row["trial"]))


def _number(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def format_table(rows, settings):
    """The rows as a plain-text table (rank 1 is the Pareto front)."""
    columns = (["trial", "state", "rank"] + [p.name for p in settings.space]
               + [o.metric for o in settings.objectives] + ["seconds", "error"])
    cells = [[_number(row[c]) if c != "error" else row["error"][:60] for c in columns]
             for row in rows if row["state"] != "surplus"]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)


def write_csv(path, rows):
    """Every trial, every column (the union over the rows), atomically."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda file: file.write(text.getvalue().encode()))


def label(row, settings):
    """A point's settings in a few characters: `#3 γ=0.12 z=32`."""
    short = lambda value: f"{value:.2g}" if isinstance(value, float) else str(value)
    return f"#{row['trial']} " + " ".join(f"{SHORT.get(p.name, p.name)}={short(row[p.name])}"
                                          for p in settings.space)


def plot_front(path, rows, settings):
    """The finished trials on the first two objectives (one objective: against the trial
    number), the Pareto front joined and marked, every point labelled with its settings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [row for row in rows if row["state"] == "done"]
    if not done:
        return False
    objectives = settings.objectives
    x_key, y_key = ("trial", objectives[0].metric) if len(objectives) == 1 else \
        (objectives[0].metric, objectives[1].metric)
    figure = Figure(figsize=(10, 7), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rest = [row for row in done if row["rank"] != 1]
    front = sorted((row for row in done if row["rank"] == 1), key=lambda row: row[x_key])
    axes.scatter([r[x_key] for r in rest], [r[y_key] for r in rest], color="0.6",
                 label="dominated trials")
    axes.plot([r[x_key] for r in front], [r[y_key] for r in front], "o-", color="C3",
              label="Pareto front" if len(objectives) > 1 else "best")
    for row in done:
        axes.annotate(label(row, settings), (row[x_key], row[y_key]), fontsize=6,
                      xytext=(4, 3), textcoords="offset points",
                      color="C3" if row["rank"] == 1 else "0.35")
    axes.set_xlabel(f"{x_key} ({objectives[0].direction[:3]})" if x_key != "trial" else "trial")
    axes.set_ylabel(f"{y_key} ({objectives[-1].direction[:3]})")
    if all(row[key] > 0 for row in done for key in (x_key, y_key) if key != "trial"):
        axes.set_yscale("log")            # a few bad trials must not squash the front
        if x_key != "trial":
            axes.set_xscale("log")
    axes.set_title(f"{len(done)} trials, {len(front)} on the Pareto front")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_atomic(path, lambda handle: figure.savefig(handle, format="png"))
    return True


def report(sweep, folder=None):
    """The sweep's progress and table as text; writes trials.csv and pareto.png to `folder`
    (default: the sweep's folder)."""
    study, settings = sweep.study()
    trials = study.get_trials(deepcopy=False)
    rows = trial_rows(trials, settings)
    folder = Path(folder or sweep.folder)
    write_csv(folder / CSV, rows)
    written = [folder / CSV] + ([folder / FRONT] if plot_front(folder / FRONT, rows, settings)
                                else [])
    counts = progress(trials)
    goal = " and ".join(o.text() for o in settings.objectives)
    return "\n".join([
        f"sweep {sweep.study_name} in {sweep.where()}: {counts['done']} done, "
        f"{counts['failed']} failed, {counts['running']} running, {counts['waiting']} waiting; "
        f"objectives {goal} (rank 1: the Pareto front)",
        format_table(rows, settings),
        "wrote " + ", ".join(str(path) for path in written)])
