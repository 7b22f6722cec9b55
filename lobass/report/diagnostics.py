"""Diagnostics of what was selected, as tables.

Composition, scorer overlap, reference stability, and the highest- and lowest-scored rows of each
source to read.

Inputs are the files the runs point to: ``summary.json``'s ``select/<source>/*`` metrics, the
scores artifact (``scores.jsonl``: id, source, lengths, ``loss_init``, ``loss_ref``, score) and
the selection (``selected.jsonl``). The scores file holds ids only, so the rows' text comes from
re-reading the pool with :func:`lobass.pool.read_pool` and the run's resolved ``data`` config
(``config.yaml`` beside ``summary.json``); when those files cannot be read any more the table
keeps the ids and says so.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from lobass.jsonrows import read_jsonl
from lobass.report.points import members_of
from lobass.schema.specs import DataSpec
from lobass.schema.walk import missing_defaults
from lobass.stats import rank_correlation

log = logging.getLogger(__name__)

EXTREMES = 5  # rows shown at each end of each source's score ranking
TEXT_CHARS = 80  # characters kept of each prompt and response in that table


def read_scores(path: Path) -> pd.DataFrame:
    """A ``scores.jsonl`` as a frame indexed by id; ``score`` NaN where a row has none.

    ``n_response_tokens`` falls back to ``n_tokens`` and ``source`` to ``"all"`` for score files
    written before those fields existed. The frame is shared between callers (each plot and
    table reads the same files; a 52k-row pool takes a while to parse): do not modify it.
    """
    stat = path.stat()
    return _read_scores(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_scores(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    # mtime and size in the key: a rewritten file is read again, never served stale
    rows = pd.DataFrame.from_records(
        read_jsonl(Path(path)))
    if "n_response_tokens" not in rows:
        rows["n_response_tokens"] = rows["n_tokens"]
    rows["n_response_tokens"] = rows["n_response_tokens"].fillna(rows["n_tokens"])
    if "source" not in rows:
        rows["source"] = "all"
    rows["score"] = rows["score"].astype(float)
    rows.index = pd.Index(rows["id"].astype(str).to_numpy())  # unnamed: "id" stays a column
    return rows


def _selected_ids(path: Path | None) -> set[str] | None:
    if path is None or not path.is_file():
        return None
    return {row["id"] for row in read_jsonl(path)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Shared ids over all ids of two selections (1 = the same rows, 0 = none in common)."""
    return len(a & b) / len(a | b) if a | b else math.nan


