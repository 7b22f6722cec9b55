"""The select stage: scores -> chosen ids under a rule, exported in the pool's own format.

A rule is a size (ratio or count of rows, a response-token budget, or a band of score quantiles),
an order (top or bottom), and per-source settings (rank within each source; add some sources in
full), so a study can run the arms a reviewer asks for: top-k, bottom-k, a middle band, a random
arm matched on training tokens, and the paper's LoBaSS-selected Alpaca subset plus all of GSM8K.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lobass.artifacts import atomic_write_json, atomic_write_text, ensure_artifact, fingerprint
from lobass.context import Context, StageResult
from lobass.data import Example, read_examples


def selection_size(n_pool: int, ratio: float | None, count: int | None) -> int:
    """How many rows to keep: ``count`` when given, else ``ratio`` of the pool (rounded, >= 1).

    Raises:
        ValueError: neither or both given, a ratio outside (0, 1], or a count outside [1, pool].

    """
    if (ratio is None) == (count is None):
        raise ValueError("set exactly one of selection.ratio and selection.count "
                         f"(got ratio={ratio}, count={count})")
    if count is not None:
        if not 1 <= count <= n_pool:
            raise ValueError(f"selection.count must be in [1, {n_pool}] (the pool size), "
                             f"got {count}")
        return int(count)
    assert ratio is not None
    if not 0 < ratio <= 1:
        raise ValueError(f"selection.ratio must be in (0, 1], got {ratio}")
    return max(1, min(n_pool, math.floor(ratio * n_pool + 0.5)))


def export_rows(examples: Sequence[Example]) -> str:
    """The selected rows as JSON Lines in their pool's own format (ready for other trainers)."""
    return "".join(json.dumps(e.raw, ensure_ascii=False) + "\n" for e in examples)


def read_selected_ids(path: Path) -> list[str]:
    """Ids of a ``selected.jsonl`` file, in rank order."""
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line]


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

    @property
    def mode(self) -> str:
        """``ratio``, ``count``, ``tokens`` or ``band``: the kind of size."""
        if self.listed is not None:
            return "listed"
        if self.band is not None:
            return "band"
        if self.tokens is not None:
            return "tokens"
        return "count" if self.count is not None else "ratio"

    def describe(self) -> dict[str, Any]:
        """The rule as plain values (selection metadata, summary.json's ``point``)."""
        return {"mode": self.mode, "ratio": self.ratio, "count": self.count,
                "tokens": self.tokens, "band": list(self.band) if self.band else None,
                "order": self.order, "by_source": self.by_source,
                "keep_sources": list(self.keep_sources), "listed": self.listed_from}


def rule_from_config(selection_cfg: Any, tokens: int | None = None) -> SelectionRule:
    """The rule of a ``selection`` config group; ``tokens`` resolves ``match_tokens``.

    ``selection.listed`` (a data file read with ``selection.listed_reader``) keeps exactly the
    pool rows that file holds, matched by content id: a peer's selection (AlpaGasus' ChatGPT-
    filtered rows) as an arm of its own.
    """
    band = selection_cfg.get("band")
    budget = selection_cfg.get("budget", "rows")
    listed, listed_from = None, None
    if selection_cfg.get("listed"):
        rows, _ = read_examples(selection_cfg.listed, selection_cfg.get("listed_reader", "alpaca"),
                                on_bad_row="skip")
        listed = frozenset(e.id for e in rows)
        listed_from = f"{Path(selection_cfg.listed).name}@{fingerprint(sorted(listed))}"
    sized = band is None and budget != "tokens" and listed is None
    return SelectionRule(
        ratio=selection_cfg.ratio if sized else None,
        count=selection_cfg.count if sized else None,
        tokens=(tokens if tokens is not None else selection_cfg.get("tokens"))
        if budget == "tokens" else None,
        band=(float(band[0]), float(band[1])) if band is not None else None,
        order=str(selection_cfg.get("order", "top")),
        by_source=bool(selection_cfg.get("by_source", False)),
        keep_sources=tuple(selection_cfg.get("keep_sources") or ()),
        listed=listed, listed_from=listed_from)


def choose_rows(ids: Sequence[str], sources: Sequence[str], scores: np.ndarray,
                n_response: Sequence[int], rule: SelectionRule) -> list[int]:
    """Pool indices chosen by ``rule``, in rank order (group by group, then kept sources).

    Ties are broken by id, so the result is stable; rows with a non-finite score are never
    chosen, not even from a kept source.

    Raises:
        ValueError: a size the rows cannot meet (fewer finite rows than asked).

    """
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
            chosen += ranked[:k]
    kept = [i for i, s in enumerate(sources) if s in rule.keep_sources and np.isfinite(scores[i])]
    return chosen + kept


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
    match = cfg.selection.get("match_tokens")
    rule = rule_from_config(cfg.selection, matched_tokens(match) if match else None)
    n_response = [f.n_response for f in pool.features]
    # The export carries each row as stored: its key follows the rows' metadata too.
    key = fingerprint({"scores": scored.directory.name, "rule": rule.describe(),
                       "rows": pool.rows_fingerprint()})

    def build(work: Path) -> dict[str, Any]:
        chosen = choose_rows(pool.ids, [e.source for e in pool.examples], scores, n_response,
                             rule)
        if not chosen:
            raise ValueError(f"selection {rule.describe()} keeps no row; widen the band or raise "
                             "selection.tokens")
        rows = selected_rows(pool.examples, chosen, scores)
        atomic_write_text(work / "selected.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(work / "export.jsonl", export_rows([pool.examples[i] for i in chosen]))
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
                       {"selected": str(directory / "selected.jsonl")}, ids=ids,
                       identity=meta["rule"])
