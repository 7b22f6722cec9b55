"""The select stage: scores -> chosen ids under a rule, exported in the pool's own format.

A rule is a size (ratio or count of rows, a response-token budget, or a band of score quantiles),
an order (top or bottom), and per-source settings (rank within each source; add some sources in
full), so a study can run the arms a reviewer asks for: top-k, bottom-k, a middle band, a random
arm matched on training tokens, and the paper's LoBaSS-selected Alpaca subset plus all of GSM8K.
Three length controls ask whether a score is more than a length preference: rank by the score
residualised on log response length, take the top-k within each length quantile, or draw random
rows whose length distribution matches another selection's, bin by bin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lobass.artifacts import atomic_write_json, atomic_write_text, ensure_artifact, fingerprint
from lobass.context import Context, StageResult
from lobass.data import Example, read_examples
from lobass.jsonrows import jsonl_text, read_jsonl


def selection_size(n_pool: int, ratio: float | None, count: int | None) -> int:
    """How many rows to keep: ``count`` when given, else ``ratio`` of the pool (rounded, >= 1).

    The rules on the two are the config's, checked once before any work: exactly one of them
    (``lobass.config.validate``), a ratio in (0, 1] (the schema) and a count within each ranked
    group (``lobass.config.validate_pool``).
    """
    if count is not None:
        return int(count)
    assert ratio is not None
    return max(1, min(n_pool, math.floor(ratio * n_pool + 0.5)))


def export_rows(examples: Sequence[Example]) -> str:
    """The selected rows as JSON Lines in their pool's own format, metadata and all."""
    return jsonl_text(e.raw for e in examples)


def trained_rows(examples: Sequence[Example], selected: Sequence[dict[str, Any]]) -> str:
    """The selected rows as they were trained, one normalised row each (``export.jsonl``).

    Every row has the same columns, none of them null, so ``datasets.load_dataset("json")`` and
    LLaMA-Factory's Alpaca format (``instruction``/``input``/``output``/``system``/``history``)
    read it as is. The text is what the model was trained on, after any reader's cleaning (GSM8K's
    calculator annotations stripped): the final user turn is ``instruction`` (an Alpaca input is
    already part of it, joined as it was trained), so ``input`` is empty; earlier turns are
    ``history`` pairs; ``messages`` is the whole conversation for chat trainers. ``id``, ``source``,
    ``rank`` and ``score`` come from ``selected.jsonl``.
    """
    by_id = {e.id: e for e in examples}
    lines: list[dict[str, Any]] = []
    for row in selected:
        messages = list(by_id[row["id"]].messages)
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        system = messages[0]["content"] if turns is not messages else ""
        *before, user, answer = turns
        # consecutive earlier turns as [user, assistant] pairs (a turn missing its partner: "")
        history: list[list[str]] = []
        for message in before:
            if message["role"] == "user" or not history or history[-1][1]:
                history.append(["", ""])
            history[-1][0 if message["role"] == "user" else 1] = message["content"]
        lines.append({
            "id": row["id"], "source": row["source"], "rank": row["rank"], "score": row["score"],
            "instruction": user["content"], "input": "", "output": answer["content"],
            "system": system, "history": history, "messages": messages,
        })
    return jsonl_text(lines)


def read_selected_ids(path: Path) -> list[str]:
    """Ids of a ``selected.jsonl`` file, in rank order."""
    return [row["id"] for row in read_jsonl(path)]


def selected_rows(examples: Sequence[Example], chosen: Sequence[int],
                  scores: np.ndarray) -> list[dict[str, Any]]:
    """``selected.jsonl`` rows: rank, id, source and score of every chosen example."""
    return [
        {"rank": rank, "id": examples[i].id, "source": examples[i].source,
         "score": float(scores[i])}
        for rank, i in enumerate(chosen)
    ]


