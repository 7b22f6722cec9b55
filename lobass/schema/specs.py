"""The schema of every config group, one dataclass each (see :mod:`lobass.schema`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lobass.schema.eval_specs import JUDGE_SPECS, EvalSpec
from lobass.schema.registries import attention, dtypes, readers, schedulers, scorers
from lobass.schema.walk import knob

__all__ = ["JUDGE_SPECS", "LOGGER_SPECS", "RootSpec"]


@dataclass(kw_only=True)
class ModelSpec:
    """``model``: the initial model, its source, precision and LoRA targets."""

    name: str = knob(plain=True)  # a directory name under models_dir
    source: Literal["gguf", "hub", "random"] = knob()
    dtype: str = knob(choices=dtypes)
    template: Literal["alpaca", "chat"] = knob()
    trust_remote_code: bool = knob()
    lora_targets: list[str] = knob()
    attn_implementation: str = knob("sdpa", choices=attention)
    device: Literal["auto", "cpu", "cuda"] = knob("auto")
    hub_id: str | None = knob(None)
    revision: str | None = knob(None)
    gguf_package: str | None = knob(None, plain=True)
    gguf_file: str | None = knob(None, plain=True)
    arch: dict[str, Any] | None = knob(None)
    random_init: dict[str, Any] | None = knob(None)


@dataclass(kw_only=True)
class MixSpec:
    """``data.mix.<name>``: one more file mixed into the pool."""

    path: str = knob()
    reader: str = knob(choices=readers)
    max_rows: int | None = knob(None, ge=1)
    source: str | None = knob(None, plain=True)


@dataclass(kw_only=True)
class Gsm8kReaderSpec:
    """``data.gsm8k``: options of the gsm8k reader, for ``data.path`` and every ``data.mix``."""

    keep_calculator: bool = knob(False)  # false strips <<48/2=24>> calculator annotations


@dataclass(kw_only=True)
class DataSpec:
    """``data``: the pool's file, reader and token budget per row."""

    name: str = knob(plain=True)
    path: str = knob()
    reader: str = knob(choices=readers)
    source: str = knob(plain=True)
    max_rows: int | None = knob(None, ge=1)
    mix: dict[str, MixSpec] = knob({})
    # Truncation keeps max_length // 4 response tokens; below 8 no row could be scored.
    max_length: int = knob(ge=8, unit=" tokens")
    on_bad_row: Literal["error", "skip"] = knob()
    gsm8k: Gsm8kReaderSpec | None = knob(None)  # absent or null: the reader's defaults
    decontaminate: bool = knob(False)  # drop pool rows overlapping an eval set (contamination.py)
    allow_special_tokens: bool = knob(False)  # true: <|im_end|> in row text is a control token


@dataclass(kw_only=True)
class ScorerSpec:
    """``scorer``: which score ranks the pool."""

    name: str = knob(choices=scorers)


@dataclass(kw_only=True)
class SelectionSpec:
    """``selection``: how many rows, in which order, per source (cross-field rules: config.py)."""

    ratio: float | None = knob(gt=0, le=1)
    count: int | None = knob(ge=1)
    order: Literal["bottom", "top"] = knob("top")
    band: list[float] | None = knob(None)  # [lo, hi] score quantiles; replaces ratio/count
    budget: Literal["rows", "tokens"] = knob("rows")
    tokens: int | None = knob(None, ge=1, unit=" response tokens")
    match_tokens: str | None = knob(None)  # a run dir or selection artifact to match in tokens
    by_source: bool = knob(False)
    keep_sources: list[str] = knob([])
    listed: str | None = knob(None)  # a data file: keep exactly the pool rows it holds
    listed_reader: str = knob("alpaca", choices=readers)
    # length controls (docs/selection.md): rank by the score residualised on log length, the
    # size spread over length quantiles, or random rows length-matched to a named selection
    rule: Literal["length_matched_random", "ranked"] = knob("ranked")
    rank: Literal["residual_length", "score"] = knob("score")
    stratify: Literal["length"] | None = knob(None)
    length_bins: int = knob(10, ge=1)  # quantile bins of stratify and length_matched_random
    match_lengths: str | None = knob(None)  # a run dir or selection artifact (length_matched)


