"""`fastvae bench`: run the pytest-benchmark suite and summarise it.

The suite itself lives in the top-level `bench/` folder, installed as `fastvae.benchsuite`;
this module runs it with `pytest.main`, reads the JSON report pytest-benchmark writes, and
prints one table per batch size and dtype:

    backend | time per step (median, and the fastest round) | samples/s | speed-up over numpy |
    time / matrix-product bound | time / PyTorch | GFLOP/s | % of the measured peak

The references come from the same run: `products` is the step's necessary matrix products
alone through the same BLAS (`step_products` lists them from the Config, mirroring
`VAEGAN.compute_gradients`), `peak` a large square matrix product (the machine's peak
product rate), and `torch` a PyTorch eager step with the same passes (only where PyTorch is
importable). FLOPs count the matrix products only (2 m k n each); elementwise work is left out.

Everything that formats, compares or draws takes parsed data and is pure, so it is tested
without running a benchmark.
"""
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastvae.errors import FastvaeError
from fastvae.files import write_atomic

DEFAULT_JSON = "fastvae-bench.json"
DEFAULT_CHART = "fastvae-bench.png"
BATCH_SIZES = (64, 128, 512)
DTYPES = ("float32", "float64")
QUICK_BATCH = 128
# pytest-benchmark settings: rounds = max(min_rounds, max_time / time of one call)
QUICK_TIMING = ("--benchmark-min-rounds=10", "--benchmark-max-time=0.5")
FULL_TIMING = ("--benchmark-min-rounds=10", "--benchmark-max-time=0.2")
STEP_KINDS = ("step", "torch", "products")


# ----- the step's necessary matrix products -----

@dataclass(frozen=True)
class Product:
    """C (m, n) = A (m, k) @ B (k, n); A or B is a transposed view where the step uses one."""

    name: str
    m: int
    k: int
    n: int
    transpose_a: bool = False
    transpose_b: bool = False

    @property
    def flops(self):
        return 2 * self.m * self.k * self.n


def _pairs(sizes):
    return list(zip(sizes[:-1], sizes[1:]))


def _forward(network, layers, rows):
    return [Product(f"{network}.{i} forward", rows, n_in, n_out)
            for i, (n_in, n_out) in enumerate(layers)]


def _backward(network, layers, rows, *, param_grads, input_grad, start=None):
    """Products of NeuralNetwork.backward: per layer, last first, x.T @ g and g @ W.T."""
    start = len(layers) - 1 if start is None else start
    products = []
    for i in range(start, -1, -1):
        n_in, n_out = layers[i]
        if param_grads:
            products.append(Product(f"{network}.{i} grad weight", n_in, rows, n_out,
                                    transpose_a=True))
        if input_grad or i > 0:
            products.append(Product(f"{network}.{i} grad input", rows, n_out, n_in,
                                    transpose_b=True))
    return products


def step_products(config, batch):
    """Every matrix product one `TrainState.step` on `batch` rows computes, in order.

    Mirrors `compute_gradients` / `_adversarial_gradients`: the discriminator runs once on
    (3B, pixels) [real; reconstructions; prior samples], the decoder once on (2B, latent);
    backward passes: discriminator parameters over 3B rows (no first-layer input gradient),
    discriminator input gradient over rows B:3B, decoder parameters over 2B rows, decoder
    input gradient over rows 0:B, then the two encoder heads and the encoder body.
    """
    b = int(batch)
    latent = config.latent_dim
    encoder = _pairs((config.image_size,) + tuple(config.encoder_widths))
    head = [(config.encoder_widths[-1], latent)]
    decoder = _pairs((latent,) + tuple(config.decoder_widths) + (config.image_size,))
    products = _forward("encoder", encoder, b)
    products += _forward("encoder.mu", head, b) + _forward("encoder.log_var", head, b)
    if config.mode == "vae":
        products += _forward("decoder", decoder, b)
        products += _backward("decoder", decoder, b, param_grads=True, input_grad=True)
    else:
        discriminator = _pairs((config.image_size,) + tuple(config.discriminator_widths) + (1,))
        products += _forward("decoder", decoder, 2 * b)
        products += _forward("discriminator", discriminator, 3 * b)
        products += _backward("discriminator", discriminator, 3 * b,
                              param_grads=True, input_grad=False)
        products += _backward("discriminator", discriminator, 2 * b,
                              param_grads=False, input_grad=True)
        if config.reconstruction == "feature":
            layer = config.feature_layer % len(config.discriminator_widths)
            products += _backward("discriminator", discriminator, b, param_grads=False,
                                  input_grad=True, start=layer)
        products += _backward("decoder", decoder, 2 * b, param_grads=True, input_grad=False)
        products += _backward("decoder", decoder, b, param_grads=False, input_grad=True)
    products += _backward("encoder.mu", head, b, param_grads=True, input_grad=True)
    products += _backward("encoder.log_var", head, b, param_grads=True, input_grad=True)
    products += _backward("encoder", encoder, b, param_grads=True, input_grad=False)
    return products


