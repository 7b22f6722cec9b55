"""Before any work: the checks a run makes on its config, then the pool every stage reads.

:func:`preflight` checks what needs no row and no model (secrets, every value, the output
folders, the device, a remote judge), so a sweep point with a bad value fails in a second and
says why. :func:`open_context` is stage 0: it reads and audits the pool, checks it against the
selection, estimates memory, and tokenises, before any model weight is loaded.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lobass.artifacts import atomic_write_text, check_output_dirs
from lobass.config import check_secrets, validate, validate_pool
from lobass.contamination import audit
from lobass.context import Context
from lobass.devices import check_device
from lobass.evaluation.judge import preflight_judge
from lobass.memory import check_memory
from lobass.modeling import load_tokenizer, model_key, resolve_model_path
from lobass.pool import read_pool, tokenize_pool
from lobass.tracking import RunLogger


def preflight(cfg: DictConfig, run_dir: Path) -> None:
    """Check the config before any file is read or model loaded; a failure lands in error.txt."""
    try:
        check_secrets(cfg)  # a key typed into the config must reach no file, not even config.yaml
        # The resolved config beside summary.json: what the report reads a point's identity from.
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        validate(cfg)  # every value
        check_output_dirs(run_dir, Path(cfg.artifacts_dir), Path(cfg.models_dir))
        check_device(cfg.model)  # model.device=cuda without CUDA fails here, not as a CPU crawl
        preflight_judge(cfg.eval, list(cfg.stages))  # a remote judge's key and server, now
    except Exception:
        record_failure(run_dir)
        raise


def open_context(cfg: DictConfig, metrics: dict[str, float], tracker: RunLogger) -> Context:
    """Stage 0: the pool read, audited, checked and tokenised; what every later stage is given.

    Adds the pool's counts to ``metrics`` (rows read and skipped, contamination, tokens).
    """
    examples, read_metrics = read_pool(cfg.data)
    metrics.update(read_metrics)
    # overlap with every eval set counted (data/contamination/*), dropped if data.decontaminate
    drop = bool(cfg.data.decontaminate)
    examples, audit_metrics = audit(examples, cfg.eval, drop=drop)
    metrics.update(audit_metrics)
    # selection.count per ranked group, keep_sources and the listed file, against the pool
    metrics.update(validate_pool(cfg, examples))
    models_dir = Path(cfg.models_dir).resolve()
    model_path, _ = resolve_model_path(cfg.model, models_dir)
    check_memory(cfg, model_path)  # logs the per-device estimate; fails before any load
    tokenizer = load_tokenizer(cfg.model, model_path)
    pool, pool_metrics = tokenize_pool(cfg, examples, tokenizer,
                                       model_key(cfg.model, model_path, models_dir))
    metrics.update(pool_metrics)
    return Context(cfg, pool, model_path, tokenizer, Path(cfg.artifacts_dir).resolve(), tracker)


def record_failure(run_dir: Path) -> None:
    """Keep the traceback being handled in ``error.txt``, where the sweep report looks."""
    atomic_write_text(run_dir / "error.txt", traceback.format_exc())
