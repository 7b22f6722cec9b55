"""experiment=quick_compare: the three arms of the default question end to end, and a report with
a single point that says it has no comparison and how to get one."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from lobass.pipeline import run
from lobass.report import collect_runs, write_report


def test_a_one_point_report_says_it_has_no_comparison_and_how_to_get_one(tmp_path, make_cfg):
    # one real tiny run (scorer=length: no model pass) is one point: no verdict can be made
    run(make_cfg(*TINY, "scorer=length", "stages=[select]"))
    text = write_report(tmp_path / "run").read_text()
    assert "Each arm against its baselines" not in text
    section = text.split("## No comparison\n\n")[1].split("\n")[0]
    assert section.startswith("One point: nothing to compare.")
    assert "python run.py -m experiment=quick_compare scorer=lobass,random seed=0,1" in section
    assert "python -m lobass.report multirun/quick_compare" in section


def _table_rows(section: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``section``, as stripped cells."""
    table = section.split("\n\n|", 1)[1].split("\n\n")[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in ("|" + table).splitlines()[2:]]


@pytest.mark.slow
def test_quick_compare_runs_the_three_arms_and_reports_them(tmp_path, models_dir):
    # the shipped script at debug=tiny sizes: 4 trained points and the initial model, one
    # reference and one scoring pass, then the report over the fixed sweep dir
    sweep = tmp_path / "sweep"
    env = os.environ | {"PYTHON": sys.executable,
                        "OVERRIDES": " ".join([*TINY, f"models_dir={models_dir}"])}
    out = subprocess.run(["bash", str(ROOT / "experiments" / "quick_compare.sh"), str(sweep),
                          str(tmp_path / "artifacts")], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = collect_runs(sweep)
    assert sorted(zip(runs["run"], runs["status"], strict=True)) == [
        ("lora_cpu_lobass_s0", "ok"), ("lora_cpu_lobass_s1", "ok"),
        ("lora_cpu_random_s0", "ok"), ("lora_cpu_random_s1", "ok"), ("none_lobass_s0", "ok")]
    trained = [p for p in (tmp_path / "artifacts" / "finetune").iterdir() if p.is_dir()]
    assert len(trained) == 5  # one reference and the 4 trained points
    text = (sweep / "report.md").read_text()
    points = {cells[0]: cells for cells in _table_rows(text.split("## Points")[1])}
    assert sorted(points) == ["initial model", "lobass ratio 0.25", "random ratio 0.25"]
    assert [points[p][2] for p in sorted(points)] == ["1", "2", "2"]  # seeds
    for cells in points.values():  # both answer losses on every arm, ~ln(49152) on tiny
        assert 10 < float(cells[6]) < 11.5 and 10 < float(cells[8]) < 11.5
    verdicts = _table_rows(text.split("## Each arm against its baselines")[1])
    assert sorted((v[0], v[1], v[3]) for v in verdicts) == [
        ("lobass ratio 0.25", "eval/alpaca_eval_gpt4_turbo/loss", "random (2 seeds)"),
        ("lobass ratio 0.25", "eval/heldout/loss", "random (2 seeds)")]
    assert (sweep / "eval_alpaca_eval_gpt4_turbo_loss.png").stat().st_size > 0


@pytest.mark.slow
def test_lobass_and_random_share_the_recipe_key_and_the_reference_recipe_is_the_scorers(
        make_cfg, tmp_path):
    # random reads no reference: were the reference recipe in the content key `recipe`, every
    # LoBaSS point would lose random rows as its baseline (the three-arm test above then fails)
    cheap = [*TINY, "stages=[select]"]
    for name, extra in (("random", ["scorer=random"]), ("lobass", ["scorer=lobass"]),
                        ("lobass_lr", ["scorer=lobass", "reference.learning_rate=1e-3"])):
        run(make_cfg(*cheap, *extra, f"output_dir={tmp_path / 'sweep' / name}"))
    runs = collect_runs(tmp_path / "sweep").set_index("run")
    assert runs.loc["random", "recipe"] == runs.loc["lobass", "recipe"] == \
        runs.loc["lobass_lr", "recipe"]
    assert runs["point_key"].nunique() == 3  # the reference's learning rate still tells apart
    assert '"reference_recipe": null' in runs.loc["random", "point_key"]
