"""Every input that can change a number is in the key (docs/reliability.md, Round 3).

The test walks the config schema (``lobass/schema``) and fails on a field that is neither in
``KEYED`` (with the key that holds it) nor in ``BOOKKEEPING`` (with why it changes no number of
any artifact). A new option therefore cannot land without a decision. Where a key is built from
the config by a function (the fine-tune recipe, the eval recipe, the model key), the test also
changes every field it claims keyed and checks that the key moves.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from conftest import TINY
from lobass.evaluation.stage import eval_recipe
from lobass.finetune import BOOKKEEPING as FINETUNE_BOOKKEEPING
from lobass.finetune import weights_recipe
from lobass.modeling import model_key, resolve_model_path
from lobass.schema import JUDGE_SPECS, LOGGER_SPECS, RootSpec

RECIPE = ("epochs", "max_steps", "batch_size", "micro_batch_size", "grad_accum", "learning_rate",
          "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
          "gradient_checkpointing", "compile", "share_prefix", "lora.r", "lora.alpha",
          "lora.dropout", "global_batch_size", "fsdp", "fsdp_config", "deepspeed", "enabled")
EVAL = ("backend", *(f"{b}.{f}" for b in ("gsm8k", "ifeval")
                     for f in ("enabled", "limit", "max_gen_toks", "batch_size", "max_length")),
        "gsm8k.test_path", "gsm8k.fewshot_path", "gsm8k.num_fewshot", "ifeval.path",
        "heldout.enabled", "heldout.path", "heldout.reader", "heldout.max_rows",
        "generation.enabled", "generation.max_new_tokens", "generation.batch_size",
        *(f"generation.sets.<name>.{f}" for f in ("enabled", "path", "reader", "max_rows",
                                                   "max_new_tokens", "judge")),
        *(f"reference_loss.<name>.{f}" for f in ("enabled", "questions", "answers", "reader",
                                                  "max_rows", "trimmed")))
JUDGE = ("_target_", "name", "prompt", "bootstrap_iters", "model", "tie_margin", "max_length",
         "base_url", "api_key_env", "max_tokens", "temperature", "timeout_s", "retries",
         "max_workers")

# field -> the key that holds it. "recipe": finetune.weights_recipe (finetune/<key>);
# "eval": evaluation.stage.eval_recipe (eval/<key>; files by content); "model": model_key
# (every stage's key, through the pool's tokens key).
KEYED: dict[str, str] = {
    "seed": "finetune key (LoRA init, order), eval key (lm-eval, bootstrap), random scorer",
    **{f"model.{f}": "model" for f in ("name", "dtype", "attn_implementation",
                                      "trust_remote_code", "hub_id", "revision", "gguf_package",
                                      "gguf_file", "random_init")},
    "model.source": "model (model_key's identity; a local or unpinned source by its files)",
    "model.template": "Pool.tokens_key",
    "model.lora_targets": "finetune key (targets)",
    # the pool's rows are keyed by content (ids hash each row; rows_fingerprint holds the source
    # label and raw record): whatever data option changes a row changes every key downstream
    **{f"data.{f}": "pool rows" for f in ("path", "reader", "source", "max_rows", "on_bad_row",
                                         "gsm8k.keep_calculator", "decontaminate",
                                         "mix.<name>.path", "mix.<name>.reader",
                                         "mix.<name>.max_rows", "mix.<name>.source")},
    "data.max_length": "Pool.tokens_key",
    "data.allow_special_tokens": "Pool.tokens_key (text)",
    "scorer.name": "scores key (scorers) and the losses it needs",
    **{f"selection.{f}": "selection key (rule.describe())" for f in (
        "ratio", "count", "order", "band", "budget", "tokens", "match_tokens", "by_source",
        "keep_sources", "listed", "listed_reader", "rule", "rank", "stratify", "length_bins",
        "match_lengths")},
    "score.max_tokens_per_batch": "losses key (batching moves losses ~1e-7), eval key",
    "score.shard_rows": "losses key (rows are batched within a shard)",
    "score.share_prefix": "losses key",
    "score.extra_scorers": "scores key (scorers)",
    "score.exclude_eos": "losses key (LossInputs.keys)",
    **{f"{group}.{f}": "recipe" for group in ("train", "reference") for f in RECIPE},
    "reference.fraction": "finetune key: resolved into the rows it trains on",
    "reference.seed": "finetune key: resolved into the seed",
    **{f"reference.{f}": "finetune key: resolved into each fold's rows; losses and scores keys "
                         "(cross_fit: fit, folds and the fold adapters)" for f in ("fit", "folds")},
    **{f"eval.{f}": "eval" for f in EVAL},
    **{f"eval.judge.{f}": "eval" for f in JUDGE},
    "eval.judge.baseline": "eval key: judge_inputs holds its answers' content",
}

# field -> why it changes no number of any artifact.
BOOKKEEPING: dict[str, str] = {
    "stages": "which outputs are wanted; each stage's artifact is keyed on its own",
    "artifacts_dir": "where artifacts are kept",
    "models_dir": "where built checkpoints and the file-hash cache are kept",
    "output_dir": "where summary.json goes",
    "tags": "W&B labels",
    "memory_check": "a pre-flight estimate: it stops a run or not, computes nothing",
    "model.device": "where it runs, like the GPU model or the library versions (none keyed): "
                    "artifacts move between machines by design (GPU computes, CPU reports)",
    "model.arch": "read only by the memory estimate before a download",
    "data.name": "a label for the report; the rows it names are keyed by content",
    "score.on_nonfinite": "error stops the run where drop flags the row: no artifact differs",
    **{f"{group}.{f}": "logging and checkpoint cadence (finetune.BOOKKEEPING)"
       for group in ("train", "reference") for f in ("logging_steps", "save_steps")},
    "eval.judge.probe_timeout_s": "how long the pre-flight waits for a judge server",
    "eval.judge.allow_any_env": "which variable may hold the judge's key: a check, no number",
    **{f"logger.{f}": "tracking only" for spec in LOGGER_SPECS.values()
       for f in (x.name for x in dataclasses.fields(spec))},
    "report.equivalence_margin": "read by python -m lobass.report, never by a stage",
}


def _fields(spec: type, prefix: str) -> Iterator[str]:
    """Dotted paths of the schema's leaves; ``dict[str, Spec]`` entries become ``<name>``."""
    hints = typing.get_type_hints(spec)
    for field in dataclasses.fields(spec):
        path, kind = f"{prefix}{field.name}", hints[field.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{path}.")  # type: ignore[arg-type]
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(inner[-1]):
            yield from _fields(inner[-1], f"{path}.<name>.")
        elif len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            yield from _fields(inner[0], f"{path}.")  # type: ignore[arg-type]
        elif path == "eval.judge":  # one schema per judge
            yield from {f"eval.judge.{f.name}" for s in JUDGE_SPECS.values()
                        for f in dataclasses.fields(s)}
        elif path == "logger":
            yield from {f"logger.{f.name}" for s in LOGGER_SPECS.values()
                        for f in dataclasses.fields(s)}
        else:
            yield path


def test_every_schema_field_is_keyed_or_declared_bookkeeping():
    fields = set(_fields(RootSpec, ""))
    assert len(fields) > 150  # the walk reached every group
    both = set(KEYED) & set(BOOKKEEPING)
    assert not both, f"declared both keyed and bookkeeping: {sorted(both)}"
    undecided = fields - set(KEYED) - set(BOOKKEEPING)
    assert not undecided, (f"config fields neither keyed nor declared bookkeeping: "
                           f"{sorted(undecided)}; put each in the key that its artifact is built "
                           "from, or in BOOKKEEPING with why it changes no number")
    assert not (set(KEYED) | set(BOOKKEEPING)) - fields, "declared fields the schema lacks"


def test_fine_tune_bookkeeping_is_what_the_recipe_leaves_out():
    left_out = {f.split(".", 1)[1] for f in BOOKKEEPING if f.startswith(("train.", "reference."))}
    resolved = {"fraction", "seed", "fit", "folds"}  # reference rows and seed: keyed, resolved
    assert left_out | resolved == set(FINETUNE_BOOKKEEPING) - {"save_total_limit", "eval_steps"}


def _changed(value: Any, path: str) -> Any:
    """Another valid value of a field, to see its key move."""
    special = {"micro_batch_size": 4,  # a cap resolved to a divisor of batch_size (8): 3 -> 2
               "lr_scheduler": "linear", "backend": "vllm", "reader": "dolly",
               "name": "openai_compatible" if path.startswith("eval.judge") else "other",
               "dtype": "bfloat16", "attn_implementation": "eager", "template": "alpaca"}
    leaf = path.rsplit(".", 1)[-1]
    if leaf in special:
        return special[leaf]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if value is None:
        return 3
    if isinstance(value, list):
        return [*value, "x"]
    return {**value, "x": 1}


def _moves(cfg: Any, path: str, key: Any) -> bool:
    changed = cfg.copy()
    OmegaConf.update(changed, path, _changed(OmegaConf.select(cfg, path), path), force_add=True)
    return bool(key(changed) != key(cfg))


@pytest.mark.parametrize("group", ["train", "reference"])
def test_recipe_keyed_fields_move_the_fine_tune_key(make_cfg, group):
    cfg = make_cfg(*TINY)[group]
    for path in (f for f, how in KEYED.items() if how == "recipe" and f.startswith(group)):
        assert _moves(cfg, path.split(".", 1)[1], weights_recipe), path


@pytest.mark.parametrize("judge", ["local_hf", "openai_compatible"])
def test_eval_keyed_fields_move_the_eval_key(make_cfg, judge):
    cfg = make_cfg(*TINY, f"judge={judge}",
                   *(["eval.judge.base_url=http://127.0.0.1:1/v1", "eval.judge.model=j"]
                     if judge == "openai_compatible" else [])).eval
    names = {"generation.sets.<name>": "generation.sets.vicuna",
             "reference_loss.<name>": "reference_loss.vicuna_coding_math_ref"}
    checked = 0
    for field in (f for f, how in KEYED.items() if how == "eval"):
        path = field.split(".", 1)[1]
        for pattern, name in names.items():
            path = path.replace(pattern, name)
        if path.startswith("judge.") and path.split(".")[1] not in cfg.judge:
            continue  # the other judge's field
        if path == "judge.tie_margin" and judge != "local_hf":
            assert not _moves(cfg, path, lambda ev: eval_recipe(ev, None))  # no log-probs
            continue
        assert _moves(cfg, path, lambda ev: eval_recipe(ev, None)), field
        checked += 1
    assert checked > 35


def test_model_keyed_fields_move_the_model_key(make_cfg, models_dir: Path):
    cfg = make_cfg(*TINY).model
    path, _ = resolve_model_path(cfg, models_dir)
    for field in (f for f, how in KEYED.items() if how == "model"):
        assert _moves(cfg, field.split(".", 1)[1],
                      lambda model: model_key(model, path, models_dir)), field