@dataclass(frozen=True)
class SelectionRule:
    """How rows are chosen from scores; what makes a selection a point of a study.

    Exactly one size is set: ``ratio`` or ``count`` (rows, per source with ``by_source``),
    ``tokens`` (response tokens, ``budget=tokens``), or ``band`` (score quantiles ``[lo, hi]``).
    """

    ratio: float | None = None
    count: int | None = None
    tokens: int | None = None
    band: tuple[float, float] | None = None
    order: str = "top"  # top: highest scores first | bottom: lowest first
    by_source: bool = False  # apply the size within each source (the paper's Alpaca + GSM8K mix)
    keep_sources: tuple[str, ...] = ()  # sources added in full, never ranked
    listed: frozenset[str] | None = None  # content ids of another selection (e.g. AlpaGasus')
    listed_from: str | None = None  # where ``listed`` came from (file name and content hash)
    rank: str = "score"  # score | residual_length: the score less its OLS fit on log length
    stratify: str | None = None  # length: the size split evenly over length quantiles
    length_bins: int = 10  # quantile bins of stratify=length and of length_matched_random
    # rule=length_matched_random: the response lengths of the named selection, and its name
    matched_lengths: tuple[int, ...] | None = None
    matched_from: str | None = None
    seed: int = 0  # the draw of length_matched_random (the run's seed; not part of the point)

    @property
    def mode(self) -> str:
        """``ratio``, ``count``, ``tokens``, ``band``, ``listed`` or ``length_matched``."""
        if self.matched_lengths is not None:
            return "length_matched"
        if self.listed is not None:
            return "listed"
        if self.band is not None:
            return "band"
        if self.tokens is not None:
            return "tokens"
        return "count" if self.count is not None else "ratio"

    def describe(self) -> dict[str, Any]:
        """The rule as plain values (selection metadata, summary.json's ``point``).

        The length controls add their keys only when set, so every other rule keeps the
        identity (and the cached selection) it had before they existed. The seed is never here:
        runs that differ only in it are seeds of one point.
        """
        plain = {"mode": self.mode, "ratio": self.ratio, "count": self.count,
                 "tokens": self.tokens, "band": list(self.band) if self.band else None,
                 "order": self.order, "by_source": self.by_source,
                 "keep_sources": list(self.keep_sources), "listed": self.listed_from}
        if self.rank != "score":
            plain["rank"] = self.rank
        if self.stratify is not None:
            plain.update(stratify=self.stratify, length_bins=self.length_bins)
        if self.matched_lengths is not None:
            plain.update(matched=self.matched_from, length_bins=self.length_bins)
        return plain


def rule_from_config(selection_cfg: Any, tokens: int | None = None, *,
                     matched: tuple[str, Sequence[int]] | None = None,
                     seed: int = 0) -> SelectionRule:
    """The rule of a ``selection`` config group.

    ``selection.listed`` (a data file read with ``selection.listed_reader``) keeps exactly the
    pool rows that file holds, matched by content id: a peer's selection (AlpaGasus' ChatGPT-
    filtered rows) as an arm of its own.

    Args:
        selection_cfg: the ``selection`` group.
        tokens: the resolved ``match_tokens`` budget.
        matched: ``selection.rule=length_matched_random``: the named selection's label and
            response lengths (:func:`matched_lengths`).
        seed: the run's seed, which draws ``length_matched_random``.

    """
    band = selection_cfg.band
    budget = selection_cfg.budget
    listed, listed_from = None, None
    if selection_cfg.listed:
        rows, _ = read_examples(selection_cfg.listed, selection_cfg.listed_reader,
                                on_bad_row="skip")
        listed = frozenset(e.id for e in rows)
        listed_from = f"{Path(selection_cfg.listed).name}@{fingerprint(sorted(listed))}"
    # the size is rows (ratio or count) unless a band, a token budget, a listed file, or the
    # named selection of length_matched_random (its row count) sets it
    sized = band is None and budget != "tokens" and listed is None and matched is None
    return SelectionRule(
        ratio=selection_cfg.ratio if sized else None,
        count=selection_cfg.count if sized else None,
        tokens=(tokens if tokens is not None else selection_cfg.tokens)
        if budget == "tokens" else None,
        band=(float(band[0]), float(band[1])) if band is not None else None,
        order=str(selection_cfg.order),
        by_source=bool(selection_cfg.by_source),
        keep_sources=tuple(selection_cfg.keep_sources),
        listed=listed, listed_from=listed_from,
        rank=str(selection_cfg.rank), stratify=selection_cfg.stratify,
        length_bins=int(selection_cfg.length_bins),
        matched_lengths=tuple(int(n) for n in matched[1]) if matched else None,
        matched_from=matched[0] if matched else None, seed=int(seed))


