"""The report of `fastvae bench`: pytest-benchmark's JSON read back into tables and ratios.

One table per batch size and dtype, a row per contender:

    contender | time per step (median, and the fastest round) | samples/s | speed-up over numpy |
    time / products-alone bound | time / PyTorch autograd | GFLOP/s | % of the measured peak

Contenders: each backend's training step (numba in fp32 and bf16, and with serial kernels for
the thread-pool comparison), the PyTorch references (autograd as users write it, in fp32 and
under bf16 autocast, and the hand-written backward), and the products-alone bounds (the step's
products through NumPy's BLAS, oneMKL fp32 and oneMKL bf16). Below each table, the ratios the
issue's targets are stated in. FLOPs count the matrix products only (2 m k n each).

Everything here takes parsed data and is pure, so it is tested without running a benchmark.
"""
import json
from pathlib import Path

STEP_KINDS = ("step", "torch", "products")
# the products-alone bounds the suite measures: its parameter -> the row's label
PRODUCT_PATHS = {"blas": "products NumPy BLAS fp32", "onemkl": "products oneMKL fp32",
                 "onemkl-bf16": "products oneMKL bf16"}
# (name, numerator, denominator, {batch: target}): the ratios `fastvae bench` reports
TARGETS = (
    ("numba bf16 / torch autograd bf16-autocast", "numba bf16", "torch autograd bf16-autocast",
     {128: 0.6, 512: 0.8}),
    ("numba bf16 / its bf16 products alone", "numba bf16", PRODUCT_PATHS["onemkl-bf16"], {}),
    ("numba fp32 / torch autograd fp32", "numba", "torch autograd", {128: 0.8, 512: 0.8}),
    ("numba fp32 / torch hand-written fp32", "numba", "torch hand-written", {128: 1.0, 512: 1.0}),
    ("numba fp32 / its fp32 products alone", "numba", PRODUCT_PATHS["onemkl"], {}),
    ("numba fp32 parallel / serial kernels", "numba", "numba serial", {}),
    ("numba bf16 parallel / serial kernels", "numba bf16", "numba bf16 serial", {}),
)


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
            "precision": info.get("precision", "fp32"),
            "label": info.get("label"),
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
    """The row's name: given by the benchmark (`label`), else made from kind and backend."""
    if record.get("label"):
        return record["label"]
    if record["kind"] == "products":
        return f"matmul bound ({record['device']})"
    if record["kind"] == "torch":
        return f"torch ({record['device']})"
    return record["backend"]


def _row_order(record):
    kind_order = {"step": 0, "torch": 1, "products": 2}[record["kind"]]
    return (kind_order, _BACKEND_ORDER.get(record["backend"], 9),
            record.get("precision", "fp32") != "fp32", _row_label(record), record["device"])


def _ratio(a, b):
    return a / b if a and b else None


def peak_rates(records):
    """{(device, dtype): peak matrix-product rate in FLOP/s, from the fastest round}."""
    return {(r["device"], r["dtype"]): r["flops"] / r["min"]
            for r in records if r["kind"] == "peak" and r["flops"] and r["min"] > 0}


def _torch_reference(mine, record):
    """The PyTorch step a row is compared with: autograd at the row's precision (autocast for
    bf16) on its device, else any PyTorch step there."""
    torch_rows = [r for r in mine if r["kind"] == "torch" and r["device"] == record["device"]]
    wanted = "torch autograd bf16-autocast" if record.get("precision") == "bf16" else \
        "torch autograd"
    for r in torch_rows:
        if r.get("label") == wanted:
            return r["median"]
    return torch_rows[0]["median"] if torch_rows else None


def _bound(mine, record):
    """The fastest products-alone bound at the row's device and precision."""
    times = [r["median"] for r in mine if r["kind"] == "products"
             and r["device"] == record["device"]
             and r.get("precision", "fp32") == record.get("precision", "fp32")]
    return min(times) if times else None


def summarise(records):
    """The step tables: one dict per (batch, dtype), sorted, each with its computed rows and
    the target ratios."""
    peaks = peak_rates(records)
    steps = [r for r in records if r["kind"] in STEP_KINDS]
    tables = []
    for batch, dtype in sorted({(r["batch"], r["dtype"]) for r in steps}):
        mine = sorted((r for r in steps if r["batch"] == batch and r["dtype"] == dtype),
                      key=_row_order)
        numpy_time = next((r["median"] for r in mine if r["kind"] == "step"
                           and r["backend"] == "numpy" and r["device"] == "cpu"
                           and r.get("precision", "fp32") == "fp32"), None)
        rows = []
        for r in mine:
            time = r["median"]
            peak = peaks.get((r["device"], dtype))
            rate = r["flops"] / time if r["flops"] and time > 0 else None
            rows.append({
                "label": _row_label(r), "kind": r["kind"], "backend": r["backend"],
                "device": r["device"], "precision": r.get("precision", "fp32"),
                "median": time, "min": r["min"], "iqr": r["iqr"], "rounds": r["rounds"],
                "samples_per_s": batch / time if time > 0 else None,
                "speedup": _ratio(numpy_time, time),
                "vs_bound": _ratio(time, _bound(mine, r)),
                "vs_torch": _ratio(time, _torch_reference(mine, r)),
                "gflops": rate / 1e9 if rate else None,
                "peak_fraction": _ratio(rate, peak),
            })
        tables.append({"batch": batch, "dtype": dtype, "rows": rows,
                       "targets": target_ratios(rows, batch),
                       "peaks": {device: rate / 1e9 for (device, of), rate in peaks.items()
                                 if of == dtype}})
    return tables


def target_ratios(rows, batch):
    """The issue's ratios that this table's rows allow: (name, ratio, target or None)."""
    times = {row["label"]: row["median"] for row in rows}
    found = []
    for name, numerator, denominator, targets in TARGETS:
        ratio = _ratio(times.get(numerator), times.get(denominator))
        if ratio is not None:
            found.append((name, ratio, targets.get(batch)))
    return found


def format_targets(table):
    """The target ratios as text lines ("-" where the run had no such pair)."""
    lines = []
    for name, ratio, target in table.get("targets", ()):
        verdict = "" if target is None else (f" (target <= {target:.1f}: "
                                             f"{'met' if ratio <= target else 'not met'})")
        lines.append(f"  {name}: {ratio:.2f}x{verdict}")
    return "\n".join(["ratios, batch " + str(table["batch"]) + ":"] + lines) if lines else ""


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
    header = ("contender", "time/step", "min", "samples/s", "vs numpy", "/ bound", "/ torch",
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


