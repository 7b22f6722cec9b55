"""The GPU recipes on this CPU: configs compose, their architectures build small, LoRA lands on the
named modules and one training step runs; the memory estimate against hand values and against
autograd's own saved tensors; Trainer options from Hydra; the SLURM launcher config.

Nothing is downloaded: each model config carries its architecture (``model.arch``), which the
tests shrink to 2 layers with a small hidden size and the tiny fixture's tokenizer.
"""

import re
import subprocess
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import CONF, ROOT
from lobass.config import ConfigError, validate, with_defaults
from lobass.data import read_examples
from lobass.formatting import tokenize_example
from lobass.memory import architecture_config as arch_config
from lobass.pipeline import run
from lobass.training import (
    ADAPTER_FILES,
    checkpointing_argument,
    gradient_accumulation,
    parallel_arguments,
    train_lora,
)

GPU_MODELS = {  # config -> (hub id, transformers class)
    "llama_7b": ("huggyllama/llama-7b", "LlamaForCausalLM"),
    "llama_13b": ("huggyllama/llama-13b", "LlamaForCausalLM"),
    "llama2_7b": ("meta-llama/Llama-2-7b-hf", "LlamaForCausalLM"),
    "llama2_13b": ("meta-llama/Llama-2-13b-hf", "LlamaForCausalLM"),
    "gemma_2b": ("google/gemma-2b", "GemmaForCausalLM"),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPU_GROUPS = ["train=lora_gpu", "reference=lora_gpu", "eval=gpu"]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return with_defaults(compose(config_name="config", overrides=list(overrides)))


def _small(cfg, vocab_size, layers=2):
    """The model's own architecture with 2 layers and a small width (head layout kept)."""
    arch = cfg.model.arch
    kv_heads = 1 if arch.num_key_value_heads == 1 else 4  # multi-query stays multi-query
    return arch_config(cfg.model, num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                       vocab_size=vocab_size)


@pytest.mark.parametrize("name", sorted(GPU_MODELS))
def test_gpu_model_builds_small_attaches_lora_and_trains_one_step(name, tiny, tmp_path):
    cfg = _compose(f"model={name}", *GPU_GROUPS, "train.max_steps=1", "train.batch_size=2",
                   "train.global_batch_size=4", "train.warmup_ratio=0")  # no lr-0 warmup step
    hub_id, cls = GPU_MODELS[name]
    m = cfg.model
    assert (m.source, m.hub_id, m.dtype, m.attn_implementation) == ("hub", hub_id, "bfloat16",
                                                                    "sdpa")
    assert re.fullmatch(r"[0-9a-f]{40}", m.revision)  # a pinned commit, not a branch
    assert list(m.lora_targets) == ALL_LINEAR and m.template == "alpaca"
    assert cfg.train.gradient_checkpointing and cfg.train.learning_rate == 2e-4
    assert (cfg.train.epochs, cfg.reference.warmup_ratio) == (3, 0.03)
    assert cfg.reference.global_batch_size == 128  # Stanford Alpaca's global batch

    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_small(cfg, len(tokenizer)))
    assert type(model).__name__ == cls and model.config.num_hidden_layers == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows, _ = read_examples(CONF.parent / "lobass/resources/data/alpaca/alpaca_pool_1k.json",
                            "alpaca", max_rows=4)
    features = [tokenize_example(e, tokenizer, m.template, 64) for e in rows]

    metrics = train_lora(model, tokenizer, features, cfg.train, list(m.lora_targets), tmp_path,
                         seed=0)

    # 4 rows = 2 micro-batches of 2 accumulated into the one optimiser step (global batch 4).
    assert metrics["train/steps"] == 1 and metrics["train/examples"] == 4
    assert 5 < metrics["train/loss"] < 15  # random init: about ln(49152) = 10.8
    adapted = {n.split("base_model.model.")[-1] for n, mod in model.named_modules()
               if hasattr(mod, "lora_A") and n.rsplit(".", 1)[-1] in ALL_LINEAR}
    expected = {f"model.layers.{i}.{block}.{proj}" for i in range(2)
                for block, projs in (("self_attn", ALL_LINEAR[:4]), ("mlp", ALL_LINEAR[4:]))
                for proj in projs}
    assert adapted == expected
    # The adapter holds exactly the peft files, and gradients reached layer 0's adapters through
    # gradient checkpointing (lora_B starts at zero; one step moves it).
    adapter = tmp_path / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == sorted(ADAPTER_FILES)
    assert not (tmp_path / "adapter.staging").exists()
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len([k for k in weights if "lora_A" in k]) == len(expected)
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0
    for key, value in model.state_dict().items():  # frozen base weights are untouched
        if "lora_" not in key:
            assert torch.equal(value, before[key.replace(".base_layer", "")]), key

