"""The rules across fields, each written once, and the defaults a config lacks.

:func:`check_structure` runs on the config as composed (each group against its dataclass);
:func:`defaults_patch` says what to fill; :func:`check_rules` runs on the filled config, so it
indexes every field and never supplies a default of its own. ``lobass.config.validate`` calls
all three; the stage code trusts what they checked.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from lobass.schema.eval_specs import JUDGE_PROMPTS, clashing_set_names, judge_prompt_path
from lobass.schema.secrets import check_key_env
from lobass.schema.specs import JUDGE_SPECS, LOGGER_SPECS, RootSpec
from lobass.schema.walk import ConfigError, check_group, missing_defaults

STAGES = ("reference", "score", "select", "train", "eval")


def check_structure(values: dict[str, Any]) -> None:
    """Every group against its dataclass, as composed (before any default is filled).

    Raises:
        ConfigError: an unknown stage or key, a missing required key, a bad value.

    """
    stages = values.get("stages")  # checked here, before RootSpec, for its own message
    unknown = [s for s in stages or [] if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in stages=; choose from {list(STAGES)}")
    targets = (values.get("model") or {}).get("lora_targets")
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


def defaults_patch(values: dict[str, Any]) -> dict[str, Any]:
    """What a checked config lacks, with its schema defaults (the judge's and logger's too)."""
    patch = missing_defaults(values, RootSpec)
    variants = (("eval", "judge", "name", JUDGE_SPECS), (None, "logger", "kind", LOGGER_SPECS))
    for parent, group, tag, specs in variants:
        node = values[parent][group] if parent else values[group]
        spec = specs.get(str(node.get(tag))) if isinstance(node, dict) else None
        fill = missing_defaults(node, spec) if spec else {}
        if fill:
            target = patch.setdefault(parent, {}) if parent else patch
            target.setdefault(group, {}).update(fill)
    return patch


def check_rules(values: dict[str, Any]) -> None:
    """The rules across fields, on the filled config.

    Raises:
        ConfigError: naming the keys involved and the fix.

    """
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
    missing = [k for k in needs[model["source"]] if not model[k]]
    if missing:
        raise ConfigError(f"model.source={model['source']} needs "
                          + " and ".join(f"model.{k}" for k in missing) + "; set it")


def _check_keep_sources(selection: dict[str, Any], data: dict[str, Any]) -> None:
    """Each ``selection.keep_sources`` entry names a pool source (``data.source``, a mix name).

    A misspelt one would otherwise keep nothing, and the run would rank every row.
    """
    sources = [data["source"], *data["mix"]]
    for name in selection["keep_sources"]:
        if name not in sources:
            close = difflib.get_close_matches(str(name), sources, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"selection.keep_sources names {name!r}, which is no source of the "
                              f"pool; {hint}the sources are {sources} (data.source and the "
                              "data.mix names)")


def _check_selection(selection: dict[str, Any]) -> None:
    """One size: ``listed``, ``band``, ``budget=tokens`` (``tokens`` or ``match_tokens``), rows."""
    _check_length_controls(selection)
    listed = selection["listed"]
    if listed is not None:  # a peer's selection: exactly the pool rows the file holds
        if not Path(listed).is_file():
            raise ConfigError(f"selection.listed={listed}: no such file (a data file of the rows "
                              "to keep, read with selection.listed_reader)")
        return
    band = selection["band"]
    if band is not None:  # quantiles of the score: replaces ratio and count
        if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
            raise ConfigError(f"selection.band must be [lo, hi] score quantiles with 0 <= lo < hi "
                              f"<= 1, got {band}")
        return
    if selection["budget"] == "tokens":
        tokens, match = selection["tokens"], selection["match_tokens"]
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
    other = [k for k in ("band", "listed", "match_tokens") if selection[k] is not None]
    other += ["budget=tokens"] if selection["budget"] == "tokens" else []
    if selection["rule"] == "length_matched_random":
        match = selection["match_lengths"]
        if match is None or not Path(match).exists():
            raise ConfigError(f"selection.rule=length_matched_random needs selection."
                              f"match_lengths=<run dir or selection artifact> (got {match})")
        other += [k for k in ("by_source", "keep_sources", "stratify") if selection[k]]
        if other:
            raise ConfigError(f"selection.rule=length_matched_random draws as many rows as the "
                              f"named selection has; unset selection.{', selection.'.join(other)}")
    elif selection["stratify"] is not None and other:
        raise ConfigError(f"selection.stratify splits a ratio or count over length quantiles; "
                          f"unset selection.{', selection.'.join(other)}")


def _check_recipe(group: str, recipe: dict[str, Any]) -> None:
    if recipe["max_steps"] <= 0 and recipe["epochs"] <= 0:
        raise ConfigError(f"{group}.epochs={recipe['epochs']} with {group}.max_steps="
                          f"{recipe['max_steps']} trains nothing; set {group}.epochs > 0 or "
                          f"{group}.max_steps > 0")
    if recipe["fsdp"] and recipe["deepspeed"]:
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
    for name, ref in ev["reference_loss"].items():
        if ref["enabled"]:
            files += [(f"eval.reference_loss.{name}.{part}", ref[part])
                      for part in ("questions", "answers") if ref[part] is not None]
    generation = ev["generation"]
    sets = [n for n, s in generation["sets"].items() if s["enabled"]] if generation["enabled"] \
        else []
    for name in sets:
        files.append((f"eval.generation.sets.{name}.path", generation["sets"][name]["path"]))
    clash = clashing_set_names(sets, ev["reference_loss"])
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


