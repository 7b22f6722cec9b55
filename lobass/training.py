"""LoRA supervised fine-tuning through transformers ``Trainer`` with response-only labels.

Used twice per study: for the reference model (the initial model fine-tuned on the pool) and for
the final model (the initial model fine-tuned on the selection). Checkpoints go into the artifact's
work directory, so a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.util
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lobass.artifacts import atomic_write_json
from lobass.batches import EpochSeededLengthSampler, FeatureDataset
from lobass.checkpoints import last_complete_checkpoint
from lobass.compilation import compiled_layers
from lobass.devices import resolve_device
from lobass.distributed import world_size
from lobass.formatting import IGNORE_INDEX, Features
from lobass.modeling import lora_config
from lobass.response_loss import ResponseLoss, head_is_adapted
from lobass.shared_prefix import shared_prefix_length

log = logging.getLogger(__name__)

# What peft writes for an adapter; Trainer.save_model adds the tokenizer and pickled arguments.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def gradient_accumulation(train_cfg: DictConfig, world: int) -> int:
    """Micro-batches per optimiser step.

    With ``global_batch_size`` set, accumulation is derived so that ``batch_size x grad_accum x
    world`` rows make one step whatever the number of GPUs (Stanford Alpaca's recipe: 128 rows);
    otherwise ``grad_accum`` is used as it is.

    Raises:
        ValueError: when the global batch is not a multiple of ``batch_size x world``.

    """
    global_batch = train_cfg.global_batch_size
    if global_batch is None:
        return int(train_cfg.grad_accum)
    per_step = int(train_cfg.batch_size) * world
    if global_batch % per_step:
        raise ValueError(
            f"global_batch_size={global_batch} is not a multiple of "
            f"batch_size={train_cfg.batch_size} x {world} process(es); choose a batch_size (or "
            "process count) that divides it")
    return int(global_batch) // per_step


@dataclass(frozen=True)
class TrainingPlan:
    """How a ``train``/``reference`` recipe batches its rows: computed once, read everywhere.

    The Trainer's arguments and sampler, the memory estimate, a fine-tune's token count and the
    training benchmark all read it from :func:`training_plan`. Per process, ``batch_size`` rows
    make one batch, split into forward passes of ``rows_per_pass`` rows whose gradients
    accumulate (activation memory falls with the pass, the optimiser step is the same: the
    sampler groups by the optimiser batch, and the loss divides by the whole step's response
    tokens), and ``accumulation`` batches make one optimiser step.
    """

    batch_size: int  # rows per process per batch
    rows_per_pass: int  # rows per forward pass: the largest divisor of batch_size <= the cap
    accumulation: int  # batches per optimiser step
    world: int  # processes

    @property
    def passes_per_step(self) -> int:
        """Forward passes per optimiser step on one process."""
        return self.accumulation * self.batch_size // self.rows_per_pass

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimiser step, over every process."""
        return self.batch_size * self.accumulation * self.world

    def steps_per_epoch(self, rows: int) -> int:
        """Optimiser steps of one epoch over ``rows`` rows (a last short step counts)."""
        return math.ceil(math.ceil(rows / (self.batch_size * self.world)) / self.accumulation)


def training_plan(train_cfg: DictConfig, world: int | None = None) -> TrainingPlan:
    """The recipe's :class:`TrainingPlan` on ``world`` processes (default: this run's)."""
    world = world_size() if world is None else world
    return TrainingPlan(int(train_cfg.batch_size), rows_per_pass(train_cfg),
                        gradient_accumulation(train_cfg, world), world)


def rows_per_pass(train_cfg: DictConfig) -> int:
    """Rows in one forward pass: the largest divisor of ``batch_size`` <= ``micro_batch_size``.

    ``micro_batch_size`` is a cap, not a divisor that must be chosen to fit: the CPU recipe's
    default (2) then still works for any ``batch_size`` a user sets (3 gives passes of 1 row, 1
    gives 1), and every pass of a step holds the same number of rows. Unset: ``batch_size``.
    """
    batch = int(train_cfg.batch_size)
    cap = train_cfg.micro_batch_size
    if not cap:
        return batch
    return max(d for d in range(1, min(int(cap), batch) + 1) if batch % d == 0)


def shares_prefix(train_cfg: DictConfig) -> bool:
    """Whether ``train_cfg`` asks for the shared prefix and it is exact for that recipe.

    Exact needs the same prefix states in every row (no LoRA dropout: its masks are drawn per
    row) and a cache that reaches the layers (transformers drops it under gradient
    checkpointing); ``train_lora`` also needs one process (``lobass.prefix_trainer``).
    """
    return (bool(train_cfg.share_prefix)
            and float(train_cfg.lora.dropout) == 0.0
            and not bool(train_cfg.gradient_checkpointing))


def checkpointing_argument() -> str:
    """``TrainingArguments``' name for activation checkpointing in the installed transformers.

    5.20 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name stays as
    a deprecated alias there); 5.17, the GPU image's, knows only the old one.
    """
    import dataclasses

    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names \
        else "gradient_checkpointing"


def parallel_arguments(train_cfg: DictConfig) -> dict[str, Any]:
    """FSDP / DeepSpeed / DDP keyword arguments for ``TrainingArguments`` from the config group.

    Data parallelism itself needs nothing here: under ``torchrun`` the ``Trainer`` wraps the model
    in DDP. ``fsdp``/``fsdp_config`` and ``deepspeed`` are handed to transformers unchanged (its
    documentation lists their keys), with one translation: under FSDP ``gradient_checkpointing``
    becomes FSDP's own ``fsdp_config.activation_checkpointing``, because the ``Trainer`` refuses
    both and the plain kind adds a redundant all-gather in the backward pass.
    """
    fsdp = bool(train_cfg.fsdp)
    deepspeed = train_cfg.deepspeed  # at most one of the two: lobass.schema.rules
    checkpointing = bool(train_cfg.gradient_checkpointing)
    kwargs: dict[str, Any] = {
        # LoRA uses every adapter on every step: DDP need not search the graph for unused ones.
        "ddp_find_unused_parameters": False,
        checkpointing_argument(): checkpointing,
    }
    if fsdp:
        fsdp_config = OmegaConf.to_container(train_cfg.fsdp_config, resolve=True)
        assert isinstance(fsdp_config, dict)
        if checkpointing:
            fsdp_config.setdefault("activation_checkpointing", True)
            kwargs[checkpointing_argument()] = False
        kwargs.update(fsdp=True, fsdp_config=fsdp_config)
    if deepspeed:
        # A path to a JSON file or an inline mapping, as TrainingArguments(deepspeed=...) takes.
        kwargs["deepspeed"] = (OmegaConf.to_container(deepspeed, resolve=True)
                               if isinstance(deepspeed, DictConfig) else str(deepspeed))
    return kwargs


def training_arguments(train_cfg: DictConfig, output_dir: Path, seed: int,
                       report_to: str, dtype: str, device: str | None = None) -> Any:
    """``TrainingArguments`` from a ``train``/``reference`` config group.

    Args:
        train_cfg: the ``train`` or ``reference`` group.
        output_dir: where checkpoints go.
        seed: seeds the data order.
        report_to: ``wandb`` or ``none``.
        dtype: model dtype name: bf16 mixed precision on CUDA when ``bfloat16``.
        device: the model's device (``model.device``: auto, cuda or cpu); None = auto. The
            Trainer runs where the model is: ``cuda`` never becomes ``use_cpu`` silently.

    Raises:
        DeviceUnavailableError: ``device`` is ``cuda`` and torch sees no CUDA device.

    """
    from transformers import TrainingArguments

    on_gpu = resolve_device(device or "auto", "training") == "cuda"
    parallel = parallel_arguments(train_cfg)
    plan = training_plan(train_cfg)
    if parallel.get("fsdp"):
        # load_model(sharding="fsdp") leaves the weights on the CPU, real on rank 0 only: FSDP2
        # broadcasts them while it shards, so no rank ever holds the whole model on its GPU.
        parallel["fsdp_config"].setdefault("cpu_ram_efficient_loading", True)
        # Checkpoints as each rank's own shards of the adapter (accelerate's adapter-only
        # save_fsdp_model), and the final adapter from its LoRA tensors alone (train_lora):
        # FULL_STATE_DICT gathers every frozen weight of the model onto rank 0 at every save.
        parallel["fsdp_config"].setdefault("state_dict_type", "SHARDED_STATE_DICT")
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=train_cfg.epochs,
        max_steps=train_cfg.max_steps,
        per_device_train_batch_size=plan.rows_per_pass,
        gradient_accumulation_steps=plan.passes_per_step,
        learning_rate=train_cfg.learning_rate,
        lr_scheduler_type=train_cfg.lr_scheduler,
        warmup_steps=train_cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        logging_steps=train_cfg.logging_steps,
        save_strategy="steps",
        save_steps=train_cfg.save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length",  # less padding, same data per epoch
        bf16=on_gpu and dtype == "bfloat16",
        # liger-kernel (`pip install .[liger]`, GPU only): fused RMSNorm, SwiGLU and RoPE, and,
        # where the model's own loss runs (FSDP, DeepSpeed), a fused linear cross-entropy that
        # never holds the (tokens x vocabulary) logits.
        use_liger_kernel=on_gpu and importlib.util.find_spec("liger_kernel") is not None,
        use_cpu=not on_gpu,
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **parallel,
    )


