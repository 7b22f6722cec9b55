"""Config checks that run before anything is read or loaded, and the ``pkg_data`` resolver.

:func:`validate` checks every value of the composed config against :mod:`lobass.schema` (one
dataclass per group), then what spans fields (exactly one of ``selection.ratio`` and ``count``,
an epoch or step budget, the judge's baseline and prompt files, the eval input files), then that
no value looks like a secret: keys come from environment variables only. :class:`RefuseSecrets`
is the same secret check as a Hydra callback, so that a key given on the command line stops the
run before Hydra saves its config under ``.hydra/``.
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lobass.data import Example, read_examples
from lobass.schema import (
    JUDGE_SPECS,
    LOGGER_SPECS,
    ConfigError,
    RootSpec,
    check_group,
    check_key_env,
    refuse_secrets,
)
from lobass.schema.eval_specs import JUDGE_PROMPTS, clashing_set_names, judge_prompt_path

__all__ = ["ConfigError", "RefuseSecrets", "check_lora_targets", "check_secrets", "package_data",
           "validate", "validate_pool"]

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources"
STAGES = ("reference", "score", "select", "train", "eval")


def package_data(relative: str) -> str:
    """Absolute path of a data file shipped in ``lobass/resources/data``."""
    return str(RESOURCES / "data" / relative)


# `${pkg_data:alpaca/alpaca_pool_1k.json}` in configs: shipped files work from any working dir.
OmegaConf.register_new_resolver("pkg_data", package_data, replace=True)


class RefuseSecrets(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``) running :func:`refuse_secrets`.

    Hydra writes ``.hydra/config.yaml`` and ``overrides.yaml`` before the task function runs,
    so the check has to happen here, at the start of the run or multirun, to keep a key given on
    the command line off the disk.
    """

    def _check(self, config: DictConfig) -> None:
        values = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items()  # type: ignore[union-attr]
                  if k != "hydra"}
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
        try:
            refuse_secrets(values, tuple(str(o) for o in overrides))
        except ConfigError as err:
            # Hydra turns a callback's exception into a warning and carries on; only an exit
            # stops it before it writes .hydra/. The message never holds the value.
            sys.exit(f"error: {err}")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        self._check(config)


# ---------------------------------------------------------------------------------------------
# validate


def check_secrets(cfg: DictConfig) -> None:
    """Refuse a config holding a key-like value (see :func:`lobass.schema.find_secret`).

    Cheap and file-free: call it before writing the config anywhere. :func:`validate` runs it
    too.

    Raises:
        ConfigError: naming the key, never the value.

    """
    try:  # resolved: ${oc.env:...} would put an environment variable's value into config.yaml
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # validate() names the interpolation that fails; scan what is written
        values = OmegaConf.to_container(cfg, resolve=False)
    refuse_secrets(values)


