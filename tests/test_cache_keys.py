"""Artifact keys hold every input that changes an artifact's content, and nothing else."""

import json
from pathlib import Path

from conftest import TINY
from lobass.config import package_data
from lobass.pipeline import run


def _pool_file(tmp_path: Path, name: str, *, tag: str | None = None) -> Path:
    rows = json.loads(Path(package_data("alpaca/alpaca_pool_1k.json")).read_text())[:24]
    if tag is not None:  # metadata only: the instruction, input and output are unchanged
        rows = [{**r, "category": tag, "id": f"{tag}-{i}"} for i, r in enumerate(rows)]
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def _select(make_cfg, path: Path, *extra: str) -> dict:
    return run(make_cfg(*TINY, f"data.path={path}", "stages=[select]", "scorer=loss", *extra))


def _export(summary: dict) -> list[dict]:
    export = Path(summary["artifacts"]["selected"]).with_name("export_pool_format.jsonl")
    return [json.loads(x) for x in export.read_text().splitlines()]


def test_row_metadata_and_source_name_rebuild_scores_and_export_not_losses(make_cfg, tmp_path):
    plain = _select(make_cfg, _pool_file(tmp_path, "plain.json"))
    tagged = _select(make_cfg, _pool_file(tmp_path, "tagged.json", tag="news"))
    assert tagged["stages"]["score"]["reused"] is False  # the scores artifact is new ...
    assert tagged["metrics"]["score/init_shards_computed"] == 0  # ... its losses are not
    assert tagged["artifacts"]["scores"] != plain["artifacts"]["scores"]
    assert all(row["category"] == "news" for row in _export(tagged) if "instruction" in row)

    renamed = _select(make_cfg, _pool_file(tmp_path, "plain2.json"), "data.source=alpaca_v2")
    assert renamed["artifacts"]["scores"] != plain["artifacts"]["scores"]
    sources = {json.loads(x)["source"] for x in
               Path(renamed["artifacts"]["scores"]).read_text().splitlines()}
    assert sources == {"alpaca_v2", "gsm8k"}


def test_scoring_batch_budget_is_part_of_the_loss_key(make_cfg, tmp_path):
    path = _pool_file(tmp_path, "plain.json")
    first = _select(make_cfg, path)
    again = _select(make_cfg, path)
    assert again["stages"]["score"]["reused"]
    budget = _select(make_cfg, path, "score.max_tokens_per_batch=256")
    assert budget["metrics"]["score/init_shards_computed"] == 1
    assert budget["artifacts"]["scores"] != first["artifacts"]["scores"]
