"""The pre-registered decisions of PROTOCOL.md, computed from the study's run directories.

``python experiments/cpu_gemma_learnability/decide.py multirun/cpu_gemma_learnability --out F``

Written and committed before the main run. It applies the protocol's rules to exactly the
comparisons that decide H1-H4, with the statistics of :mod:`lobass.report.compare` (paired by
prompt; hierarchical over training seeds when a side has several) and Holm's adjustment over
this family of decision comparisons (the six on the primary endpoint plus H4's GSM8K one: seven,
one more than the protocol's "every primary-endpoint comparison", so slightly conservative).

Reading of one difference D = arm - comparator (lower loss is better), margin delta:
``equivalent`` when the whole 95% interval lies in [-delta, +delta] (read first, as the project's
report does: a difference smaller than the margin is none worth having), then ``better`` /
``worse`` when the interval excludes 0 and Holm p < 0.05, else ``inconclusive``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from lobass.artifacts import atomic_write_text
from lobass.report.compare import difference
from lobass.report.runs import collect_runs
from lobass.stats import holm_adjust

MARGIN = 0.02  # nats/token, PROTOCOL.md
ALPHA = 0.05
PRIMARY = "eval/alpaca_eval_gpt4_turbo/loss"
MATH = "eval/gsm8k_test_solutions/loss"

# name -> (arm dir, comparator dir, metric), dirs relative to the study folder
COMPARISONS: dict[str, tuple[str, str, str]] = {
    "H1: LoBaSS top-k vs random": ("pool_alpaca/lobass_top", "pool_alpaca/random", PRIMARY),
    "H1': LoBaSS top-k vs random, matched tokens": (
        "pool_alpaca/lobass_top", "pool_alpaca/random_tokens", PRIMARY),
    "H2: LoBaSS top-k vs full data, matched steps": (
        "pool_alpaca/lobass_top", "pool_alpaca/full_matched", PRIMARY),
    "H2: LoBaSS top-k vs full data, reference recipe": (
        "pool_alpaca/lobass_top", "pool_alpaca/full_reference", PRIMARY),
    "H3: random vs LoBaSS bottom-k": ("pool_alpaca/random", "pool_alpaca/lobass_bottom", PRIMARY),
    "H4a: LoBaSS mix vs LoBaSS Alpaca alone": ("pool_mix/lobass_mix", "pool_alpaca/lobass_top",
                                               PRIMARY),
    "H4b: LoBaSS mix vs full Alpaca + GSM8K (GSM8K loss)": (
        "pool_mix/lobass_mix", "pool_mix/full_mix", MATH),
}


def reading(row: dict[str, Any]) -> str:
    """The reading (equivalent, better, worse, inconclusive) of one comparison (see above)."""
    low, high = row["diff_low"], row["diff_high"]
    if not row["method"] or math.isnan(low) or math.isnan(high):
        return "not tested"
    if low >= -MARGIN and high <= MARGIN:
        return "equivalent"
    if high < 0 and row["p_holm"] < ALPHA:
        return "better"
    if low > 0 and row["p_holm"] < ALPHA:
        return "worse"
    return "inconclusive"


def compare(study: Path) -> pd.DataFrame:
    """Every decision comparison: difference, 95% interval, method, p, Holm p, reading."""
    runs = collect_runs(study)
    runs = runs[runs["status"] == "ok"]
    records = []
    for name, (arm, base, metric) in COMPARISONS.items():
        ours, theirs = (runs[[str(p).startswith(str(study / d) + "/") for p in runs["path"]]]
                        for d in (arm, base))
        if ours.empty or theirs.empty or metric not in runs:
            records.append({"comparison": name, "metric": metric, "method": "",
                            "difference": math.nan, "diff_low": math.nan,
                            "diff_high": math.nan, "p": math.nan, "seeds": "missing"})
            continue
        records.append({"comparison": name, "metric": metric,
                        "arm": float(ours[metric].mean()),
                        "comparator": float(theirs[metric].mean()),
                        **difference(ours, theirs, metric)})
    frame = pd.DataFrame.from_records(records)
    tested = frame["p"].notna()
    frame["p_holm"] = math.nan
    frame.loc[tested, "p_holm"] = holm_adjust(frame.loc[tested, "p"].to_numpy(dtype=float))
    frame["reading"] = [reading(row) for row in frame.to_dict("records")]
    return frame


def decide(frame: pd.DataFrame) -> dict[str, str]:
    """H1-H4 by the protocol's decision rules, from :func:`compare`'s readings and intervals."""
    by_name = {rec["comparison"].split(": ", 1)[1]: rec for rec in frame.to_dict("records")}

    def r(name: str) -> dict[str, Any]:
        return by_name[name]

    h1 = r("LoBaSS top-k vs random")
    h1_word = ("supported" if h1["reading"] == "better" else
               "refuted" if h1["reading"] in ("equivalent", "worse") else "inconclusive")
    full = [r("LoBaSS top-k vs full data, matched steps"),
            r("LoBaSS top-k vs full data, reference recipe")]
    h2_word = ("supported" if all(f["diff_high"] < MARGIN for f in full) else
               "refuted" if any(f["diff_low"] > MARGIN for f in full) else "inconclusive")
    h3 = r("random vs LoBaSS bottom-k")
    h3_word = ("supported" if h1_word == "supported" and h3["reading"] == "better" else
               "refuted" if "worse" in (h1["reading"], h3["reading"]) else "inconclusive")
    mix, math_ = r("LoBaSS mix vs LoBaSS Alpaca alone"), r(
        "LoBaSS mix vs full Alpaca + GSM8K (GSM8K loss)")
    a_ok, b_ok = mix["diff_high"] < MARGIN, math_["reading"] in ("equivalent", "better")
    h4_word = ("supported" if a_ok and b_ok else
               "refuted" if mix["diff_low"] > MARGIN or math_["diff_low"] > MARGIN
               else "inconclusive")
    return {"H1": h1_word, "H2": h2_word, "H3": h3_word, "H4": h4_word}


def render(frame: pd.DataFrame, decisions: dict[str, str]) -> str:
    """The decision table and the four answers, as markdown."""
    lines = ["# Pre-registered decisions (PROTOCOL.md)", "",
             f"Margin {MARGIN} nats/token; Holm over {int(frame['p'].notna().sum())} tested "
             "decision comparisons; D = arm - comparator, lower loss is better.", "",
             "| comparison | metric | arm | comparator | D [95% interval] | method | seeds | p "
             "| p (Holm) | reading |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in frame.to_dict("records"):
        lines.append(
            f"| {r['comparison']} | {r['metric']} | {r.get('arm', math.nan):.4f} | "
            f"{r.get('comparator', math.nan):.4f} | {r['difference']:+.4f} "
            f"[{r['diff_low']:+.4f}, {r['diff_high']:+.4f}] | {r['method'] or '-'} | "
            f"{r['seeds']} | {r['p']:.3g} | {r['p_holm']:.3g} | {r['reading']} |")
    lines += ["", *(f"- **{h}**: {word}" for h, word in decisions.items()), ""]
    return "\n".join(lines)


def main() -> None:
    """Compare, decide, write the markdown (and a CSV beside it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study folder (OUT of the script)")
    parser.add_argument("--out", type=Path, required=True, help="decisions markdown file")
    args = parser.parse_args()
    frame = compare(args.study.resolve())
    decisions = decide(frame)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, render(frame, decisions))
    atomic_write_text(args.out.with_suffix(".csv"), frame.to_csv(index=False))
    sys.stdout.write(render(frame, decisions))


if __name__ == "__main__":
    main()
