"""PNG plots of bench results, with matplotlib (the optional `plot` extra): without
it every function returns a one-line note instead of files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import compare_columns, compare_values

NO_MATPLOTLIB = (
    "plots skipped: matplotlib is not installed (pip install 'mlx-flashinfer[plot]')"
)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict, prefix: str | Path) -> list[Path] | str:
    """`{prefix}_latency.png` (stacked I/O / memory / compute ms per token, one panel
    per backend) and, with a probe, `{prefix}_throughput.png` (the disk's GB/s against
    read size per thread count, and each configuration's achieved point).

    Returns:
        The files written, or a note why none were.
    """
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    prefix = Path(prefix)
    backends = [
        b
        for b in result["settings"]["backends"]
        if any(r["backend"] == b and "metrics" in r for r in result["rows"])
    ]
    if not backends:
        return "plots skipped: no configuration finished"
    files = [prefix.with_name(prefix.name + "_latency.png")]
    fig, axes = plt.subplots(
        1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False
    )
    for ax, backend in zip(axes[0], backends, strict=True):
        rows = [r for r in result["rows"] if r["backend"] == backend and "metrics" in r]
        names = [r["title"] for r in rows]
        bottom = np.zeros(len(rows))
        for part, color in (("io_ms", "C0"), ("memory_ms", "C1"), ("compute_ms", "C2")):
            values = np.array([r["metrics"][part] for r in rows])
            ax.barh(names, values, left=bottom, color=color, label=part[:-3])
            bottom += values
        ax.invert_yaxis()
        ax.set_xscale(
            "log" if bottom.max() > 20 * max(bottom.min(), 1e-9) else "linear"
        )
        ax.set_xlabel("ms per token")
        ax.set_title(f"{result['model']['name']}, {backend}")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(files[0], dpi=120)
    plt.close(fig)
    probe = result.get("probe")
    if probe:
        files.append(prefix.with_name(prefix.name + "_throughput.png"))
        _throughput(plt, result, probe, files[-1])
    return files


def _throughput(plt, result: dict, probe: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rate = {(c["read_size"], c["threads"]): c["bytes_per_s"] for c in probe["cells"]}
    for threads in probe["threads"]:
        ax.plot(
            probe["sizes"],
            [rate[s, threads] / 1e9 for s in probe["sizes"]],
            marker=".",
            alpha=0.6,
            label=f"disk, {threads} thr",
        )
    markers = {"numpy": "x", "mlx": "+"}
    for r in result["rows"]:
        m = r.get("metrics")
        if m and m["mean_read_bytes"] and m["gb_per_s"]:
            point = (m["mean_read_bytes"], m["gb_per_s"])
            marker = markers.get(r["backend"], "o")
            ax.scatter(*point, marker=marker, color="k", s=40)
            ax.annotate(
                r["row"], point, fontsize=7, xytext=(4, 2), textcoords="offset points"
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("read size (bytes)")
    ax.set_ylabel("GB/s")
    ax.set_title("disk probe (lines) and each configuration's reads (x numpy, + mlx)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_compare_plot(results: dict[str, dict], path: str | Path) -> Path | str:
    """Grouped bars per configuration, one bar per machine/backend: speedup over its
    own naive row (log scale) and I/O time over its own disk limit.

    Returns:
        The file written, or a note why not.
    """
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    labels = [label for label, _ in compare_columns(results)]
    values = compare_values(results)
    rows = list(dict.fromkeys(row for row, _ in values["speedup"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(labels), 1)
    for metric, ax, title in (
        ("speedup", axes[0], "speedup over own naive (x)"),
        ("io_vs_disk", axes[1], "I/O time / own disk limit"),
    ):
        for i, label in enumerate(labels):
            # a row one result lacks (None: no naive row to compare with) is a gap
            ys = [values[metric].get((row, label)) for row in rows]
            ys = [np.nan if y is None else y for y in ys]
            ax.bar(np.arange(len(rows)) + i * width, ys, width, label=label)
        ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, rows, rotation=30)
        ax.set_title(title)
        if metric == "speedup":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