def step_flops(config, batch):
    """Matrix-product FLOPs of one training step (2 m k n per product)."""
    return sum(product.flops for product in step_products(config, batch))


# ----- reading pytest-benchmark JSON -----

def load_records(source):
    """Flat records from a pytest-benchmark JSON report (a path, or the parsed dict)."""
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no benchmark JSON at {path}")
        try:
            source = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a pytest-benchmark JSON report: {error}") from error
    if "benchmarks" not in source:
        raise ValueError("not a pytest-benchmark JSON report: it has no 'benchmarks'")
    records = []
    for bench in source["benchmarks"]:
        info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
        if "median" not in stats:
            continue
        records.append({
            "name": bench["name"],
            "group": bench.get("group"),
            "kind": info.get("kind"),
            "backend": info.get("backend"),
            "device": info.get("device", "cpu"),
            "batch": info.get("batch"),
            "dtype": info.get("dtype"),
            "case": info.get("case"),
            "flops": info.get("flops"),
            "first_call_s": info.get("first_call_s"),
            "median": float(stats["median"]),
            "min": float(stats.get("min", stats["median"])),
            "iqr": float(stats.get("iqr", 0.0)),
            "rounds": int(stats.get("rounds", 0)),
        })
    return records


# ----- the tables -----

_BACKEND_ORDER = {"numpy": 0, "numba": 1, "cupy": 2, "cupy graph": 3}


def _row_label(record):
    if record["kind"] == "products":
        return f"matmul bound ({record['device']})"
    if record["kind"] == "torch":
        return f"torch ({record['device']})"
    return record["backend"]


def _row_order(record):
    kind_order = {"step": 0, "torch": 1, "products": 2}[record["kind"]]
    return (kind_order, _BACKEND_ORDER.get(record["backend"], 9), str(record["backend"]),
            record["device"])


def _ratio(a, b):
    return a / b if a and b else None


def peak_rates(records):
    """{(device, dtype): peak matrix-product rate in FLOP/s, from the fastest round}."""
    return {(r["device"], r["dtype"]): r["flops"] / r["min"]
            for r in records if r["kind"] == "peak" and r["flops"] and r["min"] > 0}


