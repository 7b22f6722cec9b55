import numpy as np
import pytest

from lobass.selection import select_top, selection_size


def test_selection_size_by_ratio_and_count():
    assert selection_size(52002, 0.06, None) == 3120
    assert selection_size(200, 0.06, None) == 12
    assert selection_size(10, 0.01, None) == 1
    assert selection_size(10, 1.0, None) == 10
    assert selection_size(100, None, 7) == 7
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            selection_size(100, ratio, None)
    with pytest.raises(ValueError, match="pool size"):
        selection_size(100, None, 101)
    with pytest.raises(ValueError, match="exactly one"):
        selection_size(100, 0.5, 5)


def test_select_top_breaks_ties_by_id_and_skips_nonfinite():
    ids = ["d", "b", "a", "c", "e"]
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.5])
    assert select_top(ids, scores, 3) == [1, 2, 0]  # 0.9, then the 0.5 ties by id: a, d
    assert select_top(ids, scores, 4) == [1, 2, 0, 4]
    with pytest.raises(ValueError, match="finite"):
        select_top(ids, scores, 5)
