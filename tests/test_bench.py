"""fastvae.bench: the product list, the tables, the comparison, the chart and one quick run."""
import argparse
import io
import json
import math

import numpy as np
import pytest

from fastvae import bench
from fastvae.backend import Backend
from fastvae.config import Config
from fastvae.model import VAEGAN
from fastvae.state import TrainState

# ----- the matrix-product bound is traced from the model's step -----

class MatmulSpy:
    """The numpy kernels, recording every product dense_forward / dense_backward computes
    (independently of the library's tracer: shapes only, at another dtype)."""

    def __init__(self, ops):
        self._ops = ops
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def dense_forward(self, x, weight, bias, activation, out):
        self.calls.append((x.shape[0], x.shape[1], weight.shape[1], False, False))
        return self._ops.dense_forward(x, weight, bias, activation, out)

    def dense_backward(self, grad_out, x, y, weight, activation, grad_weight, grad_bias,
                       grad_in, scratch):
        if grad_weight is not None:
            self.calls.append((x.shape[1], x.shape[0], grad_out.shape[1], True, False))
        if grad_in is not None:
            self.calls.append((grad_out.shape[0], grad_out.shape[1], weight.shape[0], False, True))
        return self._ops.dense_backward(grad_out, x, y, weight, activation, grad_weight,
                                        grad_bias, grad_in, scratch)


SMALL = dict(image_size=30, latent_dim=6, encoder_widths=(20, 12), decoder_widths=(9, 14),
             discriminator_widths=(16, 8, 5))


@pytest.mark.parametrize("config", [
    Config(**SMALL),
    Config(**SMALL, reconstruction="feature", feature_layer=1),
    Config(**SMALL, reconstruction="feature"),
    Config(**SMALL, mode="vae"),
    Config(image_size=30, latent_dim=4, encoder_widths=(7,), decoder_widths=(),
           discriminator_widths=(3,), activation="identity"),
], ids=["vaegan", "feature-1", "feature-last", "vae", "shallow"])
def test_step_products_are_the_models_products(config):
    backend = Backend("numpy", "float64", seed=0)
    spy = backend.ops = MatmulSpy(backend.ops)
    model = VAEGAN(config, backend)
    batch = 5
    x = backend.asarray(np.random.default_rng(0).random((batch, config.image_size)))
    state = TrainState(model)
    spy.calls.clear()
    state.step(x)
    planned = [(p.m, p.k, p.n, p.transpose_a, p.transpose_b)
               for p in bench.step_products(config, batch)]
    assert planned == spy.calls
    assert bench.step_flops(config, batch) == sum(2 * m * k * n for m, k, n, _, _ in spy.calls)


def test_traced_products_are_named_by_layer():
    products = bench.step_products(Config(**SMALL), 4)
    names = [p.name for p in products]
    assert names[:4] == ["encoder.0 forward", "encoder.1 forward", "encoder.mu forward",
                         "encoder.log_var forward"]
    assert "discriminator.2 grad weight" in names and "layer" not in " ".join(names)


def test_default_step_flops_scale_with_the_batch():
    config = Config()
    assert bench.step_flops(config, 256) == 2 * bench.step_flops(config, 128)
    products = bench.step_products(config, 128)
    # 10 forwards; backward: discriminator 3 weight + 2 input gradients, its input-gradient
    # pass for the generator 3, decoder 3 + 2, its pass to z 3, heads 2 + 2, encoder 2 + 1
    assert len(products) == 10 + 5 + 3 + 5 + 3 + 4 + 3
    names = [p.name for p in products]
    assert "discriminator.0 forward" in names
    first = products[names.index("discriminator.0 forward")]
    width = config.discriminator_widths[0]
    assert (first.m, first.k, first.n) == (3 * 128, 784, width)
    # the input gradient of the discriminator's first layer: the fake images only (2B rows)
    grad_inputs = [p for p in products if p.name == "discriminator.0 grad input"]
    assert [(p.m, p.k, p.n, p.transpose_b) for p in grad_inputs] == [(256, width, 784, True)]


# ----- a synthetic pytest-benchmark report -----

def entry(name, median, kind, backend, batch=128, dtype="float32", device="cpu", flops=None,
          case=None):
    return {"name": name, "group": f"g:{batch}:{dtype}", "fullname": f"bench/x.py::{name}",
            "extra_info": {"kind": kind, "backend": backend, "device": device, "batch": batch,
                           "dtype": dtype, "flops": flops, "case": case},
            "stats": {"median": median, "min": median * 0.9, "iqr": median * 0.1,
                      "rounds": 10}}