def choose_rows(ids: Sequence[str], sources: Sequence[str], scores: np.ndarray,
                n_response: Sequence[int], rule: SelectionRule) -> list[int]:
    """Pool indices chosen by ``rule``, in rank order (group by group, then kept sources).

    Ties are broken by id, so the result is stable; rows with a non-finite score are never
    chosen, not even from a kept source. ``rule.rank=residual_length`` ranks by
    :func:`ranking_scores`; ``rule.matched_lengths`` draws :func:`length_matched_rows`.

    Raises:
        ValueError: a size the rows cannot meet (fewer finite rows than asked).

    """
    scores = ranking_scores(scores, n_response, rule)
    if rule.matched_lengths is not None:
        return length_matched_rows(ids, scores, n_response, rule.matched_lengths,
                                   rule.length_bins, rule.seed)
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        if source not in rule.keep_sources:
            groups.setdefault(source if rule.by_source else "", []).append(i)
    chosen: list[int] = []
    for rows in groups.values():
        ranked = [i for i in rows if np.isfinite(scores[i])]
        sign = -1.0 if rule.order == "top" else 1.0
        ranked.sort(key=lambda i: (sign * float(scores[i]), ids[i]))
        if rule.listed is not None:
            chosen += [i for i in ranked if ids[i] in rule.listed]
        elif rule.band is not None:
            chosen += _in_band(ranked, rule.band, rule.order)
        elif rule.tokens is not None:
            chosen += _within_tokens(ranked, n_response, rule.tokens)
        else:
            k = selection_size(len(rows), rule.ratio, rule.count)
            if len(ranked) < k:
                raise ValueError(f"only {len(ranked)} rows have a finite score; cannot select {k}")
            chosen += (_stratified(ranked, n_response, k, rule.length_bins)
                       if rule.stratify == "length" else ranked[:k])
    kept = [i for i, s in enumerate(sources) if s in rule.keep_sources and np.isfinite(scores[i])]
    return chosen + kept


def ranking_scores(scores: np.ndarray, n_response: Sequence[int],
                   rule: SelectionRule) -> np.ndarray:
    """What ranks the rows: the score, or (``rank=residual_length``) its residual on log length.

    The residual is the score less its ordinary least-squares line on ``log(response tokens)``,
    fitted on every pool row with a finite score (all sources): a row ranks high when it scores
    higher than rows of its length do, so a score that only prefers short answers ranks by
    nothing but noise. Rows with no response token get NaN (never selected).
    """
    if rule.rank != "residual_length":
        return scores
    lengths = np.asarray(n_response, dtype=float)  # (N,)
    fit = np.isfinite(scores) & (lengths >= 1)
    if fit.sum() < 3:
        raise ValueError(f"selection.rank=residual_length needs at least 3 rows with a finite "
                         f"score and a response token to fit on, got {int(fit.sum())}")
    log_length = np.log(np.where(lengths >= 1, lengths, np.nan))  # (N,)
    slope, intercept = np.polyfit(log_length[fit], scores[fit], 1)
    return np.where(fit, scores - (slope * log_length + intercept), np.nan)


def _quantile_bins(lengths: Sequence[int], q: int) -> np.ndarray:
    """Equal-frequency bin of each length (0 = shortest), at most ``q`` bins (ties merge edges)."""
    codes = pd.qcut(np.asarray(lengths, dtype=float), q, labels=False, duplicates="drop")
    return np.asarray(codes, dtype=int)


def _stratified(ranked: list[int], n_response: Sequence[int], k: int, q: int) -> list[int]:
    """The top ``k`` of ``ranked`` spread over the length quantiles of those rows.

    Each of the (up to ``q``) bins gives its best ``k // bins`` rows (all it has, if fewer); the
    remaining places (``k % bins`` and any bin's shortfall) go to the best rows not yet taken,
    whatever their bin. Returned in rank order.
    """
    bins = _quantile_bins([n_response[i] for i in ranked], q)  # bin of each ranked row
    per_bin = k // (int(bins.max()) + 1)
    taken: dict[int, int] = {}
    chosen: set[int] = set()
    for position, row in enumerate(ranked):  # best first, so each bin keeps its best
        if taken.get(bins[position], 0) < per_bin:
            taken[bins[position]] = taken.get(bins[position], 0) + 1
            chosen.add(row)
    for row in ranked:  # the remainder, by score
        if len(chosen) >= k:
            break
        chosen.add(row)
    return [i for i in ranked if i in chosen]