def summarise(records):
    """The step tables: one dict per (batch, dtype), sorted, each with its computed rows."""
    peaks = peak_rates(records)
    steps = [r for r in records if r["kind"] in STEP_KINDS]
    tables = []
    for batch, dtype in sorted({(r["batch"], r["dtype"]) for r in steps}):
        mine = sorted((r for r in steps if r["batch"] == batch and r["dtype"] == dtype),
                      key=_row_order)

        def find(kind, device, backend=None, mine=mine):
            for r in mine:
                if r["kind"] == kind and r["device"] == device and backend in (None, r["backend"]):
                    return r["median"]
            return None

        numpy_time = find("step", "cpu", "numpy")
        rows = []
        for r in mine:
            time = r["median"]
            peak = peaks.get((r["device"], dtype))
            rate = r["flops"] / time if r["flops"] and time > 0 else None
            rows.append({
                "label": _row_label(r), "kind": r["kind"], "backend": r["backend"],
                "device": r["device"], "median": time, "min": r["min"], "iqr": r["iqr"],
                "rounds": r["rounds"],
                "samples_per_s": batch / time if time > 0 else None,
                "speedup": _ratio(numpy_time, time),
                "vs_bound": _ratio(time, find("products", r["device"])),
                "vs_torch": _ratio(time, find("torch", r["device"])),
                "gflops": rate / 1e9 if rate else None,
                "peak_fraction": _ratio(rate, peak),
            })
        tables.append({"batch": batch, "dtype": dtype, "rows": rows,
                       "peaks": {device: rate / 1e9 for (device, of), rate in peaks.items()
                                 if of == dtype}})
    return tables


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def format_seconds(seconds):
    """A duration with a unit that keeps three or four significant digits."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.2f} {unit}"
    return f"{seconds / 1e-9:.0f} ns"


def format_step_table(table):
    """One batch size's table as text."""
    header = ("backend", "time/step", "min", "samples/s", "vs numpy", "/ bound", "/ torch",
              "GFLOP/s", "% peak")
    lines = [[row["label"], format_seconds(row["median"]), format_seconds(row["min"]),
              _fmt(row["samples_per_s"], ",.0f"),
              _fmt(row["speedup"], ".2f", "x"),
              _fmt(row["vs_bound"], ".2f", "x"),
              _fmt(row["vs_torch"], ".2f", "x"),
              _fmt(row["gflops"], ".1f"),
              _fmt(None if row["peak_fraction"] is None else 100 * row["peak_fraction"],
                   ".0f", "%")]
             for row in table["rows"]]
    peaks = ", ".join(f"{rate:.1f} GFLOP/s ({device})" for device, rate
                      in sorted(table["peaks"].items())) or "not measured"
    title = (f"batch {table['batch']}, {table['dtype']}: one training step "
             f"(median); peak matmul {peaks}")
    return _text_table(title, header, lines)


def _text_table(title, header, lines):
    """A title and ruled columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]

    def render(cells):
        return "  ".join([cells[0].ljust(widths[0])]
                         + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])

    rule = "-" * len(render(header))
    return "\n".join([title, rule, render(header), rule] + [render(c) for c in lines] + [rule])


def op_tables(records):
    """Kernel timings: one dict per (batch, dtype) with a row per case and a time per backend."""
    ops = [r for r in records if r["kind"] == "op"]
    tables = []
    for batch, dtype in sorted({(r["batch"], r["dtype"]) for r in ops},
                               key=lambda key: (key[0] is None, key[0] or 0, key[1])):
        mine = [r for r in ops if r["batch"] == batch and r["dtype"] == dtype]
        backends = sorted({r["backend"] for r in mine},
                          key=lambda name: (_BACKEND_ORDER.get(name, 9), name))
        rows = []
        for case in dict.fromkeys(r["case"] for r in mine):
            times = {r["backend"]: r["median"] for r in mine if r["case"] == case}
            rows.append({"case": case, "times": times,
                         "speedups": {name: _ratio(times.get("numpy"), t)
                                      for name, t in times.items()}})
        tables.append({"batch": batch, "dtype": dtype, "backends": backends, "rows": rows})
    return tables


def format_op_table(table):
    """Kernel timings as text: median per backend, speed-up over numpy in brackets."""
    backends = table["backends"]
    header = ["kernel"] + backends
    lines = []
    for row in table["rows"]:
        cells = [row["case"]]
        for name in backends:
            time, speedup = row["times"].get(name), row["speedups"].get(name)
            cell = format_seconds(time)
            if name != "numpy" and speedup is not None:
                cell += f" ({speedup:.2f}x)"
            cells.append(cell)
        lines.append(cells)
    batch = "any batch" if table["batch"] is None else f"batch {table['batch']}"
    return _text_table(f"kernels, {batch}, {table['dtype']} (median; speed-up over numpy)",
                       header, lines)


# ----- comparing two runs -----

def compare_records(old, new):
    """Median of each benchmark in both runs and the change in %; (rows, only_old, only_new)."""
    before = {r["name"]: r for r in old}
    after = {r["name"]: r for r in new}
    rows = []
    for name, record in after.items():
        if name in before and before[name]["median"] > 0:
            old_time, new_time = before[name]["median"], record["median"]
            rows.append({"name": name, "old": old_time, "new": new_time,
                         "change_pct": 100.0 * (new_time / old_time - 1.0)})
    only_old = sorted(set(before) - set(after))
    only_new = sorted(set(after) - set(before))
    return rows, only_old, only_new


def format_comparison(rows, only_old=(), only_new=(), label="saved run"):
    """The comparison as text; a negative change is faster than the saved run."""
    if not rows:
        lines = [f"compared with {label}: no benchmark in common"]
    else:
        width = max(len(row["name"]) for row in rows)
        lines = [f"compared with {label} (median; negative = faster now)",
                 f"{'benchmark'.ljust(width)}  {'before':>10}  {'now':>10}  {'change':>8}"]
        for row in rows:
            lines.append(f"{row['name'].ljust(width)}  {format_seconds(row['old']):>10}  "
                         f"{format_seconds(row['new']):>10}  {row['change_pct']:>+7.1f}%")
    if only_old:
        lines.append(f"only in {label}: {len(only_old)} benchmark(s)")
    if only_new:
        lines.append(f"new in this run: {len(only_new)} benchmark(s)")
    return "\n".join(lines)


# ----- the chart -----

def chart_series(tables):
    """(categories, {label: [speed-up over numpy per category]}) for the bar chart."""
    categories = [f"batch {t['batch']}\n{t['dtype']}" for t in tables]
    series = {}
    for index, table in enumerate(tables):
        for row in table["rows"]:
            if row["speedup"] is None:
                continue
            values = series.setdefault(row["label"], [math.nan] * len(tables))
            values[index] = row["speedup"]
    return categories, series


def draw_chart(tables, path):
    """Bar chart PNG of each backend's speed-up over numpy per batch size; returns the labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    categories, series = chart_series(tables)
    figure = Figure(figsize=(max(6.0, 1.8 * len(categories) + 3), 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for index, (label, values) in enumerate(series.items()):
        positions = [c + (index - (len(series) - 1) / 2) * width for c in range(len(categories))]
        hatch = "//" if label.startswith("matmul bound") else (".." if "torch" in label else None)
        bars = axes.bar(positions, values, width, label=label, hatch=hatch)
        axes.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in values],
                       fontsize=7)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(categories)), categories)
    axes.set_ylabel("speed-up over numpy (training step)")
    axes.set_title("fastvae: one VAE-GAN training step")
    axes.grid(True, axis="y", alpha=0.3)
    if series:
        axes.legend(fontsize=8)
    figure.tight_layout()
    write_atomic(path, lambda handle: figure.savefig(handle, format="png"))
    return list(series)


