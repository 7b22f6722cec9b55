"""Stage 2 of PROTOCOL.md: the pre-registered decisions on H1-H4, computed from the arms' runs.

``python experiments/cpu_gemma_crossfit/decide.py STAGE2_DIR --out decisions.md
--per-prompt per_prompt_losses.csv``

Written and committed before any arm was trained. Each training run is one observation: its
mean per-prompt response loss on the primary endpoint. A difference D = arm - comparator (lower
loss is better) gets Welch's t on the per-run means (:func:`lobass.stats.run_difference`), its
95% interval, and a two-sided p adjusted by Holm over every comparison below (the family).

Readings, margin delta = 0.02 nats/token:
- a claim "arm beats comparator" (H1, H3, H4): ``equivalent`` when the whole interval lies in
  [-delta, +delta] (read first); ``better`` when the interval lies below 0 and Holm p < 0.05;
  ``worse`` when it lies above 0 and Holm p < 0.05; else ``inconclusive``. better -> supported,
  equivalent or worse -> refuted, inconclusive -> inconclusive.
- H2, a non-inferiority claim (in-sample LoBaSS is no worse than length-matched random by more
  than delta): supported when the interval's upper end is below +delta; refuted when the interval
  lies above 0 and Holm p < 0.05 (and its upper end is not below +delta); else inconclusive.
- H4 (any LoBaSS arm beats the longest k): supported when any of its comparisons reads better;
  refuted when every one reads equivalent or worse; else inconclusive.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lobass.artifacts import atomic_write_text
from lobass.jsonrows import read_jsonl
from lobass.stats import holm_adjust, run_difference

MARGIN = 0.02
ALPHA = 0.05
PRIMARY = "eval/alpaca_eval_gpt4_turbo/loss"
ARMS = ("initial", "random", "lobass_in_sample", "lobass_cross_fit", "length_matched_random",
        "longest", "lobass_cross_fit_residual")
# hypothesis -> [(arm, comparator)], the claim of each: the arm's loss is lower
COMPARISONS: dict[str, list[tuple[str, str]]] = {
    "H1": [("lobass_cross_fit", "random")],
    "H2": [("lobass_in_sample", "length_matched_random")],
    "H3": [("lobass_cross_fit", "lobass_in_sample")],
    "H4": [("lobass_in_sample", "longest"), ("lobass_cross_fit", "longest"),
           ("lobass_cross_fit_residual", "longest")],
}
CLAIMS = {
    "H1": "cross-fitted LoBaSS beats random",
    "H2": "in-sample LoBaSS's deficit against random is no larger than length-matched random's "
          "(in-sample LoBaSS - length-matched random < +delta)",
    "H3": "cross-fitted LoBaSS beats in-sample LoBaSS",
    "H4": "any LoBaSS arm beats the longest k",
}


def selection_lengths(artifacts: dict[str, str]) -> list[int]:
    """Response tokens of each trained row: the selection's ids looked up in the run's scores."""
    if "selected" not in artifacts or "scores" not in artifacts:
        return []
    length = {r["id"]: r["n_response_tokens"] for r in read_jsonl(Path(artifacts["scores"]))}
    return [length[r["id"]] for r in read_jsonl(Path(artifacts["selected"]))]


def load_runs(stage2: Path) -> pd.DataFrame:
    """One row per finished run: arm, seed, reference seed, primary endpoint, selection length."""
    rows = []
    for summary_path in sorted(stage2.glob("*/s*/summary.json")):
        summary = json.loads(summary_path.read_text())
        arm = summary_path.parent.parent.name
        if arm not in ARMS or PRIMARY not in summary["metrics"]:
            continue
        lengths = selection_lengths(summary["artifacts"])
        rows.append({"arm": arm, "run": summary_path.parent.name,
                     "seed": summary["point"]["seed"],
                     "reference_seed": summary["point"].get("reference_seed"),
                     "loss": summary["metrics"][PRIMARY],
                     "selection_median_len": float(np.median(lengths)) if lengths else np.nan,
                     "dir": str(summary_path.parent)})
    return pd.DataFrame(rows)


def reading(low: float, high: float, p_holm: float) -> str:
    """One comparison's reading under the protocol's rule (equivalence read first)."""
    if low >= -MARGIN and high <= MARGIN:
        return "equivalent"
    if high < 0 and p_holm < ALPHA:
        return "better"
    if low > 0 and p_holm < ALPHA:
        return "worse"
    return "inconclusive"


def verdict(hypothesis: str, readings: list[str], highs: list[float]) -> str:
    """A hypothesis' verdict from its comparisons' readings (H2: non-inferiority at the margin)."""
    if hypothesis == "H2":
        if highs[0] < MARGIN:
            return "supported"
        return "refuted" if readings[0] == "worse" else "inconclusive"
    if any(r == "better" for r in readings):
        return "supported"
    if all(r in ("equivalent", "worse") for r in readings):
        return "refuted"
    return "inconclusive"


def main() -> None:
    """Read the arms' runs, write the decisions and the per-prompt losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage2", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-prompt", type=Path, required=True)
    args = parser.parse_args()
    runs = load_runs(args.stage2)
    by_arm = {arm: group["loss"].to_numpy() for arm, group in runs.groupby("arm")}
    arms = (runs.groupby("arm").agg(runs=("loss", "size"), mean=("loss", "mean"),
                                    sd=("loss", "std"),
                                    selection_median_len=("selection_median_len", "median"))
            .reindex([a for a in ARMS if a in by_arm]))
    if "random" in by_arm:
        for arm in arms.index:
            d = run_difference(by_arm[arm], by_arm["random"])
            columns = ["vs_random", "vs_random_low", "vs_random_high"]
            arms.loc[arm, columns] = d.difference, d.low, d.high
    tests = [{"hypothesis": h, "arm": a, "comparator": c, **run_difference(
              by_arm[a], by_arm[c])._asdict()}
             for h, pairs in COMPARISONS.items() for a, c in pairs
             if a in by_arm and c in by_arm]
    table = pd.DataFrame(tests)
    table["p_holm"] = holm_adjust(table["p"].to_numpy())
    table["reading"] = [reading(r.low, r.high, r.p_holm) for r in table.itertuples()]
    verdicts = []
    for h in COMPARISONS:
        part = table[table["hypothesis"] == h]
        verdicts.append({"hypothesis": h, "claim": CLAIMS[h],
                         "verdict": verdict(h, list(part["reading"]), list(part["high"]))
                         if len(part) else "not run"})
    text = ("# Stage 2: decisions (runs as the unit of analysis)\n\n"
            f"Primary endpoint `{PRIMARY}` (mean per-prompt response loss, lower is better); "
            f"margin {MARGIN}; Welch t on per-run means, Holm over {len(table)} comparisons.\n\n"
            "## Verdicts\n\n" + pd.DataFrame(verdicts).to_markdown(index=False)
            + "\n\n## Comparisons\n\n" + table.to_markdown(index=False, floatfmt=".4f")
            + "\n\n## Arms\n\n`vs_random`: mean difference against random with its 95% "
            "interval. `selection_median_len`: median response tokens of the trained rows.\n\n"
            + arms.to_markdown(floatfmt=".4f") + "\n\n## Runs\n\n"
            + runs.drop(columns="dir").to_markdown(index=False, floatfmt=".4f") + "\n")
    atomic_write_text(args.out, text)
    atomic_write_text(args.out.with_suffix(".csv"), table.to_csv(index=False))
    per_prompt = pd.concat([pd.read_csv(Path(r.dir) / "per_prompt_losses.csv")
                            .assign(arm=r.arm, run=r.run, seed=r.seed,
                                    reference_seed=r.reference_seed)
                            for r in runs.itertuples()])
    atomic_write_text(args.per_prompt, per_prompt.to_csv(index=False))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
