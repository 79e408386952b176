"""PNG plots: time and peak memory against N on log-log axes, one line per implementation,
the fitted slope in the legend. One figure per suite and mode (``plot_name``: ``attention-fwd.png``)."""

from __future__ import annotations

from pathlib import Path

from .records import Record
from .report import fit_slope, series

__all__ = ["plot_all", "plot_name"]


def plot_name(suite: str, mode: str) -> str:
    """The file name of a suite's plot in one mode: ``attention-fwd.png``, ``mlp-fwd_bwd.png``."""
    return f"{suite}-{mode.replace('+', '_')}.png"


def plot_all(records: list[Record], out_dir: Path) -> list[Path]:
    """Write a figure per (suite, mode) that has ok points at two or more N; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figures: dict[tuple[str, str], list[tuple[tuple, list[Record]]]] = {}
    for key, rs in series(records).items():
        ok = [r for r in rs if r.status == "ok"]
        if len({r.n_tokens for r in ok}) >= 2:
            figures.setdefault((key[0], key[2]), []).append((key, ok))

    paths = []
    for (suite, mode), lines in figures.items():
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
        several_shapes = len({key[3:7] for key, _ in lines}) > 1
        several_models = len({key[7] for key, _ in lines}) > 1
        for key, ok in lines:
            ns = [r.n_tokens for r in ok]
            label = key[1] + (f" {key[7]}" if several_models else "")
            label += f" B{key[3]} H{key[4]} D{key[5]} {key[6]}" if several_shapes else ""
            for ax, ys, scale in (
                (ax_t, [r.ms for r in ok], 1.0),
                (ax_m, [r.peak_mem_bytes for r in ok], 2**-20),
            ):
                fit = fit_slope(ns, ys)
                pts = [(n, y * scale) for n, y in zip(ns, ys, strict=True) if y is not None and y > 0]
                if not pts:
                    continue
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{label} (slope {fit})" if fit else label)
        first = lines[0][1][0]
        all_ns = sorted({r.n_tokens for _, ok in lines for r in ok})
        shape = "" if several_shapes else f", B={first.batch} H={first.heads} D={first.head_dim} {first.dtype}"
        for ax, ylabel in ((ax_t, "time per call (ms, median)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(all_ns, [str(n) for n in all_ns])  # the measured N, not powers of ten
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{suite} {mode} on {first.device}{shape}")
        fig.tight_layout()
        path = Path(out_dir) / plot_name(suite, mode)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
