"""`fastvae bench`: the benchmark suite's runner, report and chart, and the step's products.

- `products`: the step's matrix products, traced from a real training step;
- `runner`: runs the pytest-benchmark suite (`bench/`, installed as `fastvae.benchsuite`);
- `report`: reads its JSON into tables and the issue's target ratios;
- `chart`: draws the speed-ups.
"""
from fastvae.bench.chart import chart_series, draw_chart
from fastvae.bench.products import Product, ProductTracer, step_flops, step_products
from fastvae.bench.report import (
                                  TARGETS,
                                  compare_records,
                                  format_comparison,
                                  format_op_table,
                                  format_seconds,
                                  format_step_table,
                                  format_targets,
                                  load_records,
                                  op_tables,
                                  peak_rates,
                                  summarise,
                                  target_ratios,
)
from fastvae.bench.runner import (
                                  BATCH_SIZES,
                                  DEFAULT_CHART,
                                  DEFAULT_JSON,
                                  DTYPES,
                                  PRECISIONS,
                                  QUICK_BATCH,
                                  add_arguments,
                                  machine_line,
                                  main,
                                  pytest_args,
                                  run,
                                  suite_dir,
)

__all__ = ["BATCH_SIZES", "DEFAULT_CHART", "DEFAULT_JSON", "DTYPES", "PRECISIONS", "Product",
           "ProductTracer", "QUICK_BATCH", "TARGETS", "add_arguments", "chart_series",
           "compare_records", "draw_chart", "format_comparison", "format_op_table",
           "format_seconds", "format_step_table", "format_targets", "load_records",
           "machine_line", "main", "op_tables", "peak_rates", "pytest_args", "run",
           "step_flops", "step_products", "suite_dir", "summarise", "target_ratios"]
