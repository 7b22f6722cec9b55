"""Stage 1 of PROTOCOL.md: the manipulation check of the six references, and the choice it fixes.

``python experiments/cpu_gemma_crossfit/stage1.py STAGE1_DIR --out stage1.md --choice choice.json``

Written and committed before any reference was trained. For each reference (in-sample or
cross-fitted, 1 or 3 epochs, reference seed 0 or 1) it reads the run's scores and selection and
reports Spearman(score, response length), the top-k median response length against the pool's,
the mean score per length quartile, and the top-k overlap (Jaccard) across reference seeds,
across epochs and across the two fits. The pre-registered rule (PROTOCOL.md, "Stage 1"): stage 2
trains from the 3-epoch references; when the cross-fitted 3-epoch references' Spearman(score,
length), averaged over their two seeds, is below -0.5, the residualised ranking of the
cross-fitted score (``selection.rank=residual_length``) joins stage 2 as one more arm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from scipy import stats

from lobass.artifacts import atomic_write_text
from lobass.jsonrows import read_jsonl

RULE_THRESHOLD = -0.5  # PROTOCOL.md: below it, the residualised cross-fitted arm joins stage 2
REFERENCES = ("in_sample_e1_r0", "in_sample_e3_r0", "in_sample_e3_r1",
              "cross_fit_e1_r0", "cross_fit_e3_r0", "cross_fit_e3_r1")
PAIRS = {  # label -> (reference, reference) whose top-k sets are compared
    "in-sample, seed 0 vs 1 (3 epochs)": ("in_sample_e3_r0", "in_sample_e3_r1"),
    "cross-fit, seed 0 vs 1 (3 epochs)": ("cross_fit_e3_r0", "cross_fit_e3_r1"),
    "in-sample, 1 vs 3 epochs (seed 0)": ("in_sample_e1_r0", "in_sample_e3_r0"),
    "cross-fit, 1 vs 3 epochs (seed 0)": ("cross_fit_e1_r0", "cross_fit_e3_r0"),
    "in-sample vs cross-fit (3 epochs, seed 0)": ("in_sample_e3_r0", "cross_fit_e3_r0"),
    "in-sample vs cross-fit (1 epoch, seed 0)": ("in_sample_e1_r0", "cross_fit_e1_r0"),
}


def load(run_dir: Path) -> tuple[pd.DataFrame, set[str]]:
    """A reference run's scores (one row per pool row) and the ids its select stage kept."""
    artifacts = json.loads((run_dir / "summary.json").read_text())["artifacts"]
    scores = pd.DataFrame(read_jsonl(Path(artifacts["scores"]))).set_index("id")
    selected = {row["id"] for row in read_jsonl(Path(artifacts["selected"]))}
    return scores, selected


def jaccard(a: set[str], b: set[str]) -> float:
    """Shared share of two top-k sets."""
    return len(a & b) / len(a | b)


def main() -> None:
    """Read the six references, write the table and the choice stage 2 reads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage1", type=Path, help="the folder of the six reference runs")
    parser.add_argument("--out", type=Path, required=True, help="the markdown table to write")
    parser.add_argument("--choice", type=Path, required=True, help="the JSON stage 2 reads")
    args = parser.parse_args()
    runs = {name: load(args.stage1 / name) for name in REFERENCES}
    pool = next(iter(runs.values()))[0]
    rows = []
    for name, (scores, selected) in runs.items():
        length = scores["n_response_tokens"]
        rho = stats.spearmanr(scores["score"], length).statistic
        quartile = pd.qcut(length.rank(method="first"), 4, labels=False)
        by_quartile = scores["score"].groupby(quartile).mean()
        rows.append({"reference": name, "spearman_score_length": rho, "k": len(selected),
                     "topk_median_len": float(length.loc[sorted(selected)].median()),
                     "pool_median_len": float(length.median()),
                     **{f"score_q{q + 1}": float(v) for q, v in by_quartile.items()},
                     "mean_score": float(scores["score"].mean())})
    table = pd.DataFrame(rows).set_index("reference")
    overlap = pd.DataFrame([{"pair": label, "jaccard": jaccard(runs[a][1], runs[b][1]),
                             "shared": len(runs[a][1] & runs[b][1]), "k": len(runs[a][1])}
                            for label, (a, b) in PAIRS.items()]).set_index("pair")
    cross_fit_rho = table.loc[["cross_fit_e3_r0", "cross_fit_e3_r1"], "spearman_score_length"]
    residual_arm = bool(cross_fit_rho.mean() < RULE_THRESHOLD)
    choice = {"references": "3 epochs, both seeds (in-sample and cross-fitted)",
              "cross_fit_e3_spearman_mean": float(cross_fit_rho.mean()),
              "threshold": RULE_THRESHOLD, "residual_arm": residual_arm,
              "pool_rows": int(len(pool))}
    text = ("# Stage 1: manipulation check (no arm trained)\n\n"
            f"Pool: {len(pool)} rows; k = {table['k'].iloc[0]}. Length: response tokens. "
            "score_q1..q4: mean score per response-length quartile, shortest first.\n\n"
            + table.to_markdown(floatfmt=".3f") + "\n\n## Top-k overlap\n\n"
            + overlap.to_markdown(floatfmt=".3f") + "\n\n## Pre-registered choice\n\n"
            f"Cross-fitted 3-epoch references: mean Spearman(score, length) = "
            f"{cross_fit_rho.mean():+.3f} (seeds: "
            + ", ".join(f"{v:+.3f}" for v in cross_fit_rho) + f"); threshold {RULE_THRESHOLD}. "
            + ("Below it: the residualised cross-fitted arm joins stage 2.\n" if residual_arm
               else "Not below it: stage 2 runs the arms of the protocol without the "
                    "residualised arm.\n"))
    atomic_write_text(args.out, text)
    atomic_write_text(args.out.with_suffix(".csv"), table.to_csv())
    atomic_write_text(args.choice, json.dumps(choice, indent=2) + "\n")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