def composition(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Rows, response tokens and mean response length per source of each point's selection.

    Values are means over the point's seeds (a random arm draws other rows per seed).

    Returns:
        Columns ``point, source, rows, response_tokens, mean_response_tokens``, one row per point
        and source in the table's order; empty when no run recorded per-source metrics.

    """
    pattern = re.compile(r"^select/([^/]+)/rows$")
    sources = sorted({m.group(1) for c in runs.columns if (m := pattern.match(str(c)))})
    records = []
    for _, entry in table.iterrows():
        members = members_of(runs, entry["point_key"])
        for source in sources:
            values = {k: members[f"select/{source}/{k}"].mean()
                      for k in ("rows", "response_tokens", "mean_response_tokens")}
            if not math.isnan(values["rows"]):
                records.append({"point": entry["point"], "source": source, **values})
    return pd.DataFrame.from_records(
        records, columns=["point", "source", "rows", "response_tokens", "mean_response_tokens"])


def _first(runs: pd.DataFrame, column: str) -> Any:
    present = [v for v in runs[column] if v is not None and Path(v).is_file()]
    return present[0] if present else None


def _pairs(table: pd.DataFrame, runs: pd.DataFrame, differ: str) -> list[tuple[Any, Any]]:
    """Subset points, two by two, whose identities differ in ``differ`` and only there.

    ``differ`` is ``scorer`` (scorer overlap: same selection rule and reference seed; the
    training budget does not change what is selected) or ``reference_seed``.
    """
    keep = ("selection", "reference_seed") if differ == "scorer" else ("scorer", "selection")
    points = []
    for _, entry in table[table["kind"] == "subset"].iterrows():
        key = json.loads(entry["point_key"])
        members = members_of(runs, entry["point_key"])
        points.append((entry, key, members))
    pairs, seen = [], set()
    for (a, ka, ma), (b, kb, mb) in itertools.combinations(points, 2):
        if ka[differ] == kb[differ] or any(ka[k] != kb[k] for k in keep):
            continue
        names = (ka["scorer"], kb["scorer"], ka["reference_seed"], kb["reference_seed"],
                 json.dumps(ka["selection"], sort_keys=True))
        if names not in seen:  # several training budgets select the same rows: one row each
            seen.add(names)
            pairs.append(((a, ma), (b, mb)))
    return pairs


def _overlap(a: tuple[pd.Series, pd.DataFrame], b: tuple[pd.Series, pd.DataFrame],
             ) -> dict[str, Any] | None:
    scores_a, scores_b = _first(a[1], "scores_path"), _first(b[1], "scores_path")
    chosen_a = _selected_ids(_first(a[1], "selected_path"))
    chosen_b = _selected_ids(_first(b[1], "selected_path"))
    if chosen_a is None or chosen_b is None:
        return None
    rho = math.nan
    if scores_a is not None and scores_b is not None:
        other = read_scores(scores_b)[["score"]].rename(columns={"score": "score_b"})
        joined = read_scores(scores_a)[["score"]].join(other, how="inner")
        rho = rank_correlation(joined["score"].to_numpy(), joined["score_b"].to_numpy())
    return {"a": a[0]["point"], "b": b[0]["point"], "rows": len(chosen_a),
            "jaccard": jaccard(chosen_a, chosen_b), "spearman": rho}


def scorer_overlap(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Jaccard of the selected rows and Spearman of the scores over the pool, scorer by scorer.

    Pairs of points that select with the same rule and reference seed but different scorers;
    each side's first run with files stands for it (a random arm's other seeds pick other rows).

    Returns:
        Columns ``a, b, rows, jaccard, spearman`` (rows: size of ``a``'s selection).

    """
    records = [r for pair in _pairs(table, runs, "scorer") if (r := _overlap(*pair))]
    return pd.DataFrame.from_records(records, columns=["a", "b", "rows", "jaccard", "spearman"])


def reference_stability(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Two references (reference seeds) of one scorer: Spearman of scores, Jaccard of top-k.

    Pairs of points that differ only in ``reference_seed`` (training budget aside); k is the
    size of their selections.

    Returns:
        Columns ``a, b, rows, jaccard, spearman``.

    """
    records = [r for pair in _pairs(table, runs, "reference_seed") if (r := _overlap(*pair))]
    return pd.DataFrame.from_records(records, columns=["a", "b", "rows", "jaccard", "spearman"])


def _pool_text(config: dict[str, Any]) -> dict[str, tuple[str, str]] | None:
    """Prompt and response of every pool row by id, from the run's data config; None if lost."""
    from lobass.pool import read_pool  # the pool readers only when rows are to be shown

    data = config.get("data")
    if not data:
        return None
    try:
        # a config.yaml written before a data field existed: that field's schema default
        filled = OmegaConf.merge(data, missing_defaults(data, DataSpec))
        assert isinstance(filled, DictConfig)
        examples, _ = read_pool(filled)
    except Exception as error:  # moved or deleted data: the table keeps ids and says why
        log.warning("report: cannot re-read the pool from config.yaml's data (%s); the extreme "
                    "rows are listed by id only", error)
        return None
    text = {}
    for example in examples:
        prompt = next((m["content"] for m in reversed(example.messages[:-1])
                       if m["role"] == "user"), "")
        text[example.id] = (prompt, example.messages[-1]["content"])
    return text


def _cut(text: str) -> str:
    text = " ".join(text.split())  # one line in a table cell
    text = text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"
    # rows are data, not markup: a row holding <audio ...> must not render as HTML
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def extreme_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The :data:`EXTREMES` highest- and lowest-scored rows of each source, for each scorer.

    Each scorer's first run with a readable scores file stands for it; ``random`` is left out.

    Returns:
        Columns ``scorer, source, end (highest|lowest), rank, id, score, response_tokens,
        prompt, response`` (prompt and response cut to :data:`TEXT_CHARS` characters; empty
        when the pool cannot be re-read).

    """
    records = []
    ok = runs[(runs["status"] == "ok") & (runs["scorer"] != "random") & (runs["scorer"] != "")]
    for scorer, members in ok.groupby("scorer", sort=True):
        path = _first(members, "scores_path")
        if path is None:
            continue
        run = members[members["scores_path"] == path].iloc[0]
        text = _pool_text(run["config"]) or {}
        scores = read_scores(path).dropna(subset=["score"])
        for source, rows in scores.groupby("source", sort=True):
            ranked = rows.sort_values(["score", "id"], ascending=[False, True])
            for end, part in (("highest", ranked.head(EXTREMES)),
                              ("lowest", ranked.tail(EXTREMES).iloc[::-1])):
                for _, row in part.iterrows():
                    prompt, response = text.get(row["id"], ("", ""))
                    records.append({
                        "scorer": scorer, "source": source, "end": end,
                        "rank": int(ranked.index.get_loc(row["id"])) + 1, "id": row["id"],
                        "score": row["score"], "response_tokens": row["n_response_tokens"],
                        "prompt": _cut(prompt), "response": _cut(response)})
    return pd.DataFrame.from_records(records, columns=[
        "scorer", "source", "end", "rank", "id", "score", "response_tokens", "prompt",
        "response"])


def contamination(runs: pd.DataFrame) -> pd.DataFrame:
    """The contamination audit: pool rows overlapping each evaluation set, as the runs counted.

    One row per set and distinct count (a sweep over one pool counts the same in every run; a
    study over several pools shows each pool's count, with how many runs saw it).

    Returns:
        Columns ``set, exact, ngram13, overlapping, dropped, runs``: per set the rows sharing
        an exact instruction or a word 13-gram (``data/contamination/<set>/{exact,ngram13}``);
        a last ``any set`` row with the rows overlapping some set (``data/contamination/rows``)
        and those dropped (``data/decontaminated``, 0 unless ``data.decontaminate=true``).
        Empty when no run audited.

    """
    pattern = re.compile(r"^data/contamination/([^/]+)/exact$")
    ok = runs[runs["status"] == "ok"]
    sets = sorted({m.group(1) for c in runs.columns if (m := pattern.match(str(c)))})
    records = []
    for name in sets:
        counts = ok[[f"data/contamination/{name}/exact",
                     f"data/contamination/{name}/ngram13"]].dropna()
        for (exact, ngram), group in counts.groupby(list(counts.columns), sort=True):
            records.append({"set": name, "exact": exact, "ngram13": ngram, "runs": len(group)})
    if "data/contamination/rows" in ok:
        dropped = (ok["data/decontaminated"] if "data/decontaminated" in ok
                   else pd.Series(0.0, index=ok.index)).fillna(0.0)
        counts = pd.DataFrame({"rows": ok["data/contamination/rows"], "dropped": dropped}).dropna()
        for (rows, gone), group in counts.groupby(["rows", "dropped"], sort=True):
            records.append({"set": "any set", "overlapping": rows, "dropped": gone,
                            "runs": len(group)})
    return pd.DataFrame.from_records(records, columns=["set", "exact", "ngram13", "overlapping",
                                                       "dropped", "runs"])