def length_matched_rows(ids: Sequence[str], scores: np.ndarray, n_response: Sequence[int],
                        target: Sequence[int], q: int, seed: int) -> list[int]:
    """Random rows with exactly as many per length bin as ``target`` (another selection) has.

    The bins are ``q`` quantile bins of the target's response lengths (fewer when its lengths
    tie), closed on both outer edges; pool rows outside the target's range are never drawn.
    Within a bin the draw is uniform without replacement, from the rows in id order, with
    ``numpy.random.default_rng(seed)``: the same seed gives the same rows. Rows with a
    non-finite score are left out (as by every rule).

    Returns:
        ``len(target)`` pool indices, bin by bin (shortest first), in draw order.

    Raises:
        ValueError: a bin the pool cannot fill.

    """
    target_lengths = np.asarray(target, dtype=float)
    edges = np.unique(np.quantile(target_lengths, np.linspace(0, 1, q + 1)))
    lengths = np.asarray(n_response, dtype=float)
    if len(edges) == 1:  # every target row has one length: that length is the only bin
        pool_bins = np.where(lengths == edges[0], 0, -1)
        target_bins = np.zeros(len(target_lengths), dtype=int)
    else:  # pandas' interval binning: right-closed, the lowest edge included
        pool_bins = pd.cut(lengths, edges, labels=False, include_lowest=True)
        pool_bins = np.nan_to_num(pool_bins, nan=-1).astype(int)
        target_bins = np.asarray(pd.cut(target_lengths, edges, labels=False,
                                        include_lowest=True), dtype=int)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for b, need in sorted(zip(*np.unique(target_bins, return_counts=True), strict=True)):
        rows = sorted((i for i in range(len(ids)) if pool_bins[i] == b and np.isfinite(scores[i])),
                      key=lambda i: ids[i])
        if len(rows) < need:
            raise ValueError(f"selection.rule=length_matched_random: the named selection has "
                             f"{need} rows of {edges[b]:g}-{edges[min(b + 1, len(edges) - 1)]:g} "
                             f"response tokens but this pool only {len(rows)}; match a selection "
                             "of this pool")
        chosen += [rows[j] for j in rng.choice(len(rows), size=int(need), replace=False)]
    return chosen


def _in_band(ranked: list[int], band: tuple[float, float], order: str) -> list[int]:
    """Rows whose score quantile (0 = lowest, 1 = highest; mid-rank) lies in ``band``."""
    n = len(ranked)
    ascending = ranked if order == "bottom" else ranked[::-1]
    inside = {i for p, i in enumerate(ascending) if band[0] <= (p + 0.5) / n <= band[1]}
    return [i for i in ranked if i in inside]


def _within_tokens(ranked: list[int], n_response: Sequence[int], budget: int) -> list[int]:
    """The rank-order prefix whose response tokens come closest to ``budget`` (at least one row).

    Why closest rather than "at most": a token-matched control for a selection of short rows
    has a small budget (12 rows of ~10 tokens), and a random order whose first row alone is
    longer would keep no row at all. The prefix sums grow, so the distance to the budget falls
    then rises: stop where it would rise (ties keep the shorter prefix). The match is then
    within half a row's tokens either way.
    """
    taken: list[int] = []
    total = 0
    for i in ranked:
        after = total + n_response[i]
        if taken and abs(after - budget) >= abs(total - budget):
            break
        taken.append(i)
        total = after
    return taken


def composition(examples: Sequence[Example], chosen: Sequence[int],
                n_response: Sequence[int]) -> dict[str, dict[str, float]]:
    """Rows, response tokens and mean response length of a selection, per source and in all."""
    parts: dict[str, list[int]] = {}
    for i in chosen:
        parts.setdefault(examples[i].source, []).append(n_response[i])
    parts["all"] = [n_response[i] for i in chosen]
    return {source: {"rows": float(len(n)), "response_tokens": float(sum(n)),
                     "mean_response_tokens": float(sum(n) / len(n)) if n else 0.0}
            for source, n in parts.items()}


def matched_tokens(path: str | Path) -> int:
    """The response tokens of another selection: a run dir (summary.json) or selection dir."""
    path = Path(path)
    for candidate in (path / "summary.json", path / "meta.json"):
        if candidate.is_file():
            doc = json.loads(candidate.read_text())
            if "metrics" in doc and "select/response_tokens" in doc["metrics"]:
                return int(doc["metrics"]["select/response_tokens"])
            if "composition" in doc:
                return int(doc["composition"]["all"]["response_tokens"])
    raise FileNotFoundError(f"selection.match_tokens={path}: no summary.json with "
                            "select/response_tokens and no selection meta.json with a "
                            "composition there; give a run directory or a selection artifact")


