import numpy as np
import pytest

from lobass.selection import SelectionRule, choose_rows, selection_size


def test_selection_size_by_ratio_and_count():
    assert selection_size(52002, 0.06, None) == 3120
    assert selection_size(200, 0.06, None) == 12
    assert selection_size(10, 0.01, None) == 1
    assert selection_size(10, 1.0, None) == 10
    assert selection_size(100, None, 7) == 7
    # a ratio outside (0, 1], both or neither, a count above the pool: refused by the config's
    # checks before any work (tests/test_configs.py BAD, tests/test_config_refusals.py)


def test_top_k_breaks_ties_by_id_and_skips_nonfinite():
    ids = ["d", "b", "a", "c", "e"]
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.5])
    sources, n = ["s"] * 5, [1] * 5

    def top(k):
        return choose_rows(ids, sources, scores, n, SelectionRule(count=k))

    assert top(3) == [1, 2, 0]  # 0.9, then the 0.5 ties by id: a, d
    assert top(4) == [1, 2, 0, 4]
    with pytest.raises(ValueError, match="finite"):
        top(5)


# ---------------------------------------------------------------------------------------------
# Selection rules on real pool rows (the shipped Alpaca and GSM8K files); scores are set by hand
# so every expected selection can be worked out on paper.

from lobass.config import package_data  # noqa: E402
from lobass.data import read_examples  # noqa: E402
from lobass.selection import composition  # noqa: E402


def _real_pool():
    alpaca, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca",
                              source="alpaca", max_rows=6)
    gsm8k, _ = read_examples(package_data("gsm8k/gsm8k_train_300.jsonl"), "gsm8k",
                             source="gsm8k", max_rows=4)
    examples = alpaca + gsm8k
    ids = [e.id for e in examples]
    sources = [e.source for e in examples]
    # Alpaca rows score 0.1 .. 0.6, GSM8K rows 0.65 .. 0.95: a global top-k takes GSM8K first.
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.75, 0.85, 0.95])
    n_response = [10, 20, 30, 40, 50, 60, 5, 5, 5, 5]
    return examples, ids, sources, scores, n_response


def test_global_top_k_by_source_and_kept_sources_on_real_rows():
    examples, ids, sources, scores, n = _real_pool()
    assert choose_rows(ids, sources, scores, n, SelectionRule(count=3)) == [9, 8, 7]
    # The paper's mix: 50% of the Alpaca rows by score, then every GSM8K row.
    paper = SelectionRule(ratio=0.5, by_source=True, keep_sources=("gsm8k",))
    assert choose_rows(ids, sources, scores, n, paper) == [5, 4, 3, 6, 7, 8, 9]
    # Within each source: the top 2 of Alpaca, then the top 2 of GSM8K.
    assert choose_rows(ids, sources, scores, n, SelectionRule(count=2, by_source=True)) == [
        5, 4, 9, 8]
    parts = composition(examples, [5, 4, 9, 8], n)
    assert parts["alpaca"] == {"rows": 2.0, "response_tokens": 110.0,
                               "mean_response_tokens": 55.0}
    assert parts["gsm8k"]["rows"] == 2.0 and parts["all"]["response_tokens"] == 120.0


def test_bottom_k_band_and_token_budget_by_hand():
    _, ids, sources, scores, n = _real_pool()
    assert choose_rows(ids, sources, scores, n, SelectionRule(count=3, order="bottom")) == [
        0, 1, 2]
    # Mid-rank quantiles of 10 rows are 0.05, 0.15, ..., 0.95: [0.4, 0.6] keeps 0.45 and 0.55,
    # the 5th and 6th lowest scores (0.5 and 0.6), listed highest first.
    assert choose_rows(ids, sources, scores, n, SelectionRule(band=(0.4, 0.6))) == [5, 4]
    # 17 response tokens from the top: 5 + 5 + 5 = 15, the next row (5) would make 20.
    assert choose_rows(ids, sources, scores, n, SelectionRule(tokens=17)) == [9, 8, 7]
    # From the bottom: 10 + 20 = 30 <= 35, 30 more would exceed it.
    assert choose_rows(ids, sources, scores, n, SelectionRule(tokens=35, order="bottom")) == [
        0, 1]


def test_nonfinite_rows_are_never_chosen_and_ties_break_by_id():
    _, ids, sources, scores, n = _real_pool()
    scores = scores.copy()
    scores[9] = np.nan
    scores[7] = scores[8]  # a tie at 0.85: the smaller id goes first
    first, second = sorted([7, 8], key=lambda i: ids[i])
    assert choose_rows(ids, sources, scores, n, SelectionRule(count=2)) == [first, second]
    kept = choose_rows(ids, sources, scores, n, SelectionRule(count=1, keep_sources=("gsm8k",)))
    assert kept == [5, 6, 7, 8]  # GSM8K in full except its non-finite row
    with pytest.raises(ValueError, match="finite"):
        choose_rows(ids, sources, scores, n, SelectionRule(count=4, keep_sources=("alpaca",)))
