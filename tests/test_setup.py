"""scripts/setup.sh's choice of torch build, against the headers real drivers print.

The headers are nvidia-smi's own first lines for drivers 535, 550, 570 and 580 (the layout
changed with R550: wider columns); the choice must be a build that driver can run.
"""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from torch_wheel import DriverTooOldError, choose_torch, main  # noqa: E402

SMI_535 = """\
Tue Mar 12 09:41:07 2024
+---------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.161.07             Driver Version: 535.161.07   CUDA Version: 12.2     |
|-----------------------------------------+----------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |         Memory-Usage | GPU-Util  Compute M. |
|                                         |                      |               MIG M. |
|=========================================+======================+======================|
|   0  NVIDIA A100-SXM4-80GB          On  | 00000000:07:00.0 Off |                    0 |
| N/A   31C    P0              61W / 400W |      4MiB / 81920MiB |      0%      Default |
|                                         |                      |             Disabled |
+-----------------------------------------+----------------------+----------------------+
"""
SMI_550 = """\
Wed Nov 13 16:02:55 2024
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.127.05             Driver Version: 550.127.05     CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA L40S                    On  |   00000000:4A:00.0 Off |                    0 |
| N/A   28C    P8             33W /  350W |       1MiB /  46068MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
"""
SMI_570 = """\
Mon Jun 16 11:20:31 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.133.20             Driver Version: 570.133.20     CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |
| N/A   30C    P0             70W /  700W |       0MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
"""
SMI_580 = """\
Mon Oct 27 08:12:44 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.03             Driver Version: 580.159.03     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  NVIDIA H200                    On  |   00000000:19:00.0 Off |                    0 |
| N/A   29C    P0             76W /  700W |       0MiB / 143771MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
"""


@pytest.mark.parametrize("smi,driver,cuda,tag,requirement", [
    (SMI_535, "535.161.07", (12, 2), "cu126", "torch>=2.6,<=2.13.0"),  # minor-version compat
    (SMI_550, "550.127.05", (12, 4), "cu126", "torch>=2.6,<=2.13.0"),
    (SMI_570, "570.133.20", (12, 8), "cu128", "torch>=2.6,<=2.13.0"),
    (SMI_580, "580.159.03", (13, 0), "cu130", "torch==2.13.0"),  # the CPU path's version
])
def test_torch_build_matches_the_driver(smi, driver, cuda, tag, requirement):
    choice = choose_torch(smi)
    assert (choice.driver, choice.cuda, choice.tag) == (driver, cuda, tag)
    assert choice.index_url == f"https://download.pytorch.org/whl/{tag}"
    assert choice.requirement == requirement


def test_old_driver_and_garbage_fail_with_the_fix(capsys):
    old = SMI_535.replace("535.161.07", "470.256.02").replace("12.2", "11.4")
    with pytest.raises(DriverTooOldError, match=r"driver 470\.256\.02 supports CUDA 11\.4.*"
                       r"Update the driver"):
        choose_torch(old)
    assert choose_torch(old.replace("11.4", "11.8")).tag == "cu118"
    with pytest.raises(ValueError, match="TORCH_INDEX_URL"):
        choose_torch("NVIDIA-SMI has failed because it couldn't communicate with the driver")
    assert main(["--nvidia-smi-file", "/dev/null"]) == 1
    assert "TORCH_INDEX_URL" in capsys.readouterr().err


def test_command_line_prints_index_and_requirement_for_setup_sh(tmp_path):
    # setup.sh reads two words from stdout: `read -r -a choice < <(nvidia-smi | torch_wheel.py)`
    out = subprocess.run([sys.executable, str(ROOT / "scripts/torch_wheel.py"), "--explain"],
                         input=SMI_550, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["https://download.pytorch.org/whl/cu126", "torch>=2.6,<=2.13.0"]
    assert "driver 550.127.05 runs CUDA 12.4" in out.stderr


def test_setup_sh_keeps_the_cpu_path_and_checks_cuda_on_gpu_machines():
    script = (ROOT / "scripts/setup.sh").read_text()
    # without a GPU: the CPU build from PyTorch's CPU index, refused before any download if the
    # resolver would pull CUDA packages
    assert "cpu_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" in script
    assert '"torch==2.13.0")' in script and '--dry-run --report "$report"' in script
    assert 'name.startswith("nvidia-")' in script
    assert 'extras="dev,gemma,gpu"' in script and "-c constraints.txt" in script
    assert "torch.cuda.is_available()" in script and "TORCH_INDEX_URL" in script
    # DeepSpeed on CPU machines (the ZeRO-3 tests), built against the installed torch; the
    # requirement is the `deepspeed` extra's
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["deepspeed"]
    assert (f'DS_BUILD_OPS=0 "${{PIP[@]}}" -c constraints.txt --no-build-isolation "{extra[0]}"'
            in script) and extra == ["deepspeed>=0.19.8"]
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts/setup.sh")]).returncode == 0


def _dry_run():
    """``gpu_check.sh --dry-run``: ``name limit command`` rows, a command may span lines."""
    out = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    steps: dict[str, tuple[float, str]] = {}
    for line in out.stdout.splitlines():
        row = re.match(r"^(\w+)\s+(\d+(?:\.\d+)?)s\s+(.*)$", line)
        if row:
            name = row.group(1)
            steps[name] = (float(row.group(2)), row.group(3))
        else:  # the rest of a multi-line command
            steps[name] = (steps[name][0], steps[name][1] + "\n" + line)
    return steps


def test_gpu_check_dry_run_lists_every_step_within_seven_minutes():
    steps = _dry_run()
    assert list(steps) == ["install", "imports", "bench_llama7b", "bench_training", "pipeline",
                           "gpu_tests"]
    assert sum(limit for limit, _ in steps.values()) <= 420
    assert "--device cuda --model tiny_offline --shape llama2_7b" in steps["bench_llama7b"][1]
    assert "--json /tmp/lobass-gpu-check/out/bench_llama7b.json" in steps["bench_llama7b"][1]
    assert "benchmarks/training.py --device cuda" in steps["bench_training"][1]
    assert "-m pytest -m gpu -q" in steps["gpu_tests"][1]


def test_gpu_check_pipeline_overrides_compose_with_the_gpu_groups():
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from lobass.config import validate, with_defaults

    overrides = _dry_run()["pipeline"][1].split()[2:]  # after "python3 run.py"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config", overrides=overrides))
    assert (cfg.model.device, cfg.model.dtype, cfg.score.max_tokens_per_batch) == (
        "cuda", "bfloat16", 16384)
    assert cfg.train.gradient_checkpointing and cfg.eval.gsm8k.batch_size == "auto"
    validate(cfg)


