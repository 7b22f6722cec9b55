"""Every shipped config option and experiment composes (and resolves) with Hydra."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF

GROUPS = ["model", "data", "scorer", "selection", "score", "reference", "train", "eval", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = _compose(f"{group}={option}", "data.path=/x.jsonl")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    cfg = _compose(f"experiment={experiment}", "data.path=/x.json")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict) and resolved["model"]["name"]
    header = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_" and header[1].startswith("# run: python run.py")


def test_required_groups_exist():
    for group in [*GROUPS, "experiment"]:
        assert (CONF / group).is_dir(), group
    for model in ("smollm2_135m", "gemma3_270m", "llama_7b", "llama_13b", "tiny_random"):
        assert (CONF / "model" / f"{model}.yaml").is_file()


def test_shipped_data_paths_exist():
    cfg = _compose()
    for path in (cfg.data.path, cfg.data.mix.gsm8k.path, cfg.eval.heldout.path):
        assert Path(path).is_file(), path
