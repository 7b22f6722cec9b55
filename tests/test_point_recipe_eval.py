"""Runs trained with another recipe, or measured on another eval, are other points, not seeds."""

import pytest

from conftest import TINY
from lobass.pipeline import run
from lobass.report import collect_runs, write_report


@pytest.mark.slow
def test_runs_with_another_learning_rate_or_eval_size_are_not_pooled_as_seeds(make_cfg,
                                                                              tmp_path):
    # stages=[select] with scorer=random: each run's point, without training (cheap); the
    # recipe a run *would* train with is what the point names
    cheap = [*TINY, "scorer=random", "stages=[select]"]
    for name, seed, extra in (("base_0", 0, []), ("base_1", 1, []),
                              ("lr", 2, ["train.learning_rate=1e-3"]),
                              ("rank", 3, ["train.lora.r=4"]),
                              ("eval", 4, ["eval.heldout.max_rows=3"])):
        run(make_cfg(*cheap, f"seed={seed}", *extra, f"output_dir={tmp_path / 'sweep' / name}"))
    runs = collect_runs(tmp_path / "sweep").set_index("run")
    assert runs["point_key"].nunique() == 4  # base_0 and base_1 are seeds of one point
    assert runs.loc["base_0", "point_key"] == runs.loc["base_1", "point_key"]
    recipe, ev = runs["recipe"], runs["eval"]
    assert recipe["base_0"] == recipe["eval"] != recipe["lr"] != recipe["rank"] != recipe["base_0"]
    assert ev["base_0"] == ev["lr"] == ev["rank"] != ev["eval"]
    text = write_report(tmp_path / "sweep").read_text()
    assert "5 runs, 0 failed, 4 points." in text
    assert "Points differ in `recipe` (the training recipe" in text
    assert "Points differ in `eval` (the evaluation" in text
