"""The schema of the ``eval`` group: benchmarks, reference-answer losses, answers, the judge."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lobass.schema.registries import prompt_readers, readers
from lobass.schema.walk import BatchSize, knob

JUDGE_PROMPTS = Path(__file__).resolve().parents[2] / "conf" / "judge" / "prompts"
# eval metric groups of their own: a generation set named like one would overwrite its metrics
OTHER_EVAL_GROUPS = ("heldout", "gsm8k", "ifeval")


def judge_prompt_path(prompt: str) -> Path:
    """``eval.judge.prompt``: a file name under ``conf/judge/prompts/``, or a path."""
    path = Path(prompt)
    return path if path.is_absolute() else JUDGE_PROMPTS / path


def clashing_set_names(sets: Iterable[str], reference_loss: Iterable[str]) -> list[str]:
    """Generation sets named like another eval metric group (their metric keys would collide)."""
    return sorted(set(sets) & (set(OTHER_EVAL_GROUPS) | set(reference_loss)))


@dataclass(kw_only=True)
class BenchmarkSpec:
    """An lm-eval benchmark's limits and batch."""

    enabled: bool = knob()
    limit: int | None = knob(None, ge=1)
    max_gen_toks: int = knob(ge=1)
    batch_size: BatchSize = knob(ge=1)
    max_length: int = knob(ge=1)


@dataclass(kw_only=True)
class Gsm8kSpec(BenchmarkSpec):
    """``eval.gsm8k``."""

    test_path: str = knob("")
    fewshot_path: str = knob("")
    num_fewshot: int = knob(0, ge=0)


@dataclass(kw_only=True)
class IfevalSpec(BenchmarkSpec):
    """``eval.ifeval``."""

    path: str = knob("")


@dataclass(kw_only=True)
class HeldoutSpec:
    """``eval.heldout``: response loss on a held-out slice."""

    enabled: bool = knob()
    path: str = knob()
    reader: str = knob(choices=readers)
    max_rows: int | None = knob(None, ge=1)


@dataclass(kw_only=True)
class ReferenceLossSpec:
    """``eval.reference_loss.<name>``: loss on other reference answers."""

    enabled: bool = knob()
    questions: str | None = knob(None)  # FastChat question file (reader=fastchat only)
    answers: str = knob()  # FastChat answers, or an SFT file holding prompts and answers
    reader: str = knob("fastchat", choices=prompt_readers)
    max_rows: int | None = knob(None, ge=1)
    trimmed: bool = knob(False)  # also loss_trimmed: without each answer's first and last token


@dataclass(kw_only=True)
class PromptSetSpec:
    """``eval.generation.sets.<name>``: a prompt file answered (for the judge, for its length)."""

    enabled: bool = knob()
    path: str = knob()
    reader: str = knob(choices=prompt_readers)
    max_rows: int | None = knob(None, ge=1)
    max_new_tokens: int | None = knob(None, ge=1)  # null: eval.generation.max_new_tokens
    judge: bool = knob(True)  # false: answered for gen_len_tokens only, never judged


@dataclass(kw_only=True)
class GenerationSpec:
    """``eval.generation``: greedy answers per prompt set."""

    enabled: bool = knob()
    max_new_tokens: int = knob(ge=1)
    batch_size: int = knob(ge=1)
    sets: dict[str, PromptSetSpec] = knob({})


@dataclass(kw_only=True)
class JudgeSpec:
    """``eval.judge`` fields every judge has (the pairwise protocol's)."""

    _target_: str = knob()  # the class hydra.utils.instantiate builds
    name: Literal["local_hf", "openai_compatible"] = knob()
    baseline: str | None = knob(None)  # full_data, a run dir, an eval artifact dir or a JSONL
    prompt: str = knob("pairwise_v2.txt")
    bootstrap_iters: int = knob(2000, ge=1)
    tie_margin: float = knob(0.0, ge=0)  # log-prob verdicts (local_hf): nats within which a tie


@dataclass(kw_only=True)
class LocalJudgeSpec(JudgeSpec):
    """``judge=local_hf``."""

    model: str | None = knob(None)
    max_length: int = knob(2048, ge=1)


@dataclass(kw_only=True)
class OpenAIJudgeSpec(JudgeSpec):
    """``judge=openai_compatible``."""

    base_url: str = knob()
    model: str = knob()
    api_key_env: str | None = knob(None)  # *_KEY, *_TOKEN or *_SECRET (schema/secrets.py)
    allow_any_env: bool = knob(False)  # true: api_key_env may name any variable
    max_tokens: int = knob(512, ge=1)
    temperature: float = knob(0.0, ge=0, le=2)
    timeout_s: float = knob(120.0, gt=0)
    retries: int = knob(3, ge=1)
    max_workers: int = knob(4, ge=1)
    probe_timeout_s: float | None = knob(None, gt=0)


JUDGE_SPECS: dict[str, type] = {"local_hf": LocalJudgeSpec, "openai_compatible": OpenAIJudgeSpec}


@dataclass(kw_only=True)
class EvalSpec:
    """``eval``: benchmarks, losses, generation and the judge."""

    backend: Literal["hf", "vllm"] = knob()
    gsm8k: Gsm8kSpec = knob()
    ifeval: IfevalSpec = knob()
    heldout: HeldoutSpec = knob()
    generation: GenerationSpec = knob()
    judge: dict[str, Any] = knob()  # checked against JUDGE_SPECS[name]
    reference_loss: dict[str, ReferenceLossSpec] = knob({})
