"""The bar chart of `fastvae bench`: each contender's speed-up over numpy per batch size."""
import math

from fastvae.files import write_atomic


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
        bound = label.startswith(("matmul bound", "products"))
        hatch = "//" if bound else (".." if "torch" in label else None)
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