def test_trainer_options_from_hydra():
    cfg = _compose("model=llama_13b", "train=lora_gpu_fsdp", "reference=lora_gpu_deepspeed")
    fsdp = parallel_arguments(cfg.train)
    # The Trainer refuses both kinds of checkpointing: ours becomes FSDP's own.
    assert fsdp["fsdp"] is True and fsdp[checkpointing_argument()] is False
    assert fsdp["fsdp_config"] == {"version": 2, "reshard_after_forward": True,
                                   "cpu_offload": False, "state_dict_type": "SHARDED_STATE_DICT",
                                   "activation_checkpointing": True}
    ds = parallel_arguments(cfg.reference)
    assert ds["deepspeed"]["zero_optimization"]["stage"] == 3 and "fsdp" not in ds
    assert ds[checkpointing_argument()] is True and ds["ddp_find_unused_parameters"] is False
    plain_train = _compose(*GPU_GROUPS).train
    plain = parallel_arguments(plain_train)
    assert "fsdp" not in plain and "deepspeed" not in plain
    # the rule lives in the schema's checks, once: a run with both stops before any work
    both = _compose("train=lora_gpu_fsdp", "train.deepspeed=ds.json")
    with pytest.raises(ConfigError, match="at most one of train.fsdp and train.deepspeed"):
        validate(both)

    # Global batch 128 whatever the GPU count: accumulation is derived from the world size.
    assert [gradient_accumulation(cfg.train, w) for w in (1, 2, 8)] == [16, 8, 2]
    with pytest.raises(ValueError, match="global_batch_size=128 is not a multiple"):
        gradient_accumulation(cfg.train, 3)
    assert gradient_accumulation(_compose().train, 3) == 1  # CPU configs: grad_accum as given
    # Loading for each: the groups name the sharding load_model must prepare for.
    from lobass.devices import weight_sharding

    assert [weight_sharding(g) for g in (cfg.train, cfg.reference, plain_train)] == [
        "fsdp", "zero3", None]


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # the `gpu` extra
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "hydra/launcher=submitit_slurm",
                          "--cfg", "hydra", "-p", "hydra.launcher"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    launcher = yaml.safe_load(out.stdout)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (1, 1, 1)
    assert launcher["max_num_timeout"] == 3
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_says_its_device_and_gpu_models_ask_for_cuda(name):
    device = _compose(f"model={name}").model.device
    assert device == ("cuda" if name in GPU_MODELS else "auto")


def test_cuda_without_cuda_fails_naming_both_fixes(make_cfg, models_dir):
    from lobass.devices import DeviceUnavailableError, check_device
    from lobass.modeling import load_model, resolve_model_path

    assert not torch.cuda.is_available()  # this test describes a machine without CUDA
    assert check_device(_compose("model=tiny_random").model) == "cpu"  # auto
    assert check_device(_compose("model=llama_7b", "model.device=cpu").model) == "cpu"
    with pytest.raises(DeviceUnavailableError, match=r"model=llama_7b asks for model\.device="
                       r"cuda.*scripts/setup\.sh.*add model\.device=cpu"):
        check_device(_compose("model=llama_7b").model)
    with pytest.raises(ValueError, match="model.device must be one of auto, cuda, cpu; got 'gpu'"):
        check_device(_compose("model=tiny_random", "model.device=gpu").model)
    cfg = make_cfg("model=tiny_random", "model.device=cuda")
    path, _ = resolve_model_path(cfg.model, models_dir)
    with pytest.raises(DeviceUnavailableError):  # before from_pretrained reads a weight
        load_model(cfg.model, path)


def test_gpu_recipe_without_cuda_fails_before_any_stage(make_cfg, tmp_path):
    from lobass.devices import DeviceUnavailableError

    with pytest.raises(DeviceUnavailableError, match="model.device=cuda"):
        run(make_cfg("model=tiny_random", "model.device=cuda", "logger=none", "data.max_rows=8",
                     "data.mix={}"))
    assert not (tmp_path / "artifacts" / "reference").exists()  # no stage started


def test_training_runs_where_the_model_is(tmp_path):
    from lobass.devices import DeviceUnavailableError
    from lobass.training import training_arguments

    train = _compose(*GPU_GROUPS).train
    on_cpu = training_arguments(train, tmp_path, 0, "none", "bfloat16", device="cpu")
    assert on_cpu.use_cpu and not on_cpu.bf16
    with pytest.raises(DeviceUnavailableError):  # never a quiet use_cpu=True
        training_arguments(train, tmp_path, 0, "none", "bfloat16", device="cuda")