FLOPS = 2_000_000_000


@pytest.fixture
def report():
    return {"machine_info": {}, "benchmarks": [
        entry("test_step[numpy-b128-float32]", 0.040, "step", "numpy", flops=FLOPS),
        entry("test_step[numba-b128-float32]", 0.020, "step", "numba", flops=FLOPS),
        entry("test_products[cpu-b128-float32]", 0.010, "products", "numpy", flops=FLOPS),
        entry("test_torch_step[cpu-b128-float32]", 0.025, "torch", "torch", flops=FLOPS),
        entry("test_peak_matmul[cpu-float32]", 0.010, "peak", "numpy", batch=None,
              flops=4 * FLOPS),
        entry("test_step[numpy-b64-float32]", 0.030, "step", "numpy", batch=64, flops=FLOPS // 2),
        entry("test_dense_forward[numpy-b128-float32-encoder.0]", 2e-4, "op", "numpy",
              case="dense_forward encoder.0"),
        entry("test_dense_forward[numba-b128-float32-encoder.0]", 1e-4, "op", "numba",
              case="dense_forward encoder.0"),
        entry("test_optimizer[numpy-float32-adam]", 3e-3, "op", "numpy", batch=None,
              case="adam_update encoder"),
    ]}


def test_load_records_reads_stats_and_extra_info(report, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    records = bench.load_records(path)
    assert len(records) == 9
    numba = next(r for r in records if r["backend"] == "numba" and r["kind"] == "step")
    assert numba["median"] == 0.020 and numba["batch"] == 128 and numba["flops"] == FLOPS
    assert records == bench.load_records(report)
    with pytest.raises(ValueError, match="benchmarks"):
        bench.load_records({"nothing": []})
    with pytest.raises(FileNotFoundError):
        bench.load_records(tmp_path / "missing.json")


def test_summarise_pairs_backends_bound_torch_and_peak(report):
    tables = bench.summarise(bench.load_records(report))
    assert [(t["batch"], t["dtype"]) for t in tables] == [(64, "float32"), (128, "float32")]
    table = tables[1]
    rows = {row["label"]: row for row in table["rows"]}
    assert list(rows) == ["numpy", "numba", "torch (cpu)", "matmul bound (cpu)"]
    numba = rows["numba"]
    assert numba["speedup"] == pytest.approx(2.0)
    assert numba["vs_bound"] == pytest.approx(2.0)
    assert numba["vs_torch"] == pytest.approx(0.8)
    assert numba["samples_per_s"] == pytest.approx(128 / 0.020)
    assert numba["gflops"] == pytest.approx(100.0)
    assert table["peaks"] == {"cpu": pytest.approx(8.0 / 0.009)}  # peak: the fastest round
    assert numba["peak_fraction"] == pytest.approx(100.0 * 0.009 / 8.0)
    assert rows["matmul bound (cpu)"]["vs_bound"] == pytest.approx(1.0)
    assert rows["numpy"]["speedup"] == pytest.approx(1.0)
    # batch 64 has no bound or torch: those ratios are missing, not made up
    only = tables[0]["rows"][0]
    assert only["speedup"] == pytest.approx(1.0) and only["vs_bound"] is None
    assert only["vs_torch"] is None


def test_format_step_table(report):
    table = bench.summarise(bench.load_records(report))[1]
    text = bench.format_step_table(table)
    lines = text.splitlines()
    assert lines[0].startswith("batch 128, float32") and "888.9 GFLOP/s (cpu)" in lines[0]
    numba = next(line for line in lines if line.startswith("numba"))
    assert numba.split() == ["numba", "20.00", "ms", "18.00", "ms", "6,400", "2.00x", "2.00x", "0.80x",
                             "100.0", "11%"]
    bound = next(line for line in lines if line.startswith("matmul bound"))
    assert "1.00x" in bound and "4.00x" in bound
    numpy64 = bench.format_step_table(bench.summarise(bench.load_records(report))[0])
    assert numpy64.splitlines()[4].split()[7:9] == ["-", "-"]  # no bound, no torch at 64
    no_peak = dict(table, peaks={})
    assert "peak matmul not measured" in bench.format_step_table(no_peak)


def test_format_seconds():
    assert bench.format_seconds(1.5) == "1.50 s"
    assert bench.format_seconds(0.0275) == "27.50 ms"
    assert bench.format_seconds(3.2e-5) == "32.00 us"
    assert bench.format_seconds(5e-8) == "50 ns"
    assert bench.format_seconds(None) == "-"


def test_op_tables(report):
    tables = bench.op_tables(bench.load_records(report))
    assert [(t["batch"], t["dtype"]) for t in tables] == [(128, "float32"), (None, "float32")]
    row = tables[0]["rows"][0]
    assert row["case"] == "dense_forward encoder.0"
    assert row["speedups"]["numba"] == pytest.approx(2.0)
    text = bench.format_op_table(tables[0])
    assert "200.00 us" in text and "100.00 us (2.00x)" in text
    assert "any batch" in bench.format_op_table(tables[1])


def test_compare_records(report):
    new = bench.load_records(report)
    old_report = json.loads(json.dumps(report))
    for item in old_report["benchmarks"]:
        item["stats"]["median"] *= 2
    old_report["benchmarks"][0]["stats"]["median"] = 0.032
    old_report["benchmarks"].append(entry("test_gone", 1.0, "step", "numpy"))
    del old_report["benchmarks"][1]
    rows, only_old, only_new = bench.compare_records(bench.load_records(old_report), new)
    changes = {row["name"]: row["change_pct"] for row in rows}
    assert changes["test_step[numpy-b128-float32]"] == pytest.approx(25.0)
    assert changes["test_products[cpu-b128-float32]"] == pytest.approx(-50.0)
    assert only_old == ["test_gone"] and only_new == ["test_step[numba-b128-float32]"]
    text = bench.format_comparison(rows, only_old, only_new, label="old.json")
    assert "+25.0%" in text and "-50.0%" in text and "old.json" in text
    assert "only in old.json: 1" in text and "new in this run: 1" in text
    assert "no benchmark in common" in bench.format_comparison([], label="x")


def test_chart_series_and_png(report, tmp_path):
    tables = bench.summarise(bench.load_records(report))
    categories, series = bench.chart_series(tables)
    assert categories == ["batch 64\nfloat32", "batch 128\nfloat32"]
    assert series["numba"][1] == pytest.approx(2.0) and math.isnan(series["numba"][0])
    assert series["numpy"] == [pytest.approx(1.0), pytest.approx(1.0)]
    path = tmp_path / "chart" / "speedups.png"
    drawn = bench.draw_chart(tables, path)
    assert set(drawn) == {"numpy", "numba", "torch (cpu)", "matmul bound (cpu)"}
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arguments_reach_run(monkeypatch):
    parser = bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--backend", "numpy", "--backend", "numba",
                              "--batch-size", "64", "--batch-size", "512", "--dtype", "all",
                              "--json", "a.json", "--compare", "b.json", "--chart", "c.png"])
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"exit_code": 1}

    monkeypatch.setattr(bench.runner, "run", fake_run)
    assert bench.main(args) == 1
    assert seen == {"quick": True, "backends": ["numpy", "numba"], "batch_sizes": [64, 512],
                    "dtype": "all", "json_path": "a.json", "compare": "b.json",
                    "chart_path": "c.png", "precision": "all"}
    defaults = parser.parse_args([])
    assert (defaults.quick, defaults.backend, defaults.dtype) == (False, None, "float32")
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float16"])


