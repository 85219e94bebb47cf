"""Figures for reports and explanations: confusion matrix, ROC curves, reliability diagram,
class examples, superpixel weights (LIME) and heat maps (Grad-CAM).

Each function draws one figure with matplotlib's non-interactive Agg backend, saves it
atomically as PNG and returns the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from melanoma.files import commit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120


def _new_figure(size: tuple[float, float]) -> Figure:
    # Figure objects (not pyplot) so that nothing needs a display or global state.
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def save_figure(figure: Figure, path: Path) -> Path:
    """Save as PNG through a temporary file, so that a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".partial.png")
    figure.savefig(tmp, dpi=DPI)
    return commit(tmp, path)


def confusion_matrix_figure(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts, coloured by the share of each true class (so rare classes stay readable)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure = _new_figure((max(5.0, 1.2 + 0.7 * len(classes)), max(4.5, 1.0 + 0.6 * len(classes))))
    axes = figure.subplots()
    row_totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)
    display = ConfusionMatrixDisplay(matrix, display_labels=classes)
    display.plot(ax=axes, values_format="d", cmap="Blues", colorbar=False)
    display.im_.set_data(shares)
    display.im_.set_clim(0, 1)
    for (row, column), text in np.ndenumerate(display.text_):
        text.set_color("white" if shares[row, column] > 0.5 else "black")
    axes.set_title("Confusion matrix\n(colour: share of the true class)")
    return save_figure(figure, path)


def roc_figure(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], path: Path, *,
               highlight: int | None = None, operating_point: tuple[float, float] | None = None) -> Path:
    """One-vs-rest ROC curve per class; ``highlight`` (melanoma) drawn thick, with the
    operating point (false positive rate, sensitivity) marked."""
    from sklearn.metrics import RocCurveDisplay

    figure = _new_figure((6.5, 6))
    axes = figure.subplots()
    for index, name in enumerate(classes):
        is_class = labels == index
        if is_class.all() or not is_class.any():
            continue
        RocCurveDisplay.from_predictions(is_class, probabilities[:, index], name=name, ax=axes,
                                         plot_chance_level=index == 0,
                                         curve_kwargs={"linewidth": 3 if index == highlight else 1.2})
    if operating_point is not None:
        axes.plot(*operating_point, "o", color="black", markersize=8, label="melanoma operating point")
        axes.legend(loc="lower right", fontsize="small")
    axes.set_title("ROC curves, one class vs rest")
    return save_figure(figure, path)


def reliability_figure(bins: pd.DataFrame, ece: float, path: Path, *, title: str | None = None) -> Path:
    """Accuracy against confidence per bin (``bins``: low, high, count, confidence, accuracy),
    with the diagonal of perfect calibration and the number of images per bin."""
    figure = _new_figure((6, 6.5))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = bins["high"] - bins["low"]
    centres = (bins["low"] + bins["high"]) / 2
    top.bar(centres, bins["accuracy"].fillna(0), width=width, edgecolor="black", alpha=0.8, label="accuracy")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.plot(bins["confidence"], bins["accuracy"], "o", color="darkred", label="mean confidence of the bin")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability diagram (ECE {ece:.3f}{', ' + title if title else ''})")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(centres, bins["count"], width=width, edgecolor="black", color="grey")
    bottom.set_xlabel("confidence (highest probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return save_figure(figure, path)


# ---- explain: a look at the data (used by the walkthrough notebook)
def class_examples_figure(images: np.ndarray, labels: np.ndarray, classes: list[str], *, per_class: int = 6,
                          seed: int = 0) -> Figure:
    """One row per class with ``per_class`` images drawn at random (with ``seed``)."""
    rng = np.random.default_rng(seed)
    figure = _new_figure((1.6 * per_class, 1.7 * len(classes)))
    axes = figure.subplots(len(classes), per_class, squeeze=False)
    for row, name in enumerate(classes):
        members = np.flatnonzero(labels == row)
        chosen = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
        for ax, index in zip(axes[row], chosen):
            ax.imshow(images[index])
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
        axes[row, 0].set_ylabel(f"{name}\n({len(members)})", rotation=0, ha="right", va="center")
    return figure


def _panels(image: np.ndarray, count: int, title: str) -> tuple[Figure, np.ndarray]:
    """A row of ``count + 1`` image panels, the first one the input."""
    figure = _new_figure((3.6 * (count + 1), 3.9))
    figure.suptitle(title)
    axes = np.atleast_1d(figure.subplots(1, count + 1))
    axes[0].imshow(image)
    axes[0].set_title("input")
    for ax in axes:
        ax.set_axis_off()
    return figure, axes


def superpixel_weights_figure(image: np.ndarray, segments: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], *,
                              title: str, label: str) -> Figure:
    """The image, then per panel its superpixels (``segments`` labels) coloured by their
    weight: green towards, red against, on one symmetric scale shared by the panels."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from skimage.segmentation import find_boundaries

    figure, axes = _panels(image, len(panels), title)
    limit = max(float(np.abs(weights).max()) for _, weights in panels) or 1.0
    norm, cmap = Normalize(-limit, limit), colormaps["RdYlGn"]
    edges = find_boundaries(segments, mode="inner")
    for ax, (panel_title, weights) in zip(axes[1:], panels):
        pixel_weights = weights[segments]
        overlay = cmap(norm(pixel_weights))
        overlay[..., 3] = 0.75 * np.abs(pixel_weights) / limit  # the stronger, the more opaque
        ax.imshow(image)
        ax.imshow(overlay)
        ax.contour(edges, levels=[0.5], colors="white", linewidths=0.3, alpha=0.6)
        ax.set_title(panel_title, fontsize=10)
    figure.colorbar(ScalarMappable(norm, cmap), ax=axes[1:], shrink=0.8, format="{x:.2g}", label=label)
    return figure


def heatmaps_figure(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], *, title: str,
                    label: str) -> Figure:
    """The image, then per panel a heat map in [0, 1] over it."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    figure, axes = _panels(image, len(panels), title)
    for ax, (panel_title, heatmap) in zip(axes[1:], panels):
        ax.imshow(image)
        ax.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(panel_title, fontsize=10)
    figure.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=axes[1:], shrink=0.8, label=label)
    return figure
