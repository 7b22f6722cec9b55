"""Length controls as selections (issue 28): a residual-on-length ranking, top-k within length
quantiles, and random rows length-matched to another selection. Each is checked on a small pool
whose right answer is known by construction, through the config keys a study sets."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.stats import linregress

from conftest import CONF, TINY
from lobass.config import validate
from lobass.pipeline import run
from lobass.schema.walk import ConfigError
from lobass.selection import choose_rows, rule_from_config


def _rule(*overrides: str, matched=None, seed: int = 0):
    """The rule of conf/selection/ratio.yaml with dotted overrides, as the select stage makes it."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "selection" / "ratio.yaml"),
                          OmegaConf.from_dotlist(list(overrides)))
    if matched is None:  # the plain call (a rule without a named selection)
        return rule_from_config(cfg)
    return rule_from_config(cfg, matched=matched, seed=seed)


def test_residual_length_rank_picks_the_planted_rows_not_the_short_ones():
    # 40 rows from 3 to 400 response tokens; the score falls with log length (a short-answer
    # bias, as the study's LoBaSS score shows) plus a small wobble, and four rows of middling
    # to long length carry a planted +0.5: the only rows better than their length predicts.
    n = 40
    lengths = np.round(np.geomspace(3, 400, n)).astype(int)
    ids = [f"r{i:02d}" for i in range(n)]
    planted = [16, 22, 30, 35]
    residual = 0.01 * np.sin(np.arange(n))  # (N,) deterministic wobble, |.| <= 0.01
    residual[planted] = 0.5
    scores = 2.0 - 0.4 * np.log(lengths) + residual
    sources = ["alpaca"] * n

    plain = choose_rows(ids, sources, scores, lengths.tolist(), _rule("ratio=null", "count=4"))
    assert sorted(plain) == [0, 1, 2, 3]  # by score alone: the four shortest rows
    rule = _rule("ratio=null", "count=4", "rank=residual_length")
    chosen = choose_rows(ids, sources, scores, lengths.tolist(), rule)
    assert sorted(ids[i] for i in chosen) == [ids[i] for i in planted]
    # the ranking value is the OLS residual on log length over the whole pool (scipy's fit)
    from lobass.selection import ranking_scores

    fit = linregress(np.log(lengths), scores)
    expected = scores - (fit.intercept + fit.slope * np.log(lengths))
    np.testing.assert_allclose(ranking_scores(scores, lengths.tolist(), rule), expected,
                               atol=1e-12)
    assert rule.describe()["rank"] == "residual_length"
    assert "rank" not in _rule("ratio=null", "count=4").describe()  # old identities unchanged


def test_stratified_top_k_takes_the_top_of_each_length_bin_then_the_best_remaining():
    # 8 rows of 1..8 tokens (stored out of order); the score prefers short rows (9 - length),
    # so a plain top-4 is the 4 shortest. Two length bins: {1..4} and {5..8}.
    lengths = [5, 1, 8, 3, 6, 2, 7, 4]
    ids = [f"len{n}" for n in lengths]
    scores = np.array([9.0 - n for n in lengths])
    sources = ["alpaca"] * 8

    def pick(k: int, *extra: str) -> list[str]:
        rule = _rule("ratio=null", f"count={k}", *extra)
        return [ids[i] for i in choose_rows(ids, sources, scores, lengths, rule)]

    assert pick(4) == ["len1", "len2", "len3", "len4"]
    stratified = ("stratify=length", "length_bins=2")
    assert pick(4, *stratified) == ["len1", "len2", "len5", "len6"]  # 2 per bin
    assert pick(5, *stratified) == ["len1", "len2", "len3", "len5", "len6"]  # +1 by score
    assert pick(3, *stratified) == ["len1", "len2", "len5"]  # 1 per bin, then the best left

    # 40 rows, 4 bins of 10 by length, random scores: each bin gives exactly its own top 2
    rng = np.random.default_rng(3)
    lengths = rng.permutation(np.arange(10, 50)).tolist()
    ids = [f"r{i:02d}" for i in range(40)]
    scores = rng.random(40)
    rule = _rule("ratio=null", "count=8", "stratify=length", "length_bins=4")
    chosen = set(choose_rows(ids, ["alpaca"] * 40, scores, lengths, rule))
    for low in (10, 20, 30, 40):  # independent: a bin is a run of ten lengths
        in_bin = [i for i in range(40) if low <= lengths[i] < low + 10]
        top2 = sorted(in_bin, key=lambda i: -scores[i])[:2]
        assert chosen & set(in_bin) == set(top2)


def _bin_counts(values: list[int], edges: list[float]) -> list[int]:
    """Rows per bin [e0, e1], (e1, e2], ... written out with plain comparisons."""
    return [sum((lo < v or (b == 0 and v == lo)) and v <= hi for v in values)
            for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))]


