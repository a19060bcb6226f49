"""Running `fastvae bench`: the pytest-benchmark suite through `pytest.main`, then the report.

The suite itself lives in the top-level `bench/` folder, installed as `fastvae.benchsuite`.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

from fastvae.bench.chart import draw_chart
from fastvae.bench.report import (
    compare_records,
    format_comparison,
    format_op_table,
    format_step_table,
    format_targets,
    load_records,
    op_tables,
    summarise,
)
from fastvae.errors import FastvaeError

DEFAULT_JSON = "fastvae-bench.json"
DEFAULT_CHART = "fastvae-bench.png"
BATCH_SIZES = (64, 128, 512)
DTYPES = ("float32", "float64")
PRECISIONS = ("fp32", "bf16")
QUICK_BATCH = 128
# pytest-benchmark settings: rounds = max(min_rounds, max_time / time of one call)
QUICK_TIMING = ("--benchmark-min-rounds=10", "--benchmark-max-time=0.5")
FULL_TIMING = ("--benchmark-min-rounds=10", "--benchmark-max-time=0.2")


def suite_dir():
    """The folder of the installed benchmark suite (`fastvae.benchsuite`)."""
    try:
        import fastvae.benchsuite as suite
    except ImportError:
        suite = None
    if suite is not None and suite.__file__:
        return Path(suite.__file__).resolve().parent
    checkout = Path(__file__).resolve().parents[2] / "bench"  # a source checkout
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


def _precisions(precision):
    if precision in (None, "all"):
        return PRECISIONS
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose fp32, bf16 or all")
    return (precision,)


def pytest_args(suite, json_path, ini_path, quick=False, backends=None, batch_sizes=None,
                dtype="float32", extra=(), precision="all"):
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
    for name in _precisions(precision):
        args.append(f"--fastvae-precision={name}")
    return args + list(extra)


def machine_line(machine_info, load=None):
    """One line on the machine: CPU, cores, and the load averages over 1, 5 and 15 minutes
    (timings on a busy machine vary); `load` is one number or the three."""
    cpu = machine_info.get("cpu") or {}
    if load is None and hasattr(os, "getloadavg"):
        load = os.getloadavg()
    parts = [cpu.get("brand_raw") or machine_info.get("processor") or "unknown CPU",
             f"{os.cpu_count()} cores" if cpu.get("count") is None else f"{cpu['count']} cores"]
    if load is not None:
        loads = (load,) if isinstance(load, (int, float)) else tuple(load)
        parts.append(f"load average {' '.join(f'{value:.1f}' for value in loads)} "
                     "(busy machines give noisy timings)")
    return "machine: " + ", ".join(parts)


def products_line():
    """Which library computes the numba backend's products, and its threading."""
    try:
        from fastvae.kernels import numba_cpu
    except ImportError:
        return "products: numba is not installed"
    if numba_cpu.unavailable_reason():
        return "products: numba is not installed"
    import numba
    threads = os.environ.get("MKL_THREADING_LAYER", "default")
    return (f"numba products: {numba_cpu.products_library()}; MKL_THREADING_LAYER={threads}, "
            f"numba threading layer {numba.config.THREADING_LAYER}, "
            f"{'parallel' if numba_cpu.PARALLEL else 'serial'} element-wise kernels")


def run(quick=False, backends=None, batch_sizes=None, dtype="float32", json_path=DEFAULT_JSON,
        compare=None, chart_path=DEFAULT_CHART, extra_pytest_args=(), stream=None,
        precision="all"):
    """Run the suite, save its JSON, print the tables (and the comparison), draw the chart.

    `backends` restricts the fastvae backends (the references always run); `batch_sizes`
    defaults to 64, 128 and 512 (128 with `quick`); `dtype` is float32, float64 or all;
    `precision` fp32, bf16 or all (bf16 where a backend can).
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
                           dtype, extra_pytest_args, precision)
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        exit_code = int(pytest.main(args))
    if not json_path.is_file():
        raise RuntimeError(f"the benchmark suite wrote no results (pytest exit code {exit_code})")
    records = load_records(json_path)
    tables, ops = summarise(records), op_tables(records)
    print(file=stream)
    machine = json.loads(json_path.read_text()).get("machine_info") or {}
    if load_before is not None:
        print(machine_line(machine, load_before).replace("load average", "load before"),
              file=stream)
    print(machine_line(machine), file=stream)
    print(products_line(), file=stream)
    for table in ops:
        print(format_op_table(table) + "\n", file=stream)
    for table in tables:
        print(format_step_table(table) + "\n", file=stream)
        targets = format_targets(table)
        if targets:
            print(targets + "\n", file=stream)
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
    parser.add_argument("--precision", default="all", choices=PRECISIONS + ("all",),
                        help="products in fp32, bf16 or all (default; bf16 where a backend can)")
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
                  chart_path=args.chart, precision=args.precision)
    return 0 if results["exit_code"] == 0 else 1