def test_slurm_launcher_composes_without_the_plugin_one_gpu_per_point():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=submitit_slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # a Hydra job is one process on one GPU: asking for more would leave them idle
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert "scripts/slurm_torchrun.py" in (CONF / "hydra/launcher/submitit_slurm.yaml").read_text()


def test_multi_gpu_point_runs_torchrun_inside_the_job_with_a_c10d_rendezvous():
    sys.path.insert(0, str(ROOT / "scripts"))
    from slurm_torchrun import SlurmJob, main, sbatch_script

    script = sbatch_script(SlurmJob(nodes=2, gpus_per_node=4, partition="gpu", mem_gb=256),
                           ["experiment=paper_alpaca_llama13b", "data.path=/shared/a b.json",
                            "train=lora_gpu_fsdp"])
    lines = script.splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
                      "--cpus-per-task=32", "--mem=256G", "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines
    assert "#SBATCH --account" not in script  # unset options are left out
    command = script.split("head=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)"
                           )[1].replace("\\\n", "")
    words = command.split()
    assert words[words.index("srun"):words.index("srun") + 5] == [
        "srun", "--ntasks-per-node=1", ".venv/bin/python", "-m", "torch.distributed.run"]
    assert {'--nnodes="$SLURM_JOB_NUM_NODES"', "--nproc-per-node=4", '--rdzv-id="$SLURM_JOB_ID"',
            "--rdzv-backend=c10d", '--rdzv-endpoint="$head:29500"'} <= set(words)
    # overrides are shell-quoted; every rank shares the job's run directory
    assert "'data.path=/shared/a b.json'" in command
    assert command.rstrip().endswith('"hydra.run.dir=outputs/slurm-$SLURM_JOB_ID"')
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    with pytest.raises(ValueError, match="--gpus-per-node must be >= 1"):
        sbatch_script(SlurmJob(gpus_per_node=0), [])
    assert main(["--nodes", "1", "--gpus-per-node", "8", "experiment=paper_alpaca_llama7b"]) == 0


def test_lm_eval_batch_auto_passes_through_and_vllm_gets_the_ranks_gpu():
    from lobass.evaluation.harness import lm_batch_size, vllm_device_env

    cfg = _compose("eval=gpu")
    assert lm_batch_size(cfg.eval.gsm8k.batch_size) == "auto"  # lm-eval finds what fits
    assert lm_batch_size(cfg.eval.ifeval.batch_size) == "auto"
    assert lm_batch_size("auto:4") == "auto:4" and lm_batch_size(16) == 16
    with pytest.raises(ValueError, match="positive number, auto or auto:N; got 'big'"):
        lm_batch_size("big")
    # vLLM's engine sees only this rank's GPU (it would take GPU 0 on every rank otherwise)
    assert vllm_device_env(3, None) == "3"
    assert vllm_device_env(1, "4,5,6,7") == "5"  # a SLURM allocation's own numbering
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but CUDA_VISIBLE_DEVICES=0,1"):
        vllm_device_env(2, "0,1")


def test_sharded_loading_keeps_weights_off_the_gpu_and_zero3_needs_its_arguments(
        make_cfg, models_dir, tiny, tmp_path, monkeypatch):
    import os

    from lobass.modeling import load_model, resolve_model_path
    from lobass.training import training_arguments

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    cfg = make_cfg("model=tiny_random")
    path, _ = resolve_model_path(cfg.model, models_dir)
    model = load_model(cfg.model, path, sharding="fsdp")  # one process: rank 0 reads them all
    assert next(model.parameters()).device.type == "cpu"
    for name, param in model.state_dict().items():  # the same weights as a plain load
        assert torch.equal(param, tiny[0].state_dict()[name]), name
    assert "ACCELERATE_USE_FSDP" not in os.environ  # announced for that load only
    with pytest.raises(RuntimeError, match="ZeRO-3 loading needs its TrainingArguments first"):
        load_model(cfg.model, path, sharding="zero3")
    with pytest.raises(ValueError, match="sharding must be None or one of"):
        load_model(cfg.model, path, sharding="tp")
    # FSDP2 then broadcasts rank 0's weights while it shards
    fsdp = _compose("train=lora_gpu_fsdp").train
    args = training_arguments(fsdp, tmp_path, 0, "none", "float32", device="cpu")
    assert args.fsdp_config["cpu_ram_efficient_loading"] is True