@dataclass(kw_only=True)
class ScoreSpec:
    """``score``: the scoring engine's batching, sharding and non-finite policy."""

    max_tokens_per_batch: int = knob(ge=1)
    shard_rows: int | Literal["auto"] = knob(ge=1)  # auto: lobass.devices.resolve_shard_rows
    share_prefix: bool = knob()
    extra_scorers: list[str] = knob([], choices=scorers)
    on_nonfinite: Literal["drop", "error"] = knob()
    exclude_eos: bool = knob(False)  # leave the end-of-response token out of each mean loss


@dataclass(kw_only=True)
class LoraSpec:
    """``train.lora`` / ``reference.lora``: the adapter's shape."""

    r: int = knob(ge=1)
    alpha: float = knob(gt=0)
    dropout: float = knob(ge=0, lt=1)


@dataclass(kw_only=True)
class TrainSpec:
    """``train``: the LoRA fine-tuning recipe (the reference uses the same fields)."""

    enabled: bool = knob(True)  # false (train=none): evaluate the initial model itself
    epochs: float = knob(ge=0)  # 0 only with max_steps > 0 (checked across fields)
    max_steps: int = knob()  # > 0 overrides epochs; -1 = off
    batch_size: int = knob(ge=1)
    micro_batch_size: int | None = knob(None, ge=1)  # most rows per forward pass (memory)
    grad_accum: int = knob(ge=1)
    learning_rate: float = knob(gt=0)
    lr_scheduler: str = knob(choices=schedulers)
    warmup_ratio: float = knob(ge=0, le=1)
    weight_decay: float = knob(ge=0)
    max_grad_norm: float = knob(ge=0)
    gradient_checkpointing: bool = knob()
    compile: bool = knob(False)  # torch.compile the decoder layers (lobass.compilation)
    share_prefix: bool = knob(False)  # encode the rows' shared prefix once per step
    logging_steps: int = knob(ge=1)
    save_steps: int = knob(ge=1)
    lora: LoraSpec = knob()
    global_batch_size: int | None = knob(None, ge=1)
    fsdp: bool = knob(False)
    fsdp_config: dict[str, Any] = knob({})
    deepspeed: str | dict[str, Any] | None = knob(None)


@dataclass(kw_only=True)
class ReferenceSpec(TrainSpec):
    """``reference``: the train recipe plus the pool share, its own seed and how it is fitted."""

    fraction: float = knob(1.0, gt=0, le=1)  # with cross_fit: the share of each fold's rows
    seed: int = knob(0)
    fit: Literal["cross_fit", "in_sample"] = knob("in_sample")  # cross_fit: L_ref held out
    folds: int = knob(2, ge=2)  # cross_fit only: adapters, each on (folds-1)/folds of the pool


@dataclass(kw_only=True)
class LoggerSpec:
    """``logger`` fields every logger has."""

    _target_: str = knob()
    kind: Literal["none", "wandb"] = knob()


@dataclass(kw_only=True)
class WandbSpec(LoggerSpec):
    """``logger=wandb``."""

    project: str = knob()
    mode: Literal["disabled", "offline", "online"] = knob("offline")
    name: str | None = knob(None)
    group: str | None = knob(None)
    tags: list[str] = knob([])


LOGGER_SPECS: dict[str, type] = {"none": LoggerSpec, "wandb": WandbSpec}


@dataclass(kw_only=True)
class ReportSpec:
    """``report``: how ``python -m lobass.report`` judges comparisons (read from config.yaml)."""

    equivalence_margin: float = knob(0.02, gt=0)  # metric units: nats/token for losses


@dataclass(kw_only=True)
class RootSpec:
    """The whole composed config: run-level keys and every group."""

    seed: int = knob()
    stages: list[str] = knob()  # names checked in lobass.config.validate (its own message)
    artifacts_dir: str = knob()
    models_dir: str = knob()
    output_dir: str | None = knob(None)
    tags: list[str] = knob([])
    memory_check: Literal["error", "off", "warn"] = knob("error")
    model: ModelSpec = knob()
    data: DataSpec = knob()
    scorer: ScorerSpec = knob()
    selection: SelectionSpec = knob()
    score: ScoreSpec = knob()
    reference: ReferenceSpec = knob()
    train: TrainSpec = knob()
    eval: EvalSpec = knob()
    logger: dict[str, Any] = knob()  # checked against LOGGER_SPECS[kind]
    report: ReportSpec = knob()
