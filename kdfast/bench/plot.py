"""The benchmark plot: time and peak memory against N*C per provider."""

from __future__ import annotations

from pathlib import Path


def plot_cases(cases, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = {}
    for case, metrics, _, _ in cases:
        key = (case.kind, case.dtype, case.threads)
        groups.setdefault(key, []).append((case.rows * case.cols, metrics))
    styles = {"kdfast": "o-", "eager": "s--", "compiled": "^:"}
    for (kind, dtype, threads), points in sorted(groups.items()):
        if dtype != "fp32" or kind != "kl":
            continue
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        for provider, style in styles.items():
            label = f"{provider}, {threads} thr"
            ax_time.plot(xs, [p[1][provider]["median_ms"] for p in points], style, label=label)
            ax_mem.plot(xs, [p[1][provider]["peak_extra_mb"] for p in points], style, label=label)
    # Slope-1 guide through kdfast's largest point: linear growth in N*C lies along it.
    for (kind, dtype, threads), points in sorted(groups.items()):
        if dtype == "fp32" and kind == "kl" and len(points) > 1:
            x_max, m = max(points, key=lambda p: p[0])
            x_min = min(p[0] for p in points)
            y_max = m["kdfast"]["median_ms"]
            ax_time.plot([x_min, x_max], [y_max * x_min / x_max, y_max], color="gray", lw=0.8,
                         alpha=0.6, label=f"ms proportional to N*C ({threads} thr)")
    for ax, ylabel in ((ax_time, "forward+backward median (ms)"), (ax_mem, "peak extra memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N x C (elements)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_time.set_title("kind=kl, fp32: time grows linearly in N*C")
    ax_mem.set_title("kind=kl, fp32: memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