# ----- running the suite -----

def suite_dir():
    """The folder of the installed benchmark suite (`fastvae.benchsuite`)."""
    try:
        import fastvae.benchsuite as suite
    except ImportError:
        suite = None
    if suite is not None and suite.__file__:
        return Path(suite.__file__).resolve().parent
    checkout = Path(__file__).resolve().parents[1] / "bench"  # a source checkout
    if (checkout / "bench_step.py").is_file():
        return checkout
    raise FileNotFoundError("the benchmark suite (fastvae.benchsuite) is not installed")


def _dtypes(dtype):
    if dtype in (None, "all"):
        return DTYPES
    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: choose float32, float64 or all")
    return dtypes


def pytest_args(suite, json_path, ini_path, quick=False, backends=None, batch_sizes=None,
                dtype="float32", extra=()):
    """The command line `run` hands to pytest.main."""
    from fastvae import kernels

    args = [str(suite), "-c", str(ini_path), "--rootdir", str(suite), "-p", "no:cacheprovider",
            "--import-mode=importlib", "-q", "-rfE", "--benchmark-enable", "--benchmark-quiet",
            f"--benchmark-json={json_path}"]
    args += QUICK_TIMING if quick else FULL_TIMING
    if quick:
        args.append("--fastvae-quick")
    for name in backends or ():
        if name not in kernels.names():
            raise ValueError(f"unknown backend {name!r}: choose from {', '.join(kernels.names())}")
        args.append(f"--fastvae-backend={name}")
    for batch in batch_sizes or ():
        if int(batch) < 1:
            raise ValueError(f"batch sizes must be positive, got {batch}")
        args.append(f"--fastvae-batch={int(batch)}")
    for name in _dtypes(dtype):
        args.append(f"--fastvae-dtype={name}")
    return args + list(extra)


