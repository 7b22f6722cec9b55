"""The eval stage's steps, driven by the ``eval`` config (the pipeline calls them in order).

Reference-free losses, lm-eval benchmarks (GSM8K, IFEval), generation per prompt set (each set its
own resumable artifact, so changing only the judge or the baseline reuses the answers), and the
pairwise judge against a baseline run. Stage modules never import each other: the pipeline passes
in what needs scoring or model loading as callables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lobass.artifacts import atomic_write_text, ensure_artifact, file_sha256, fingerprint
from lobass.data import Example, read_examples
from lobass.evaluation.generation import generate_responses, generation_metrics
from lobass.evaluation.gsm8k import evaluate_gsm8k
from lobass.evaluation.harness import build_task_manager
from lobass.evaluation.ifeval import evaluate_ifeval, ifeval_missing, ifeval_task_dir
from lobass.evaluation.judge import Judge, find_baseline_generations, judge_pairwise
from lobass.evaluation.prompts import read_prompts, read_reference_set
from lobass.jsonrows import jsonl_text, read_jsonl
from lobass.schema import check_key_env, plain_http_host
from lobass.schema.eval_specs import JUDGE_PROMPTS, judge_prompt_path

log = logging.getLogger(__name__)

# eval.judge keys the pairwise protocol reads (judge_inputs, judge_sets); the rest of the group
# are the arguments of its _target_ class.
PROTOCOL_KEYS = ("baseline", "prompt", "bootstrap_iters", "tie_margin")
CHECK_KEYS = ("allow_any_env",)  # read by the config check and preflight_judge, not the class


def reference_sets(eval_cfg: DictConfig) -> dict[str, list[Example]]:
    """Held-out examples whose responses the evaluated model is scored on, by metric name."""
    sets: dict[str, list[Example]] = {}
    held = eval_cfg.heldout
    if held.enabled:
        sets["heldout"], _ = read_examples(held.path, held.reader, source="heldout",
                                           max_rows=held.max_rows)
    for name, ref in (eval_cfg.get("reference_loss") or {}).items():
        if ref.enabled:
            sets[str(name)] = read_reference_set(str(name), ref)
    return sets


def trimmed_sets(eval_cfg: DictConfig) -> set[str]:
    """Reference-loss sets that also report ``loss_trimmed`` (``reference_loss.<set>.trimmed``)."""
    return {str(name) for name, ref in (eval_cfg.get("reference_loss") or {}).items()
            if ref.enabled and ref.get("trimmed", False)}


def run_benchmarks(model: Any, tokenizer: Any, eval_cfg: DictConfig, *, chat: bool, seed: int,
                   model_path: str, adapter_dir: Path | None, max_lora_rank: int,
                   revision: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """GSM8K and IFEval through lm-eval with one task manager.

    Returns:
        The metrics, and what was skipped with the reason (IFEval without its NLTK data).

    """
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    run_ifeval = bool(eval_cfg.ifeval.enabled)
    if run_ifeval and (missing := ifeval_missing()):
        skipped["ifeval"] = ("lm-eval's IFEval checkers cannot run offline here; missing: "
                             + "; ".join(missing))
        log.warning("eval.ifeval skipped: %s", skipped["ifeval"])
        metrics["eval/ifeval/skipped"] = 1.0  # the flag in summary.json; the reason: skipped.json
        run_ifeval = False
    if not (eval_cfg.gsm8k.enabled or run_ifeval):
        return metrics, skipped
    manager = build_task_manager([ifeval_task_dir()] if run_ifeval else [])
    common = {"chat": chat, "seed": seed, "task_manager": manager, "backend": eval_cfg.backend,
              "model_path": model_path, "adapter_dir": adapter_dir,
              "max_lora_rank": max_lora_rank, "revision": revision}
    if eval_cfg.gsm8k.enabled:
        metrics.update(evaluate_gsm8k(model, tokenizer, eval_cfg.gsm8k, **common))
    if run_ifeval:
        metrics.update(evaluate_ifeval(model, tokenizer, eval_cfg.ifeval, **common))
    return metrics, skipped


def enabled_prompt_sets(eval_cfg: DictConfig) -> dict[str, DictConfig]:
    """The generation prompt sets switched on, by name.

    Their names were checked against the other metric groups by ``lobass.config.validate``
    (``schema.eval_specs.clashing_set_names``).
    """
    generation = eval_cfg.generation
    if not generation.enabled:
        return {}
    return {str(k): v for k, v in generation.sets.items() if v.enabled}


def judged_sets(eval_cfg: DictConfig) -> dict[str, DictConfig]:
    """The enabled prompt sets whose answers the judge compares (``sets.<name>.judge``).

    A set answered only for its length (``alpaca_eval``) needs no baseline answers and no judge.
    """
    return {k: v for k, v in enabled_prompt_sets(eval_cfg).items() if v.get("judge", True)}


def generate_sets(model: Any, tokenizer: Any, eval_cfg: DictConfig, artifacts_dir: Path, *,
                  key: dict[str, Any], template: str,
                  allow_special_tokens: bool = False) -> dict[str, Path]:
    """Answer every enabled prompt set; each set is its own artifact under ``generations/``.

    Args:
        model: the evaluated model (adapter merged).
        tokenizer: its tokenizer.
        eval_cfg: the ``eval`` config.
        artifacts_dir: the artifact cache.
        key: what identifies the evaluated model (adapter, initial model), hashed into each key.
        template: ``model.template``.
        allow_special_tokens: ``data.allow_special_tokens``: special-token strings in a prompt
            are control tokens (``False``: plain text).

    Returns:
        The generations JSONL of each set.

    """
    generation = eval_cfg.generation
    paths: dict[str, Path] = {}
    for name, spec in enabled_prompt_sets(eval_cfg).items():
        prompts = read_prompts(spec.path, spec.reader, spec.max_rows)
        # a set's own cap (the answer-length endpoint's 256) or the generation-wide one
        max_new = int(spec.get("max_new_tokens") or generation.max_new_tokens)
        set_key = fingerprint({**key, "template": template, "prompts": file_sha256(Path(spec.path)),
                               "text": "special-tokens-allowed" if allow_special_tokens
                               else "plain-v1",
                               "reader": spec.reader, "max_rows": spec.max_rows,
                               "max_new_tokens": max_new})

        def build(work: Path, name: str = name, prompts: Any = prompts,
                  max_new: int = max_new) -> dict[str, Any]:
            rows = generate_responses(model, tokenizer, prompts, work / f"{name}.jsonl",
                                      template=template,
                                      allow_special_tokens=allow_special_tokens,
                                      max_new_tokens=max_new,
                                      batch_size=int(generation.batch_size), set_name=name)
            return {"set": name, "rows": len(rows)}

        directory, _ = ensure_artifact(artifacts_dir / "generations" / set_key, build)
        paths[name] = directory / f"{name}.jsonl"
    return paths


def generation_set_metrics(paths: dict[str, Path]) -> dict[str, float]:
    """Answer counts and lengths of every set."""
    metrics: dict[str, float] = {}
    for name, path in paths.items():
        rows = read_jsonl(path)
        metrics.update(generation_metrics(rows, name))
    return metrics


def judge_prompt(judge_cfg: DictConfig) -> tuple[str, str]:
    """The judge prompt's text and sha256.

    ``eval.judge.prompt`` is a file name under ``conf/judge/prompts/`` or a path; prompts are
    versioned by name (``pairwise_v1.txt``) and the hash goes into every raw verdict record.
    """
    path = judge_prompt_path(judge_cfg.prompt)
    if not path.is_file():
        shipped = sorted(p.name for p in JUDGE_PROMPTS.glob("*"))
        raise FileNotFoundError(f"eval.judge.prompt={judge_cfg.prompt}: {path} does not exist; "
                                f"shipped prompts: {shipped}")
    text = path.read_text(encoding="utf-8")
    missing = [k for k in ("{question}", "{answer_a}", "{answer_b}") if k not in text]
    if missing:
        raise ValueError(f"eval.judge.prompt={path} lacks the placeholders {missing}")
    return text, file_sha256(path)


def judge_inputs(eval_cfg: DictConfig) -> dict[str, Any] | None:
    """What the judge's results depend on beyond the config: the baseline answers and prompt.

    Called before the eval artifact's key is made, so that new baseline answers (same path)
    re-judge, and a wrong baseline path fails before any model is loaded.
    """
    judge_cfg = eval_cfg.judge
    if judge_cfg.baseline is None:
        return None
    if not judged_sets(eval_cfg):
        log.warning("eval.judge.baseline is set but no eval.generation set is enabled with "
                    "judge: true: nothing to judge")
        return None
    baseline = {name: fingerprint(find_baseline_generations(judge_cfg.baseline, name))
                for name in judged_sets(eval_cfg)}
    # "render": how answers are put in the prompt (fenced since issue 27); a change re-judges.
    return {"baseline": baseline, "prompt": judge_prompt(judge_cfg)[1], "render": "fenced-v1"}


def _judge_arguments(judge_cfg: DictConfig) -> dict[str, Any]:
    """``eval.judge`` without the keys the pairwise protocol reads (see ``PROTOCOL_KEYS``)."""
    spec = OmegaConf.to_container(judge_cfg, resolve=True)
    assert isinstance(spec, dict)
    return {str(k): v for k, v in spec.items() if k not in PROTOCOL_KEYS + CHECK_KEYS}


def make_judge(judge_cfg: DictConfig, load_local: Callable[[str | None], tuple[Any, Any]],
               template: str) -> Judge:
    """The judge ``eval.judge`` describes, built from its ``_target_`` by Hydra.

    Args:
        judge_cfg: the ``eval.judge`` config.
        load_local: ``load_local(model)`` gives (model, tokenizer) for ``local_hf``, whose
            ``eval.judge.model`` is a checkpoint to load (``None``: the run's initial model).
        template: ``model.template``, the chat format a local judge's prompt is rendered in.

    Returns:
        The judge.

    """
    build = instantiate(_judge_arguments(judge_cfg), _partial_=True, _convert_="all")
    if judge_cfg.name == "local_hf":
        model, tokenizer = load_local(judge_cfg.model)
        judge: Judge = build(model=model, tokenizer=tokenizer, template=template)
        return judge
    judge = build()
    return judge


def preflight_judge(eval_cfg: DictConfig, stages: Sequence[str]) -> None:
    """Before the first stage: the judge's prompt, and a remote judge's key and server.

    Does nothing unless the eval stage will judge (``eval`` in ``stages``, a baseline set and a
    prompt set enabled). A judge class with a ``preflight()`` method (``openai_compatible``) is
    built and asked: its key must be in the environment and its ``base_url`` must answer. Before
    that key is sent, ``api_key_env`` must name a key's variable (``check_key_env``), and a plain
    ``http://`` URL to another machine is warned about (the key would travel unencrypted).

    Raises:
        ConfigError: ``api_key_env`` names no key's variable.
        FileNotFoundError: the judge prompt file is missing.
        ValueError: the prompt lacks a placeholder.
        RuntimeError: from the judge's own check, naming the setting to change.

    """
    judge_cfg = eval_cfg.judge
    if "eval" not in stages or judge_cfg.baseline is None or not enabled_prompt_sets(eval_cfg):
        return
    judge_prompt(judge_cfg)
    if "api_key_env" in judge_cfg:
        check_key_env("eval.judge", judge_cfg)
        host = plain_http_host(str(judge_cfg.get("base_url") or ""))
        if host is not None:
            sent = f"the key in ${judge_cfg.api_key_env}, " if judge_cfg.api_key_env else ""
            log.warning("eval.judge.base_url=%s is plain http:// to %s, not this machine: %sthe "
                        "prompts and the answers cross the network unencrypted; use https://",
                        judge_cfg.base_url, host, sent)
    if hasattr(get_class(judge_cfg._target_), "preflight"):
        instantiate(_judge_arguments(judge_cfg), _partial_=True, _convert_="all")().preflight()


def judge_sets(judge: Judge, judge_cfg: DictConfig, generations: dict[str, Path], work: Path, *,
               seed: int) -> dict[str, float]:
    """Judge each set against the baseline; raw verdicts go to ``work/judge/<set>.jsonl``.

    Returns:
        ``eval/<set>/{win,tie,lose,unparsed,n,win_rate,win_rate_ci_low,win_rate_ci_high}``.

    """
    template, prompt_sha = judge_prompt(judge_cfg)
    metrics: dict[str, float] = {}
    for name, path in generations.items():
        ours = read_jsonl(path)
        baseline = find_baseline_generations(judge_cfg.baseline, name)
        records, counts = judge_pairwise(
            judge, template, ours, baseline, tie_margin=float(judge_cfg.get("tie_margin", 0.0)),
            bootstrap_iters=int(judge_cfg.bootstrap_iters), seed=seed)
        for record in records:
            record.update({"judge": judge.name, "prompt_file": judge_cfg.prompt,
                           "prompt_sha256": prompt_sha})
        atomic_write_text(work / "judge" / f"{name}.jsonl", jsonl_text(records))
        metrics.update({f"eval/{name}/{k}": float(v) for k, v in counts.items()})
        log.info("eval.judge=%s on %s: %d win / %d tie / %d lose, win rate %.3f [%.3f, %.3f]",
                 judge.name, name, counts["win"], counts["tie"], counts["lose"],
                 counts["win_rate"], counts["win_rate_ci_low"], counts["win_rate_ci_high"])
    return metrics