def train_lora(
    model: Any,
    tokenizer: Any,
    features: Sequence[Features],
    train_cfg: DictConfig,
    lora_targets: list[str],
    work: Path,
    *,
    seed: int,
    report_to: str = "none",
    dtype: str = "float32",
    device: str | None = None,
    response_only: bool = True,
    callbacks: Sequence[Any] = (),
) -> dict[str, float]:
    """Fine-tune a fresh LoRA adapter on ``features`` and save it to ``work/adapter``.

    Args:
        model: the initial model (LoRA layers are injected into it).
        tokenizer: its tokenizer (for padding).
        features: training examples with response-only labels.
        train_cfg: a ``train`` or ``reference`` config group.
        lora_targets: module names to adapt.
        work: the artifact's work directory; checkpoints in ``work/checkpoints`` are resumed.
        seed: seeds LoRA init, data order and dropout.
        report_to: ``wandb`` to stream training curves into the active W&B run, else ``none``.
        dtype: model dtype name (bf16 mixed precision on GPU when ``bfloat16``).
        device: ``check_device``'s answer (``cuda`` or ``cpu``); None = wherever CUDA is.
        response_only: apply the LM head at response positions only (``ResponseLoss``); the
            same training as the model's own loss, to float rounding. Off under FSDP or
            DeepSpeed (their sharded LM head is gathered only inside the model's forward) and
            when the head is a LoRA target; ``False`` is the plain loop (tests, benchmarks).
            With it, ``share_prefix`` encodes the rows' shared prefix once per optimiser step
            (``SharedPrefixTrainer``) where that is exact: no LoRA dropout, no gradient
            checkpointing, one process.
        callbacks: extra ``TrainerCallback`` objects (benchmarks time and measure steps).

    Returns:
        ``train/loss`` (mean over the run), ``train/steps`` and ``train/examples``.

    """
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, set_seed

    from lobass.prefix_trainer import SampledTrainer, SharedPrefixTrainer

    set_seed(seed)  # LoRA's random init happens in get_peft_model, before Trainer seeds anything
    peft_model = get_peft_model(model, lora_config(train_cfg.lora, lora_targets))
    peft_model.train()
    checkpoints = work / "checkpoints"
    args = training_arguments(train_cfg, checkpoints, seed, report_to, dtype, device)
    sharded = bool(train_cfg.fsdp or train_cfg.deepspeed)
    response_only = response_only and not sharded and not head_is_adapted(peft_model)
    prefix = (shared_prefix_length(features)
              if response_only and shares_prefix(train_cfg) and world_size() == 1 else 0)
    if prefix and tokenizer.padding_side != "right":
        # The prefix must open every row of a batch (Gemma's tokenizer pads on the left); the
        # caller's tokenizer is left as it is for generation.
        tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = "right"
    collator: Any = DataCollatorForSeq2Seq(tokenizer, padding=True,
                                           label_pad_token_id=IGNORE_INDEX)
    loss = None
    if response_only:
        loss = ResponseLoss(peft_model)  # LM head at response positions only
        collator = loss.collate(collator)
    # Length-grouped batches (less padding) in an order that a resume in any epoch replays
    # exactly; see EpochSeededLengthSampler for why transformers' own sampler does not.
    plan = training_plan(train_cfg)
    sampler = EpochSeededLengthSampler([len(f.input_ids) for f in features],
                                       plan.batch_size * plan.accumulation, args.data_seed)
    common = {"model": peft_model, "args": args, "train_dataset": FeatureDataset(features),
              "data_collator": collator, "compute_loss_func": loss, "sampler": sampler,
              "callbacks": list(callbacks) or None}
    trainer = (SharedPrefixTrainer(**common, prefix_ids=list(features[0].input_ids[:prefix]))
               if prefix else SampledTrainer(**common))
    log.info("training %d rows; shared prefix encoded once per step: %d tokens", len(features),
             prefix)
    resume = last_complete_checkpoint(checkpoints)
    resumed_step = 0
    if resume is not None:
        resumed_step = int(json.loads((resume / "trainer_state.json").read_text())["global_step"])
        log.info("resuming training from %s (step %d)", resume, resumed_step)
    with compiled_layers(peft_model, bool(train_cfg.compile)):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # Trainer.save_model gathers FSDP / ZeRO-3 shards and writes on the main process only, so every
    # rank calls it; only the peft adapter files are kept (not the tokenizer or pickled arguments).
    # Under FSDP with sharded state dicts it saves nothing, and with full ones it gathers the
    # whole model: the adapter is gathered on its own instead.
    staging = work / "adapter.staging"
    if sharded_state_dicts(trainer):
        gathered = save_fsdp_adapter(peft_model, staging, main=trainer.args.should_save)
        log.info("train.fsdp_config.state_dict_type=SHARDED_STATE_DICT: adapter saved from its "
                 "%d LoRA tensors, gathered alone", gathered)
    else:
        trainer.save_model(str(staging))
    if trainer.args.should_save:
        adapter = work / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        adapter.mkdir()
        for name in ADAPTER_FILES:
            if (staging / name).is_file():
                os.replace(staging / name, adapter / name)
        shutil.rmtree(staging)
        for checkpoint in checkpoints.glob("checkpoint-*"):  # resumable state is not the result
            shutil.rmtree(checkpoint)
    trainer.accelerator.wait_for_everyone()  # no rank leaves before the adapter is on disk
    # The per-step curve (restored from the checkpoint on resume, so it covers the whole run).
    keys = ("step", "epoch", "loss", "grad_norm", "learning_rate")
    history: list[dict[str, float]] = [{k: e[k] for k in keys if k in e}
                                       for e in trainer.state.log_history if "loss" in e]
    if trainer.args.should_save:
        atomic_write_json(work / "log_history.json", history)
    if loss is not None:
        loss.remove()
    peft_model.eval()
    _return_freed_heap()
    return {
        "train/loss": _mean_loss(history, float(result.training_loss), result.global_step,
                                 resumed_step),
        "train/final_loss": float(history[-1]["loss"]) if history else float("nan"),
        "train/steps": float(result.global_step),
        "train/examples": float(len(features)),
    }