def matched_lengths(path: str | Path, ids: Sequence[str],
                    n_response: Sequence[int]) -> tuple[str, list[int]]:
    """The response lengths (in this pool) of another selection's rows, and a label for it.

    ``path`` is a run directory (its ``summary.json`` names its ``selected.jsonl``) or a
    selection artifact (holding ``selected.jsonl``), as for ``selection.match_tokens``.

    Raises:
        FileNotFoundError: neither is there.
        ValueError: some of its rows are not in this pool.

    """
    path = Path(path)
    selected = path / "selected.jsonl"
    if not selected.is_file() and (path / "summary.json").is_file():
        named = json.loads((path / "summary.json").read_text()).get("artifacts", {})
        selected = Path(named.get("selected", selected))
    if not selected.is_file():
        raise FileNotFoundError(f"selection.match_lengths={path}: no selected.jsonl there and "
                                "no summary.json naming one; give a run directory or a "
                                "selection artifact")
    chosen = read_selected_ids(selected)
    row = {row_id: i for i, row_id in enumerate(ids)}
    missing = [c for c in chosen if c not in row]
    if missing:
        raise ValueError(f"selection.match_lengths={path}: {len(missing)} of its "
                         f"{len(chosen)} rows are not in this pool (e.g. {missing[0]}); match a "
                         "selection made from the same data")
    return f"{path.name}@{fingerprint(sorted(chosen))}", [n_response[row[c]] for c in chosen]


def select(ctx: Context, scored: StageResult) -> StageResult:
    """The select stage: rows by score under the ``selection`` rule, exported in the pool's format.

    Args:
        ctx: the run's context.
        scored: the score stage's result (its artifact names the key; its scores rank the rows).

    Returns:
        The selection artifact (``selected.jsonl``, ``export.jsonl``, ``meta.json`` with the rule
        and the composition) with the chosen ids in rank order, ``select/count`` and
        ``select/<source>/{rows,response_tokens,mean_response_tokens}``.

    """
    cfg, pool = ctx.cfg, ctx.pool
    assert scored.scores is not None
    scores = scored.scores
    match = cfg.selection.match_tokens
    n_response = [f.n_response for f in pool.features]
    matched = None
    if cfg.selection.rule == "length_matched_random":
        matched = matched_lengths(cfg.selection.match_lengths, pool.ids, n_response)
    rule = rule_from_config(cfg.selection, matched_tokens(match) if match else None,
                            matched=matched, seed=int(cfg.seed))
    # The export carries each row as stored: its key follows the rows' metadata too. A random
    # draw follows its seed, which the rule leaves out (the seed is not part of the point).
    key = fingerprint({"scores": scored.directory.name, "rule": rule.describe(), "export": 2,
                       "rows": pool.rows_fingerprint(),
                       **({"seed": rule.seed} if rule.mode == "length_matched" else {})})

    def build(work: Path) -> dict[str, Any]:
        chosen = choose_rows(pool.ids, [e.source for e in pool.examples], scores, n_response,
                             rule)
        if not chosen:
            raise ValueError(f"selection {rule.describe()} keeps no row; widen the band or raise "
                             "selection.tokens")
        # the value each row was ranked by (the residual under rank=residual_length)
        rows = selected_rows(pool.examples, chosen, ranking_scores(scores, n_response, rule))
        atomic_write_text(work / "selected.jsonl", jsonl_text(rows))
        atomic_write_text(work / "export.jsonl", trained_rows(pool.examples, rows))
        atomic_write_text(work / "export_pool_format.jsonl",
                          export_rows([pool.examples[i] for i in chosen]))
        atomic_write_json(work / "meta.json", {
            "count": len(chosen), "pool": len(pool.examples), "ratio": rule.ratio,
            "rule": rule.describe(), "composition": composition(pool.examples, chosen,
                                                                n_response)})
        return {"count": len(chosen)}

    directory, reused = ensure_artifact(ctx.artifacts_dir / "selection" / key, build)
    ids = read_selected_ids(directory / "selected.jsonl")
    meta = json.loads((directory / "meta.json").read_text())
    metrics = {"select/count": float(len(ids))}
    for source, parts in meta["composition"].items():
        prefix = "select" if source == "all" else f"select/{source}"
        metrics.update({f"{prefix}/{k}": v for k, v in parts.items() if
                        not (source == "all" and k == "rows")})
    ctx.tracker.log_file("selected", "selection", directory / "selected.jsonl")
    return StageResult(directory, reused, metrics,
                       {"selected": str(directory / "selected.jsonl"),
                        "export": str(directory / "export.jsonl")}, ids=ids,
                       identity=meta["rule"])
