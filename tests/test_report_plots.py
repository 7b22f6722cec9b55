"""The report's metric plots: points where a reader can see them."""

import json

import numpy as np
import pandas as pd
from PIL import Image

from lobass.report.plots import plot_metrics

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def _column_of(image: np.ndarray, colour: tuple[int, int, int]) -> float:
    """The median pixel column of a line's colour: its tall error bar outweighs the legend's."""
    return float(np.median(np.nonzero(
        np.abs(image[..., :3].astype(int) - colour).sum(axis=-1) < 30)[1]))


def test_two_arms_at_one_size_are_drawn_near_it_not_at_the_plot_edges(tmp_path):
    rows = [{"kind": "subset", "rows": 12.0, "point": scorer,
             "point_key": json.dumps({"scorer": scorer, "selection": {"mode": "ratio",
                                                                       "ratio": 0.06}}),
             "eval/x/loss": value, "eval/x/loss_ci_low": value - 0.01,
             "eval/x/loss_ci_high": value + 0.01}
            for scorer, value in (("lobass", 2.065), ("random", 2.059))]
    (name,) = plot_metrics(pd.DataFrame(rows), ["eval/x/loss"], tmp_path)
    image = np.asarray(Image.open(tmp_path / name))
    width = image.shape[1]
    blue, orange = _column_of(image, BLUE), _column_of(image, ORANGE)
    # the error bars sit in the middle of the figure, beside the one tick (autoscaling had put
    # them on the axes' left and right edges), and apart from each other
    assert 0.35 * width < blue < orange < 0.75 * width, (blue, orange, width)
    assert orange - blue > 5