def test_pytest_args(tmp_path):
    args = bench.pytest_args(bench.suite_dir(), tmp_path / "r.json", tmp_path / "p.ini",
                             quick=True, backends=["numpy"], batch_sizes=[32], dtype="all",
                             extra=("-x",))
    assert (bench.suite_dir() / "bench_step.py").is_file()
    assert "--benchmark-enable" in args and "--fastvae-quick" in args
    assert f"--benchmark-json={tmp_path / 'r.json'}" in args
    assert {"--fastvae-backend=numpy", "--fastvae-batch=32", "--fastvae-dtype=float32",
            "--fastvae-dtype=float64"} <= set(args)
    assert args[-1] == "-x"
    with pytest.raises(ValueError, match="unknown backend"):
        bench.pytest_args("s", "j", "i", backends=["nope"])
    with pytest.raises(ValueError, match="dtype"):
        bench.pytest_args("s", "j", "i", dtype="float16")


# ----- one real run of the suite: numpy, batch 32, one round -----

def test_quick_run_end_to_end(tmp_path, report):
    saved = tmp_path / "saved.json"
    old = json.loads(json.dumps(report))
    old["benchmarks"][0]["name"] = "test_step[numpy-b32-float32-fp32]"
    saved.write_text(json.dumps(old))
    out = io.StringIO()
    results = bench.run(
        quick=True, backends=["numpy"], batch_sizes=[32], json_path=tmp_path / "run.json",
        compare=saved, chart_path=tmp_path / "run.png", stream=out,
        extra_pytest_args=("--benchmark-min-rounds=1", "--benchmark-max-time=0",
                           "-k", "not peak"),
    )
    assert results["exit_code"] == 0
    assert (tmp_path / "run.json").is_file() and (tmp_path / "run.png").is_file()
    [table] = results["tables"]
    assert (table["batch"], table["dtype"]) == (32, "float32")
    labels = [row["label"] for row in table["rows"]]
    assert labels[0] == "numpy" and "products NumPy BLAS fp32" in labels
    numpy_row = table["rows"][0]
    assert numpy_row["median"] > 0 and numpy_row["speedup"] == pytest.approx(1.0)
    assert numpy_row["vs_bound"] > 0 and numpy_row["gflops"] > 0
    assert results["op_tables"] == []  # --quick leaves the kernels out
    text = out.getvalue()
    assert "batch 32, float32" in text and "products NumPy BLAS fp32" in text
    assert "load before" in text and "numba products:" in text
    rows, _, _ = results["comparison"]
    assert [row["name"] for row in rows] == ["test_step[numpy-b32-float32-fp32]"]
    assert f"compared with {saved}" in text