def machine_line(machine_info, load=None):
    """One line on the machine: CPU, cores, and the load (timings on a busy machine vary)."""
    cpu = machine_info.get("cpu") or {}
    if load is None and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
    parts = [cpu.get("brand_raw") or machine_info.get("processor") or "unknown CPU",
             f"{os.cpu_count()} cores" if cpu.get("count") is None else f"{cpu['count']} cores"]
    if load is not None:
        parts.append(f"load average {load:.1f} (busy machines give noisy timings)")
    return "machine: " + ", ".join(parts)


def run(quick=False, backends=None, batch_sizes=None, dtype="float32", json_path=DEFAULT_JSON,
        compare=None, chart_path=DEFAULT_CHART, extra_pytest_args=(), stream=None):
    """Run the suite, save its JSON, print the tables (and the comparison), draw the chart.

    `backends` restricts the fastvae backends (the references always run); `batch_sizes`
    defaults to 64, 128 and 512 (128 with `quick`); `dtype` is float32, float64 or all.
    Returns a dict: records, tables, op_tables, comparison, json_path, chart_path, exit_code.
    """
    try:
        import pytest
        import pytest_benchmark  # noqa: F401  (the plugin the suite's timings come from)
    except ImportError as error:
        raise FastvaeError(f"fastvae bench needs pytest and pytest-benchmark ({error}): "
                           f"pip install 'fastvae[dev]'") from error

    stream = stream or sys.stdout
    saved = load_records(compare) if compare else None  # read first: the run may overwrite it
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if json_path.exists():
        json_path.unlink()
    with tempfile.TemporaryDirectory(prefix="fastvae-bench-") as folder:
        ini = Path(folder) / "pytest.ini"
        ini.write_text("[pytest]\npython_files = bench_*.py\n")
        args = pytest_args(suite_dir(), json_path.resolve(), ini, quick, backends, batch_sizes,
                           dtype, extra_pytest_args)
        exit_code = int(pytest.main(args))
    if not json_path.is_file():
        raise RuntimeError(f"the benchmark suite wrote no results (pytest exit code {exit_code})")
    records = load_records(json_path)
    tables, ops = summarise(records), op_tables(records)
    print(file=stream)
    print(machine_line(json.loads(json_path.read_text()).get("machine_info") or {}), file=stream)
    for table in ops:
        print(format_op_table(table) + "\n", file=stream)
    for table in tables:
        print(format_step_table(table) + "\n", file=stream)
    comparison = None
    if saved is not None:
        comparison = compare_records(saved, records)
        print(format_comparison(*comparison, label=str(compare)) + "\n", file=stream)
    if chart_path:
        draw_chart(tables, chart_path)
    print(f"results: {json_path}" + (f"; chart: {chart_path}" if chart_path else ""), file=stream)
    if exit_code != 0:
        print(f"some benchmarks failed (pytest exit code {exit_code})", file=stream)
    return {"records": records, "tables": tables, "op_tables": ops, "comparison": comparison,
            "json_path": json_path, "chart_path": Path(chart_path) if chart_path else None,
            "exit_code": exit_code}


# ----- the command line -----

def add_arguments(parser):
    """Flags of `fastvae bench`."""
    parser.add_argument("--quick", action="store_true",
                        help="batch 128, float32, the training step and its references only")
    parser.add_argument("--backend", action="append",
                        help="benchmark this backend (repeatable; default: every one found)")
    parser.add_argument("--batch-size", action="append", type=int,
                        help="batch size (repeatable; default 64, 128, 512; 128 with --quick)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES + ("all",),
                        help="float32 (default), float64 or all")
    parser.add_argument("--json", default=DEFAULT_JSON,
                        help=f"save the pytest-benchmark JSON here (default {DEFAULT_JSON})")
    parser.add_argument("--compare", help="a saved JSON to compare this run with")
    parser.add_argument("--chart", default=DEFAULT_CHART,
                        help=f"bar chart PNG of the speed-ups (default {DEFAULT_CHART})")
    return parser


def main(args):
    """Run `fastvae bench` from parsed arguments; 0 when every benchmark ran."""
    results = run(quick=args.quick, backends=args.backend, batch_sizes=args.batch_size,
                  dtype=args.dtype, json_path=args.json, compare=args.compare,
                  chart_path=args.chart)
    return 0 if results["exit_code"] == 0 else 1