def validate(cfg: DictConfig) -> None:
    """Check every config value before any file is read, model loaded or artifact written.

    Runs first in ``run(cfg)``. Secrets first (later messages echo values), then each group
    against :mod:`lobass.schema`, then what spans fields. Checks that need the pool size or the
    model's architecture are :func:`validate_pool` and :func:`check_lora_targets`.

    Raises:
        ConfigError: naming the key, with the allowed values or range.

    """
    try:
        values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except Exception as err:  # an interpolation that cannot resolve: name it
        raise ConfigError(f"the config does not resolve: {err}") from err
    refuse_secrets(values)
    unknown = [s for s in values.get("stages") or [] if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in stages=; choose from {list(STAGES)}")
    targets = values.get("model", {}).get("lora_targets")
    if not targets or not isinstance(targets, list) or not all(
            isinstance(t, str) and t for t in targets):
        raise ConfigError(f"model.lora_targets must be a non-empty list of module names such as "
                          f"[q_proj, v_proj], got {targets!r}")
    check_group("", values, RootSpec)
    judge, logger = values["eval"]["judge"], values["logger"]
    _check_variant("eval.judge", judge, "name", JUDGE_SPECS)
    if "api_key_env" in judge:  # a remote judge: the variable's value is sent as a bearer token
        check_key_env("eval.judge", judge)
    _check_variant("logger", logger, "kind", LOGGER_SPECS)
    _check_model(values["model"])
    _check_keep_sources(values["selection"], values["data"])
    _check_selection(values["selection"])
    for group in ("reference", "train"):
        _check_recipe(group, values[group])
    if "eval" in values["stages"]:
        _check_eval_files(values["eval"])


def _check_variant(key: str, values: dict[str, Any], tag: str, specs: dict[str, type]) -> None:
    """Check a group whose fields depend on one of its values (the judge's name, logger kind)."""
    if values.get(tag) not in specs:
        raise ConfigError(f"{key}.{tag}={values.get(tag)!r} is not supported; choose one of "
                          f"{sorted(specs)}")
    check_group(key, values, specs[values[tag]])
    from hydra.utils import get_class

    try:
        get_class(values["_target_"])
    except Exception as err:
        raise ConfigError(f"{key}._target_={values['_target_']!r} cannot be imported: {err}"
                          ) from err


def _check_model(model: dict[str, Any]) -> None:
    needs = {"hub": ["hub_id"], "gguf": ["gguf_package", "gguf_file"], "random": ["random_init"]}
    missing = [k for k in needs[model["source"]] if not model.get(k)]
    if missing:
        raise ConfigError(f"model.source={model['source']} needs "
                          + " and ".join(f"model.{k}" for k in missing) + "; set it")


def _check_keep_sources(selection: dict[str, Any], data: dict[str, Any]) -> None:
    """Each ``selection.keep_sources`` entry names a pool source (``data.source``, a mix name).

    A misspelt one would otherwise keep nothing, and the run would rank every row.
    """
    sources = [data["source"], *(data.get("mix") or {})]
    for name in selection.get("keep_sources") or []:
        if name not in sources:
            close = difflib.get_close_matches(str(name), sources, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"selection.keep_sources names {name!r}, which is no source of the "
                              f"pool; {hint}the sources are {sources} (data.source and the "
                              "data.mix names)")


def _check_selection(selection: dict[str, Any]) -> None:
    """One size: ``listed``, ``band``, ``budget=tokens`` (``tokens`` or ``match_tokens``), rows."""
    _check_length_controls(selection)
    listed = selection.get("listed")
    if listed is not None:  # a peer's selection: exactly the pool rows the file holds
        if not Path(listed).is_file():
            raise ConfigError(f"selection.listed={listed}: no such file (a data file of the rows "
                              "to keep, read with selection.listed_reader)")
        return
    band = selection.get("band")
    if band is not None:  # quantiles of the score: replaces ratio and count
        if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
            raise ConfigError(f"selection.band must be [lo, hi] score quantiles with 0 <= lo < hi "
                              f"<= 1, got {band}")
        return
    if selection.get("budget", "rows") == "tokens":
        tokens, match = selection.get("tokens"), selection.get("match_tokens")
        if (tokens is None) == (match is None):
            raise ConfigError("selection.budget=tokens needs exactly one of selection.tokens and "
                              f"selection.match_tokens (got tokens={tokens}, match_tokens={match})")
        if match is not None and not Path(match).exists():
            raise ConfigError(f"selection.match_tokens={match}: no such run or selection "
                              "directory")
        return
    ratio, count = selection["ratio"], selection["count"]
    if ratio is not None and count is not None:  # `selection.count=N` over the default group
        raise ConfigError(f"selection.count={count} is set beside selection.ratio={ratio} (the "
                          f"ratio group's default): use selection=count selection.count={count}")
    if ratio is None and count is None:
        raise ConfigError("set exactly one of selection.ratio and selection.count (got "
                          f"ratio={ratio}, count={count})")


def _check_length_controls(selection: dict[str, Any]) -> None:
    """``rule=length_matched_random`` names a selection; it and ``stratify`` take rows only.

    The draw takes the named selection's row count, and stratify splits a ratio or count, so
    neither combines with a band, a listed file or a token budget.
    """
    other = [k for k in ("band", "listed", "match_tokens") if selection.get(k) is not None]
    other += ["budget=tokens"] if selection.get("budget", "rows") == "tokens" else []
    if selection.get("rule", "ranked") == "length_matched_random":
        match = selection.get("match_lengths")
        if match is None or not Path(match).exists():
            raise ConfigError(f"selection.rule=length_matched_random needs selection."
                              f"match_lengths=<run dir or selection artifact> (got {match})")
        other += [k for k in ("by_source", "keep_sources", "stratify") if selection.get(k)]
        if other:
            raise ConfigError(f"selection.rule=length_matched_random draws as many rows as the "
                              f"named selection has; unset selection.{', selection.'.join(other)}")
    elif selection.get("stratify") is not None and other:
        raise ConfigError(f"selection.stratify splits a ratio or count over length quantiles; "
                          f"unset selection.{', selection.'.join(other)}")


def _check_recipe(group: str, recipe: dict[str, Any]) -> None:
    if recipe["max_steps"] <= 0 and recipe["epochs"] <= 0:
        raise ConfigError(f"{group}.epochs={recipe['epochs']} with {group}.max_steps="
                          f"{recipe['max_steps']} trains nothing; set {group}.epochs > 0 or "
                          f"{group}.max_steps > 0")
    if recipe.get("fsdp") and recipe.get("deepspeed"):
        raise ConfigError(f"set at most one of {group}.fsdp and {group}.deepspeed")


def _check_eval_files(ev: dict[str, Any]) -> None:
    """The files the eval stage reads exist (it runs last, after hours of training on a GPU)."""
    files = []
    if ev["gsm8k"]["enabled"]:
        files += [("eval.gsm8k.test_path", ev["gsm8k"]["test_path"]),
                  ("eval.gsm8k.fewshot_path", ev["gsm8k"]["fewshot_path"])]
    if ev["ifeval"]["enabled"]:
        files.append(("eval.ifeval.path", ev["ifeval"]["path"]))
    if ev["heldout"]["enabled"]:
        files.append(("eval.heldout.path", ev["heldout"]["path"]))
    for name, ref in (ev.get("reference_loss") or {}).items():
        if ref["enabled"]:
            files += [(f"eval.reference_loss.{name}.{part}", ref[part])
                      for part in ("questions", "answers") if ref.get(part) is not None]
    generation = ev["generation"]
    sets = [n for n, s in generation["sets"].items() if s["enabled"]] if generation["enabled"] \
        else []
    for name in sets:
        files.append((f"eval.generation.sets.{name}.path", generation["sets"][name]["path"]))
    clash = clashing_set_names(sets, ev.get("reference_loss") or {})
    if clash:
        raise ConfigError(f"eval.generation.sets {clash} share a name with another eval metric "
                          "group; rename them")
    judge = ev["judge"]
    if judge["baseline"] is not None and sets:
        files.append(("eval.judge.prompt", str(judge_prompt_path(judge["prompt"]))))
        if judge["baseline"] != "full_data" and not Path(judge["baseline"]).exists():
            raise ConfigError(f"eval.judge.baseline={judge['baseline']}: no such file or "
                              "directory; give full_data, a run dir, an eval artifact dir or a "
                              "generations JSONL (null: no judging)")
    for key, path in files:
        if not Path(path).is_file():
            hint = (f"; shipped prompts: {sorted(p.name for p in JUDGE_PROMPTS.glob('*.txt'))}"
                    if key == "eval.judge.prompt" else "")
            raise ConfigError(f"{key}={path}: no such file{hint}")


def validate_pool(cfg: DictConfig, examples: Sequence[Example]) -> dict[str, float]:
    """Check the selection against the pool once it is read, before any model loads.

    Mirrors how the select stage groups rows (``lobass.selection.choose_rows``): the rows of
    ``selection.keep_sources`` are added in full and never ranked; the rest are ranked as one
    group, or per source with ``selection.by_source``. So a ``selection.count`` larger than a
    group, a kept source without rows, or a ``selection.listed`` file matching no pool row fails
    here, in seconds, instead of after the reference and scoring.

    Args:
        cfg: the composed config.
        examples: the pool as read (after de-duplication and any decontamination).

    Returns:
        ``selection/kept_rows/<source>`` (rows added in full) and, with ``selection.listed``,
        ``selection/listed/{rows,matched,unmatched,skipped}``: rows the file holds, how many of
        them are pool rows, how many match none (logged, never silently dropped), and bad rows
        its reader skipped.

    Raises:
        ConfigError: naming the key, the source and its size.

    """
    selection = cfg.selection
    per_source = Counter(e.source for e in examples)
    kept = list(selection.get("keep_sources") or [])
    metrics: dict[str, float] = {}
    for name in kept:
        if not per_source[name]:
            raise ConfigError(f"selection.keep_sources names {name!r}, but the pool holds no "
                              f"{name} row (sources read: {dict(per_source)})")
        metrics[f"selection/kept_rows/{name}"] = float(per_source[name])
    if kept:
        log.info("selection.keep_sources=%s: %s rows added in full, never ranked", kept,
                 {name: per_source[name] for name in kept})
    ranked = {s: n for s, n in per_source.items() if s not in kept}
    if selection.get("listed"):
        metrics.update(_check_listed(selection, {e.id for e in examples}))
    elif (selection.get("band") is None and selection.get("budget", "rows") == "rows"
          and selection.count is not None):
        groups = ranked if selection.get("by_source") else {"": sum(ranked.values())}
        for source, n in groups.items():
            if selection.count > n:
                rows = (f"source {source} ({n} rows" if source else
                        f"the pool ({n} rows ranked")
                where = f" of {len(examples)} read from data={cfg.data.name}"
                rule = " with selection.by_source=true" if source else ""
                minus = f", keep_sources {kept} not ranked" if kept else ""
                raise ConfigError(f"selection.count={selection.count}{rule} is larger than "
                                  f"{rows}{where}{minus}); choose a count in [1, {n}] or set "
                                  "selection.ratio instead")
    return metrics


def _check_listed(selection: DictConfig, pool_ids: set[str]) -> dict[str, float]:
    """``selection.listed`` read as the select stage reads it, matched to the pool by content."""
    rows, stats = read_examples(selection.listed, selection.get("listed_reader", "alpaca"),
                                on_bad_row="skip")
    listed = {e.id for e in rows}
    matched = len(listed & pool_ids)
    skipped = sum(stats.skipped.values())
    counts = {"rows": len(listed), "matched": matched, "unmatched": len(listed) - matched,
              "skipped": skipped}
    if not matched:
        raise ConfigError(f"selection.listed={selection.listed}: none of its {len(listed)} rows "
                          f"({skipped} more skipped as bad) is a pool row; rows match by content, "
                          "so check the file, selection.listed_reader and data")
    level = logging.WARNING if counts["unmatched"] or skipped else logging.INFO
    log.log(level, "selection.listed=%s: %d rows, %d in the pool, %d match no pool row "
            "(not selected), %d bad rows skipped", selection.listed, len(listed), matched,
            counts["unmatched"], skipped)
    return {f"selection/listed/{k}": float(v) for k, v in counts.items()}


def check_lora_targets(model_cfg: DictConfig, model_path: str) -> list[str]:
    """Check that every ``model.lora_targets`` name matches a module LoRA can adapt.

    The model is built on the ``meta`` device from its config alone (no weights are read or
    allocated, well under a second even for 13B), and each target is matched the way peft
    matches a list of names: the module's full name equals it or ends with ``.<target>``. Peft
    itself silently ignores a target that matches nothing as long as another one matches.

    Args:
        model_cfg: the ``model`` config group.
        model_path: what ``resolve_model_path`` returned (a local directory or hub id).

    Returns:
        The names of the modules that would be adapted.

    Raises:
        ConfigError: a target that matches no adaptable module, with the names that would.

    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path, revision=model_cfg.get("revision"),
                                        trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    names = [n for n, m in model.named_modules() if isinstance(m, adaptable)]
    targets = list(model_cfg.lora_targets)
    matched = [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in matched)]
    if missing:
        choices = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"model.lora_targets {missing} match no linear, embedding or conv module "
                          f"of {type(model).__name__} (model={model_cfg.name}); choose from "
                          f"{choices}")
    return matched
