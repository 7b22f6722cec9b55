"""summary.json says which code and library versions made its numbers."""

import subprocess
from importlib import metadata

import torch
import transformers

from lobass.provenance import git_state, package_versions


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_git_state_is_the_commit_and_whether_tracked_files_changed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "outputs.txt").write_text("a run's output\n")  # untracked: not dirty
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


def test_git_state_outside_a_checkout_is_unknown(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_package_versions_are_the_installed_ones():
    versions = package_versions(("torch", "transformers", "no-such-distribution-lobass"))
    assert versions == {"torch": torch.__version__, "transformers": transformers.__version__,
                        "no-such-distribution-lobass": None}


def test_summary_records_the_commit_and_the_versions(tiny_train_run):
    recorded = tiny_train_run["provenance"]
    assert recorded["versions"]["peft"] == metadata.version("peft")
    assert recorded["versions"]["lm_eval"] == metadata.version("lm_eval")
    assert recorded["git"] == git_state()
