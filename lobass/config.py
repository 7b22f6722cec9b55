"""Config checks that run before anything is read or loaded, and the ``pkg_data`` resolver.

:func:`validate` checks every value of the composed config against :mod:`lobass.schema` (one
dataclass per group), then what spans fields (exactly one of ``selection.ratio`` and ``count``,
an epoch or step budget, the judge's baseline and prompt files, the eval input files), then that
no value looks like a secret: keys come from environment variables only. :class:`RefuseSecrets`
is the same secret check as a Hydra callback, so that a key given on the command line stops the
run before Hydra saves its config under ``.hydra/``.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from lobass.data import Example, read_examples
from lobass.devices import resolve_auto
from lobass.schema import ConfigError, refuse_secrets
from lobass.schema.rules import check_rules, check_structure, defaults_patch

__all__ = ["ConfigError", "RefuseSecrets", "check_lora_targets", "check_secrets", "package_data",
           "validate", "validate_pool", "with_defaults"]

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources"


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


def validate(cfg: DictConfig) -> DictConfig:
    """Check every config value before any file is read, model loaded or artifact written.

    Runs first in ``run(cfg)``. Secrets first (later messages echo values), then each group
    against :mod:`lobass.schema`; then every absent field gets its schema default (in ``cfg``
    itself, so stage code reads ``cfg.a.b``, never ``.get(key, default)``); then the rules
    across fields (:mod:`lobass.schema.rules`). Checks that need the pool size or the model's
    architecture are :func:`validate_pool` and :func:`check_lora_targets`.

    Returns:
        ``cfg``, every default filled and every ``auto`` resolved for this machine.

    Raises:
        ConfigError: naming the key, with the allowed values or range.

    """
    values = _resolved(cfg)
    refuse_secrets(values)
    check_structure(values)
    patch = defaults_patch(values)
    _fill(cfg, patch)
    resolve_auto(cfg)  # model.dtype, score.shard_rows: auto chosen for this machine, before keys
    # the rules read the filled values: the patch merged into the resolved ones, not resolved again
    filled = OmegaConf.to_container(OmegaConf.merge(values, patch))
    assert isinstance(filled, dict)
    check_rules({str(k): v for k, v in filled.items()})
    return cfg


def with_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every absent field set to its schema default (in place), and returned.

    :func:`validate` calls it; code that composes a config and skips validation (tests, a
    notebook calling a stage) calls it to get the same config a run sees, ``auto`` values
    resolved (:func:`lobass.devices.resolve_auto`).
    """
    _fill(cfg, defaults_patch(_resolved(cfg)))
    resolve_auto(cfg)
    return cfg


def _fill(cfg: DictConfig, patch: dict[str, Any]) -> None:
    if patch:
        with open_dict(cfg):
            cfg.merge_with(patch)


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that cannot resolve: name it
        raise ConfigError(f"the config does not resolve: {err}") from err
    assert isinstance(values, dict)
    return {str(k): v for k, v in values.items()}


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
    kept = list(selection.keep_sources)
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
    if selection.listed:
        metrics.update(_check_listed(selection, {e.id for e in examples}))
    elif (selection.band is None and selection.budget == "rows"
          and selection.count is not None):
        groups = ranked if selection.by_source else {"": sum(ranked.values())}
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
    rows, stats = read_examples(selection.listed, selection.listed_reader,
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

    config = AutoConfig.from_pretrained(model_path, revision=model_cfg.revision,
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
