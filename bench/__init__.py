"""fastvae's benchmark suite (pytest-benchmark), installed as `fastvae.benchsuite`.

Run it with `fastvae bench` (see fastvae/bench.py), or directly:
    pytest bench/ --benchmark-enable -o python_files='bench_*.py'
conftest.py holds the parameters (backend, batch size, dtype) and the timing helper;
bench_ops.py times each kernel of the table, bench_step.py the training step and the
references measured beside it (matrix-product bound, peak product rate, PyTorch).
"""