def test_length_matched_random_matches_the_bin_counts_exactly_and_follows_the_seed():
    # A pool of 120 rows, two of each length 2..61; the named selection: 12 mostly short rows.
    lengths = [2 + i // 2 for i in range(120)]
    ids = [f"r{i:03d}" for i in range(120)]
    scores = np.zeros(120)
    target = [2, 3, 3, 4, 5, 6, 6, 8, 12, 20, 40, 60]
    edges = np.quantile(target, [0, 0.25, 0.5, 0.75, 1.0]).tolist()  # 3.75, 6, 14
    want = _bin_counts(target, edges)
    assert want == [3, 4, 2, 3]

    draws = {}
    for seed in (0, 1):
        rule = _rule("rule=length_matched_random", "length_bins=4", seed=seed,
                     matched=("lobass_top12@x", target))
        chosen = choose_rows(ids, ["alpaca"] * 120, scores, lengths, rule)
        assert len(chosen) == len(set(chosen)) == 12  # the same k, no row twice
        assert _bin_counts([lengths[i] for i in chosen], edges) == want
        draws[seed] = chosen
        again = choose_rows(ids, ["alpaca"] * 120, scores, lengths, rule)
        assert again == chosen  # the seed fixes the draw
    assert set(draws[0]) != set(draws[1])  # and another seed draws other rows
    assert rule.describe()["mode"] == "length_matched" and "seed" not in rule.describe()

    # a pool that cannot fill a bin says so
    with pytest.raises(ValueError, match="length_matched_random"):
        choose_rows(ids[:20], ["alpaca"] * 20, scores[:20], lengths[:20], rule)


def _selected(summary: dict) -> list[str]:
    return [json.loads(x)["id"] for x in
            Path(summary["artifacts"]["selected"]).read_text().splitlines()]


def test_length_matched_random_arm_through_the_pipeline(make_cfg, tmp_path):
    # the named selection: L_init's top 6 on the tiny model (no reference needed)
    select = [*TINY, "stages=[select]"]
    top = run(make_cfg(*select, "scorer=loss", "selection.ratio=null", "selection.count=6"))
    named = tmp_path / "named"
    named.mkdir()
    (named / "summary.json").write_text(json.dumps(top))
    scores = {r["id"]: r for r in map(json.loads, Path(top["artifacts"]["scores"]).read_text()
                                      .splitlines())}
    target = [scores[i]["n_response_tokens"] for i in _selected(top)]

    arm = [*select, "scorer=random", "selection.rule=length_matched_random",
           f"selection.match_lengths={named}", "selection.length_bins=3"]
    first, second = (run(make_cfg(*arm, f"seed={s}")) for s in (0, 1))
    edges = np.unique(np.quantile(target, np.linspace(0, 1, 4))).tolist()
    for summary in (first, second):
        drawn = [scores[i]["n_response_tokens"] for i in _selected(summary)]
        assert len(drawn) == 6 and _bin_counts(drawn, edges) == _bin_counts(target, edges)
        assert summary["point"]["selection"]["mode"] == "length_matched"
    assert first["point"] == {**second["point"], "seed": 0}  # seeds of one point
    assert first["artifacts"]["selected"] != second["artifacts"]["selected"]


def test_length_controls_refuse_what_they_cannot_combine_with(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="selection.match_lengths=<run dir"):
        validate(make_cfg(*TINY, "selection.rule=length_matched_random"))
    with pytest.raises(ConfigError, match="unset selection.by_source"):
        validate(make_cfg(*TINY, "selection.rule=length_matched_random",
                          f"selection.match_lengths={tmp_path}", "selection.by_source=true"))
    with pytest.raises(ConfigError, match="unset selection.band"):
        validate(make_cfg(*TINY, "selection.stratify=length", "selection.band=[0.4,0.6]"))
    with pytest.raises(ConfigError, match="selection.rank='by_length' is not supported"):
        validate(make_cfg(*TINY, "selection.rank=by_length"))


def test_the_report_names_each_length_control_arm():
    import pandas as pd

    from lobass.report.points import identity_columns, label_points

    rows = {"mode": "count", "ratio": None, "count": 12, "tokens": None, "band": None,
            "order": "top", "by_source": False, "keep_sources": [], "listed": None}
    arms = [("lobass", rows), ("lobass", {**rows, "rank": "residual_length"}),
            ("lobass", {**rows, "stratify": "length", "length_bins": 10}),
            ("random", {**rows, "mode": "length_matched", "count": None,
                        "matched": "lobass_run@1f2e", "length_bins": 10})]
    table = pd.DataFrame([identity_columns(
        {"scorer": scorer, "selection": selection, "train": {"epochs": 3, "max_steps": -1},
         "seed": 0, "reference_seed": 0}, {"select/count": 12, "data/pool_rows": 200})
        for scorer, selection in arms])
    assert label_points(table)["point"].tolist() == [
        "lobass 12 rows", "lobass 12 rows (residual on log length)",
        "lobass 12 rows (within 10 length bins)", "random length-matched to lobass_run"]
    assert table["point_key"].nunique() == 4  # four points, never pooled as seeds
    # random at the same size is the baseline of the residualised arm too (study 2 found none)
    from lobass.report.compare import baselines_for

    plain = pd.DataFrame([identity_columns(
        {"scorer": "random", "selection": rows, "train": {"epochs": 3, "max_steps": -1},
         "seed": 0, "reference_seed": None}, {"select/count": 12, "data/pool_rows": 200})])
    table = label_points(pd.concat([table, plain], ignore_index=True)).assign(seeds=1)
    named = {row["point"]: [n for n, _ in baselines_for(row, table)]
             for _, row in table.iterrows()}
    assert named["lobass 12 rows (residual on log length)"] == ["random (1 seed)"]
    assert named["lobass 12 rows"] == ["random (1 seed)"]
