"""The pre-registered decisions of PROTOCOL.md, computed from the study's runs.

``python experiments/cpu_gemma_learnability/decide.py multirun/cpu_gemma_learnability --out F``
(from the run directories), or ``decide.py --committed experiments/results/cpu_gemma_learnability
--out F`` (from the committed per-run values of its two reports, with the original decisions
beside the new ones).

Written and committed before the main run. It applies the protocol's rules to exactly the
comparisons that decide H1-H4, with the statistics of :mod:`lobass.report.compare`, and Holm's
adjustment over this family of decision comparisons (the six on the primary endpoint plus H4's
GSM8K one: seven, one more than the protocol's "every primary-endpoint comparison", so slightly
conservative).

Analysis correction (issue 28, after the results): the statistics of :mod:`lobass.report.compare`
now treat each training run as one observation (Welch t on per-run means; pooled t with one run
on a side), where the first decisions (``decisions.md``) used a hierarchical bootstrap over 2-3
seeds and 100 prompts. The protocol named the decision rule, not the interval method; the rules
below are unchanged.

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


# the same comparisons by the points of the committed reports: name -> (report, point) per side
COMMITTED: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "H1: LoBaSS top-k vs random": (
        ("report_alpaca", "lobass ratio 0.06 · top · 9 steps · reference seed 0"),
        ("report_alpaca", "random ratio 0.06 · top · 9 steps")),
    "H1': LoBaSS top-k vs random, matched tokens": (
        ("report_alpaca", "lobass ratio 0.06 · top · 9 steps · reference seed 0"),
        ("report_alpaca", "random 75 tokens · top · 9 steps")),
    "H2: LoBaSS top-k vs full data, matched steps": (
        ("report_alpaca", "lobass ratio 0.06 · top · 9 steps · reference seed 0"),
        ("report_alpaca", "full data · 9 steps")),
    "H2: LoBaSS top-k vs full data, reference recipe": (
        ("report_alpaca", "lobass ratio 0.06 · top · 9 steps · reference seed 0"),
        ("report_alpaca", "full data · 1 epoch")),
    "H3: random vs LoBaSS bottom-k": (
        ("report_alpaca", "random ratio 0.06 · top · 9 steps"),
        ("report_alpaca", "lobass ratio 0.06 · bottom · 9 steps · reference seed 0")),
    "H4a: LoBaSS mix vs LoBaSS Alpaca alone": (
        ("report_mix", "lobass ratio 0.06"),
        ("report_alpaca", "lobass ratio 0.06 · top · 9 steps · reference seed 0")),
    "H4b: LoBaSS mix vs full Alpaca + GSM8K (GSM8K loss)": (
        ("report_mix", "lobass ratio 0.06"), ("report_mix", "full data")),
}


def compare(study: Path) -> pd.DataFrame:
    """Every decision comparison from the run directories (:func:`compare_sides`)."""
    runs = collect_runs(study)
    runs = runs[runs["status"] == "ok"]
    sides = {name: (*(runs[[str(p).startswith(str(study / d) + "/") for p in runs["path"]]]
                      for d in (arm, base)), metric)
             for name, (arm, base, metric) in COMPARISONS.items()}
    return compare_sides(sides)


def compare_committed(results: Path) -> pd.DataFrame:
    """Every decision comparison from the committed per-run values (``report_*/report.csv``).

    One CSV row per run, so the runs of each side are the rows of its point; each run's value
    is its mean over the same prompts every run scored (the CSVs hold no per-prompt losses, and
    need none: every run of the study was evaluated on the same 100 prompts).
    """
    reports = {name: pd.read_csv(results / name / "report.csv")
               for name in {report for sides in COMMITTED.values() for report, _ in sides}}
    sides = {name: (*(reports[report][(reports[report]["point"] == point)
                                      & (reports[report]["status"] == "ok")]
                      for report, point in COMMITTED[name]), metric)
             for name, (_, _, metric) in COMPARISONS.items()}
    return compare_sides(sides)


def compare_sides(sides: dict[str, tuple[pd.DataFrame, pd.DataFrame, str]]) -> pd.DataFrame:
    """Difference, 95% interval, method, p, Holm p and reading of each named comparison.

    Args:
        sides: comparison name -> (the arm's runs, the comparator's runs, metric), one row per
            run (a run table of :func:`lobass.report.runs.collect_runs`, or a report CSV).

    Returns:
        One row per comparison, Holm over the tested ones.

    """
    records = []
    for name, (ours, theirs, metric) in sides.items():
        if ours.empty or theirs.empty or metric not in ours or metric not in theirs:
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
            f"{r.get('comparator', math.nan):.4f} | {_interval(r)} | {_method(r)} | "
            f"{r['seeds']} | {r['p']:.3g} | {r['p_holm']:.3g} | {r['reading']} |")
    lines += ["", *(f"- **{h}**: {word}" for h, word in decisions.items()), ""]
    return "\n".join(lines)


def render_side_by_side(original: pd.DataFrame, new: pd.DataFrame) -> str:
    """The first decisions (``decisions.csv``) beside the runs-as-unit ones, as markdown.

    Args:
        original: the committed first decisions (hierarchical bootstrap), one row per
            comparison in :data:`COMPARISONS` order.
        new: :func:`compare_committed`'s table.

    Returns:
        Two tables, comparisons and hypotheses, each marking the verdicts that moved.

    """
    lines = ["| comparison | first: D [95% interval], hierarchical bootstrap | p (Holm) | "
             "reading | new: D [95% interval], t over runs | df | p | p (Holm) | reading | "
             "moved |", "|---|---|---|---|---|---|---|---|---|---|"]
    for old, r in zip(original.to_dict("records"), new.to_dict("records"), strict=True):
        moved = "**yes**" if old["reading"] != r["reading"] else "no"
        lines.append(f"| {r['comparison']} | {_interval(old)} | {old['p_holm']:.3g} | "
                     f"{old['reading']} | {_interval(r)} | {r['df']:.3g} | {r['p']:.3g} | "
                     f"{r['p_holm']:.3g} | {r['reading']} | {moved} |")
    lines += ["", "| hypothesis | first | new | moved |", "|---|---|---|---|"]
    first, now = decide(original), decide(new)
    lines += [f"| {h} | {first[h]} | {now[h]} | {'**yes**' if first[h] != now[h] else 'no'} |"
              for h in first]
    return "\n".join([*lines, ""])


def _interval(r: dict[str, Any]) -> str:
    return f"{r['difference']:+.4f} [{r['diff_low']:+.4f}, {r['diff_high']:+.4f}]"


def _method(r: dict[str, Any]) -> str:
    df = r.get("df", math.nan)
    return (r["method"] or "-") + ("" if pd.isna(df) else f", df {df:.3g}")


def main() -> None:
    """Compare, decide, write the markdown (and a CSV beside it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("study", type=Path, nargs="?", help="the study folder (OUT of the script)")
    source.add_argument("--committed", type=Path, default=None,
                        help="the study's results folder: decide from its committed report CSVs "
                             "and set the first decisions (its decisions.csv) beside the new")
    parser.add_argument("--out", type=Path, required=True, help="decisions markdown file")
    args = parser.parse_args()
    if args.committed is not None:
        frame = compare_committed(args.committed)
        text = render(frame, decide(frame)) + "\n## Beside the first decisions\n\n" + \
            render_side_by_side(pd.read_csv(args.committed / "decisions.csv"), frame)
    else:
        frame = compare(args.study.resolve())
        text = render(frame, decide(frame))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    atomic_write_text(args.out.with_suffix(".csv"), frame.to_csv(index=False))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