def test_machine_line():
    line = bench.machine_line({"cpu": {"brand_raw": "Some CPU", "count": 2}}, load=3.25)
    assert line == ("machine: Some CPU, 2 cores, load average 3.2 "
                    "(busy machines give noisy timings)")
    assert bench.machine_line({}, load=0.0).startswith("machine: unknown CPU")


def labelled(name, median, kind, label, batch=128, precision="fp32"):
    item = entry(name, median, kind, "numba" if kind == "step" else "torch", batch=batch,
                 flops=FLOPS)
    item["extra_info"].update(label=label, precision=precision)
    return item


def test_target_ratios_pair_the_issue_s_contenders():
    report = {"benchmarks": [
        labelled("a", 0.010, "step", "numba"), labelled("b", 0.005, "step", "numba bf16",
                                                        precision="bf16"),
        labelled("c", 0.0125, "torch", "torch autograd"),
        labelled("d", 0.010, "torch", "torch autograd bf16-autocast", precision="bf16"),
        labelled("e", 0.008, "torch", "torch hand-written"),
        labelled("f", 0.004, "products", "products oneMKL bf16", precision="bf16"),
        labelled("g", 0.006, "products", "products NumPy BLAS fp32"),
        labelled("h", 0.012, "step", "numba serial"),
    ]}
    [table] = bench.summarise(bench.load_records(report))
    ratios = {name: (ratio, target) for name, ratio, target in table["targets"]}
    assert ratios["numba bf16 / torch autograd bf16-autocast"] == (pytest.approx(0.5), 0.6)
    assert ratios["numba fp32 / torch autograd fp32"] == (pytest.approx(0.8), 0.8)
    assert ratios["numba fp32 / torch hand-written fp32"] == (pytest.approx(1.25), 1.0)
    assert ratios["numba bf16 / its bf16 products alone"] == (pytest.approx(1.25), None)
    assert ratios["numba fp32 parallel / serial kernels"][0] == pytest.approx(10 / 12)
    assert "numba fp32 / its fp32 products alone" not in ratios  # no oneMKL fp32 bound ran
    rows = {row["label"]: row for row in table["rows"]}
    assert rows["numba bf16"]["vs_torch"] == pytest.approx(0.5)  # against autocast
    assert rows["numba"]["vs_torch"] == pytest.approx(0.8)  # against autograd fp32
    assert rows["numba bf16"]["vs_bound"] == pytest.approx(1.25)  # its own precision's bound
    text = bench.format_targets(table)
    assert "numba bf16 / torch autograd bf16-autocast: 0.50x (target <= 0.6: met)" in text
    assert "numba fp32 / torch hand-written fp32: 1.25x (target <= 1.0: not met)" in text
