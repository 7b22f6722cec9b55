"""Rebuild the small data subsets shipped in ``lobass/resources/data`` from the shared data folder.

Run once by maintainers (``python scripts/make_shipped_data.py ../shared/data``); the outputs are
committed so that a clean clone runs offline. Sampling is seeded, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "lobass" / "resources" / "data"


def main(shared: Path) -> None:
    """Sample Alpaca, GSM8K and AlpacaEval subsets and copy their licenses."""
    rng = random.Random(0)
    alpaca = json.loads((shared / "alpagasus" / "random_9k.json").read_text())
    # 4 rows of random_9k have an empty output; they would be rejected by the readers anyway.
    alpaca = [r for r in alpaca if r["output"].strip() and r["instruction"].strip()]
    rng.shuffle(alpaca)
    (OUT / "alpaca").mkdir(parents=True, exist_ok=True)
    _write_json(OUT / "alpaca" / "alpaca_pool_1k.json", alpaca[:1000])
    _write_json(OUT / "alpaca" / "alpaca_heldout_200.json", alpaca[1000:1200])
    shutil.copy(shared / "alpaca" / "DATA_LICENSE", OUT / "alpaca" / "DATA_LICENSE")

    gsm_train = (shared / "gsm8k" / "train.jsonl").read_text().splitlines()
    rng.shuffle(gsm_train)
    (OUT / "gsm8k").mkdir(parents=True, exist_ok=True)
    (OUT / "gsm8k" / "gsm8k_train_300.jsonl").write_text("\n".join(gsm_train[:300]) + "\n")
    shutil.copy(shared / "gsm8k" / "test.jsonl", OUT / "gsm8k" / "gsm8k_test.jsonl")
    shutil.copy(shared / "gsm8k" / "LICENSE", OUT / "gsm8k" / "LICENSE")
    _alpaca_eval_subset(shared / "alpaca_eval")
    _alpagasus_in_pool(shared / "alpagasus", alpaca[:1000])


def _alpagasus_in_pool(source: Path, pool: list[dict[str, str]]) -> None:
    """The rows of AlpaGasus' Claude-filtered selection (score >= 4.5) that are in the 1k pool.

    A peer's quality filter as an arm of its own (``selection.listed``): exactly these pool rows.
    Matched on instruction, input and output; kept in the pool's order, unmodified.
    """
    def key(row: dict[str, str]) -> tuple[str, str, str]:
        return row["instruction"], row.get("input", ""), row["output"]

    filtered = {key(r) for r in json.loads((source / "claude_t45.json").read_text())}
    out = OUT / "alpagasus"
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "claude_t45_in_pool_1k.json", [r for r in pool if key(r) in filtered])
    shutil.copy(source / "DATA_LICENSE", out / "DATA_LICENSE")


def _alpaca_eval_subset(source: Path, n: int = 200) -> None:
    """A seeded 200 of AlpacaEval's 805 instructions with gpt-4-1106-preview's answers.

    Its own generator (seed 0), so the Alpaca and GSM8K samples above stay as they were. The rows
    keep the shuffled order: any prefix (``max_rows``) is itself a uniform sample of the five
    source datasets, whereas the file's own order is grouped by dataset. Rows are unmodified.
    """
    rows = json.loads((source / "gpt4_1106_preview" / "model_outputs.json").read_text())
    out = OUT / "alpaca_eval"
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / f"alpaca_eval_gpt4_turbo_{n}.json", random.Random(0).sample(rows, n))
    shutil.copy(source / "DATA_LICENSE", out / "DATA_LICENSE")
    shutil.copy(source / "LICENSE_NOTICE.txt", out / "LICENSE_NOTICE.txt")


def _write_json(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