def sharded_state_dicts(trainer: Any) -> bool:
    """Whether ``trainer`` runs FSDP with sharded state dicts (``fsdp_config.state_dict_type``)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return plugin is not None and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def save_fsdp_adapter(peft_model: Any, directory: Path, *, main: bool) -> int:
    """Save an FSDP2-sharded peft model's adapter whole, gathering only its LoRA tensors.

    peft's ``get_peft_model_state_dict`` picks the adapter's entries out of the model's state
    dict, which FSDP2 gives as each rank's ``DTensor`` shards without communicating; each is then
    gathered alone (``DTensor.full_tensor``, a collective: every rank calls this, in the same
    order). The frozen base weights, almost all of the model, never leave their ranks. Trainer
    and accelerate offer this only as a pickled ``pytorch_model_fsdp.bin`` checkpoint, not as
    the peft files that ``load_adapter`` reads, hence this function.

    Args:
        peft_model: the trained peft model (FSDP2 shards it in place).
        directory: where rank ``main`` writes the peft files.
        main: whether this rank writes.

    Returns:
        The number of tensors gathered (the adapter's).

    """
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    shards = get_peft_model_state_dict(peft_model)
    whole = {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
             for name, t in shards.items()}
    if main:
        peft_model.save_pretrained(str(directory), state_dict=whole)
    return len(whole)


def _return_freed_heap() -> None:
    """Hand the freed activations of training back to the OS (glibc keeps them otherwise).

    A CPU training step frees gigabytes of activations that glibc's allocator keeps mapped: every
    later stage of the same process would run with that much more resident memory (before and
    after the trim: benchmarks/README.md, "Figures behind design choices").
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mean_loss(history: list[dict[str, float]], training_loss: float, steps: int,
               resumed_step: int) -> float:
    """Mean training loss over the whole run, also when it was resumed from a checkpoint.

    ``Trainer`` reports the mean over the steps this process trained; after a resume the steps
    before the checkpoint are added back from the restored log history, weighted by steps.
    """
    if not resumed_step or not steps:
        return training_loss
    before, previous = 0.0, 0
    for entry in history:
        if entry["step"] > resumed_step:
            break
        before += entry["loss"] * (entry["step"] - previous)
        previous = int(entry["step"])
    if previous != resumed_step:  # the log does not reach the checkpoint: the best we have
        log.warning("logging_steps does not divide checkpoint step %d: train/loss averages "
                    "only the steps trained after it", resumed_step)
        return training_loss
    return (before + training_loss * (steps - resumed_step)) / steps
