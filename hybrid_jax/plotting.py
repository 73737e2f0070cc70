"""Figures drawn off-screen, without touching matplotlib's global state.

Library code that writes PNGs (loss curves, benchmark and sweep plots, transfer errors) builds a
`matplotlib.figure.Figure` directly instead of going through `pyplot`: calling
`matplotlib.use("Agg")` from a library switches the backend of whoever imported it, so a notebook
that had just trained a model could no longer show its own figures, and pyplot keeps every figure it
made alive until closed. A bare Figure renders through Agg when saved and is garbage once dropped.

    fig, ax = figure(figsize=(7, 4))
    ax.plot(xs, ys)
    save(fig, "curve.png")
"""
from __future__ import annotations


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (7, 4.2), dpi: int = 120,
           **subplots_kw):
    """A new off-screen figure and its axes (`Figure.subplots(nrows, ncols, **subplots_kw)`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **subplots_kw)


def save(fig, path: str, **savefig_kw) -> str:
    """Lay out `fig`, write it to `path` (the format from the suffix) and return the path."""
    fig.tight_layout()
    fig.savefig(path, **savefig_kw)
    return path


def colormap(name: str):
    """A registered matplotlib colormap by name (e.g. "tab10"), without pyplot."""
    import matplotlib

    return matplotlib.colormaps[name]


__all__ = ["colormap", "figure", "save"]
