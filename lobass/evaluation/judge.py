"""Pairwise judging of this run's answers against a baseline run's, in both orders.

The paper (v1) asks GPT-4 which of two answers is better, the candidate against the full-data
model, and reports win / tie / lose; its v2 reports an AlpacaEval-style win rate with a bootstrap
95% interval. We do both from the same verdicts. Every pair is judged twice, with the answers
swapped, because LLM judges favour one position:

* text judges (``openai_compatible``) give a verdict per order (``[[A]]``, ``[[B]]``, ``[[C]]`` for
  a tie); as in FastChat, the pair is a win only if both orders prefer our answer, a loss only if
  both prefer the baseline, and a tie otherwise (a tie or an inconsistent pair);
* ``local_hf`` reads the judge model's log-probabilities of the three verdicts instead of sampling
  one: a 135M model rarely writes a well-formed verdict, and its position bias swamps any signal
  in a single order. Averaging each outcome's log-probability over the two orders cancels an
  additive position bias exactly (our answer is ``A`` once and ``B`` once), and the pair's outcome
  is the best averaged one (a tie as well when ours and the baseline's differ by less than
  ``tie_margin`` nats).

The judge's raw output (text, or the log-probabilities) is kept for every order.

Everything of the judge lives here: its prompt file, what its verdicts depend on (the eval key),
building it from ``eval.judge`` (Hydra ``_target_``), the pre-flight of a remote judge, both-order
calls and parsing, and the per-set records. The judge classes themselves are in
:mod:`lobass.evaluation.judges`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lobass.artifacts import atomic_write_text, file_sha256, fingerprint
from lobass.evaluation.generation import (
    enabled_prompt_sets,
    judged_sets,
    read_generations,
    visible_answer,
)
from lobass.jsonrows import jsonl_text, read_jsonl
from lobass.schema import check_key_env, plain_http_host
from lobass.schema.eval_specs import judge_prompt_path
from lobass.stats import bootstrap_interval

log = logging.getLogger(__name__)

# eval.judge keys the pairwise protocol reads (judge_inputs, judge_sets); the rest of the group
# are the arguments of its _target_ class.
PROTOCOL_KEYS = ("baseline", "prompt", "bootstrap_iters", "tie_margin")
CHECK_KEYS = ("allow_any_env",)  # read by the config check and preflight_judge, not the class

VERDICT_TAGS = {"A": "A", "B": "B", "C": "tie"}  # what the prompt asks for -> our verdict name
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "lose": 0.0}  # AlpacaEval: a tie counts half
_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


class Judge(Protocol):
    """Judges rendered comparison prompts; one record per prompt, in order."""

    name: str

    def judge(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """``{"verdict": "A"|"B"|"tie"|"unparsed", "raw": ...}`` per prompt.

        A judge that scores verdicts may add ``"logprobs": {"A", "B", "tie"}``.
        """
        ...


def fence(text: str) -> str:
    """``text`` between two lines of backticks longer than any run of backticks inside it.

    CommonMark's rule for code fences: no text can close a fence longer than its own longest
    backtick run, so an answer cannot end its fence early and write instructions or a fake
    verdict outside it (the judge prompt says that a fence holds an answer, not instructions).
    """
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    bar = "`" * max(3, longest + 1)
    return f"{bar}\n{text}\n{bar}"


def render_prompt(template: str, question: str, answer_a: str, answer_b: str) -> str:
    """Fill ``{question}``, ``{answer_a}``, ``{answer_b}`` in one pass, the answers fenced.

    One pass, so that braces in an answer are not placeholders; each answer is :func:`fence`d,
    and one with nothing visible in it is judged as the empty answer.
    """
    values = {"question": question, "answer_a": fence(visible_answer(answer_a)),
              "answer_b": fence(visible_answer(answer_b))}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_verdict(text: str) -> str:
    """The verdict of a judge's answer: its last ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie).

    Returns:
        ``A``, ``B``, ``tie``, or ``unparsed`` when the answer holds no verdict.

    """
    found = _VERDICT.findall(text)
    return VERDICT_TAGS[found[-1]] if found else "unparsed"


# ---------------------------------------------------------------------------------------------
# Judges


def combine_orders(first: dict[str, Any], second: dict[str, Any], tie_margin: float = 0.0) -> str:
    """Outcome (``win``/``tie``/``lose``) of our answer from the two orders' records.

    ``first`` judged (A = ours, B = baseline), ``second`` the swap (A = baseline, B = ours).
    """
    if "logprobs" in first and "logprobs" in second:
        one, two = first["logprobs"], second["logprobs"]
        ours = (one["A"] + two["B"]) / 2  # each position once: an additive position bias cancels
        base = (one["B"] + two["A"]) / 2
        tie = (one["tie"] + two["tie"]) / 2
        if tie >= max(ours, base) or abs(ours - base) <= tie_margin:
            return "tie"
        return "win" if ours > base else "lose"
    mine = {"A": "ours", "B": "base"}.get(first["verdict"], "tie")
    theirs = {"A": "base", "B": "ours"}.get(second["verdict"], "tie")
    if mine == theirs == "ours":
        return "win"
    if mine == theirs == "base":
        return "lose"
    return "tie"  # a tie, an inconsistent pair or an unparsed verdict


def judge_pairwise(judge: Judge, template: str, ours: Sequence[dict[str, Any]],
                   baseline: dict[str, dict[str, Any]], *, tie_margin: float = 0.0,
                   bootstrap_iters: int = 2000, seed: int = 0
                   ) -> tuple[list[dict[str, Any]], dict[str, int | float]]:
    """Judge every answer of ours against the baseline's answer to the same prompt.

    Args:
        judge: the judge.
        template: the judge prompt (``{question}``, ``{answer_a}``, ``{answer_b}``).
        ours: this run's generation rows (``id``, ``prompt``, ``output``).
        baseline: the baseline's rows by id; must cover every id of ``ours``.
        tie_margin: ``local_hf``: nats within which ours and the baseline's tie.
        bootstrap_iters: resamples for the win rate's interval.
        seed: seeds the bootstrap.

    Returns:
        The per-prompt records (both orders' raw verdicts and the outcome) and the counts
        ``win``, ``tie``, ``lose``, ``unparsed``, ``n``, ``win_rate`` and its 95% interval.

    Raises:
        ValueError: the baseline lacks answers for some of our prompts.

    """
    missing = [r["id"] for r in ours if r["id"] not in baseline]
    if missing:
        raise ValueError(f"eval.judge.baseline has no answer for {len(missing)} of our "
                         f"{len(ours)} prompts (first ids: {missing[:5]}); generate the "
                         "baseline on the same prompt set")
    prompts = []
    for row in ours:
        other = baseline[row["id"]]["output"]
        prompts.append(render_prompt(template, row["prompt"], row["output"], other))
        prompts.append(render_prompt(template, row["prompt"], other, row["output"]))
    verdicts = judge.judge(prompts)
    records = []
    for i, row in enumerate(ours):
        first, second = verdicts[2 * i], verdicts[2 * i + 1]
        records.append({"id": row["id"], "prompt": row["prompt"], "ours": row["output"],
                        "baseline": baseline[row["id"]]["output"],
                        "ours_first": first, "baseline_first": second,
                        "outcome": combine_orders(first, second, tie_margin)})
    outcomes = [r["outcome"] for r in records]
    scores = [OUTCOME_SCORE[o] for o in outcomes]
    low, high = bootstrap_interval(scores, iters=bootstrap_iters, seed=seed)
    metrics: dict[str, int | float] = {
        "n": len(records), "win": outcomes.count("win"), "tie": outcomes.count("tie"),
        "lose": outcomes.count("lose"),
        "unparsed": sum(v["verdict"] == "unparsed" for v in verdicts),
        "win_rate": sum(scores) / len(scores) if scores else float("nan"),
        "win_rate_ci_low": low, "win_rate_ci_high": high,
    }
    return records, metrics


def find_baseline_generations(baseline: str | Path, set_name: str) -> dict[str, dict[str, Any]]:
    """The baseline's answers for one prompt set, by prompt id.

    Args:
        baseline: a generations JSONL (rows may carry ``set``), an eval artifact directory (with
            ``generations.json``), a run directory (its ``summary.json`` names the eval artifact),
            or a directory holding ``<set>.jsonl``.
        set_name: the prompt set (``vicuna``, ``mt_bench``, ``heldout``).

    Raises:
        FileNotFoundError: nothing usable there; the message lists what was looked for.

    """
    path = Path(baseline)
    if path.is_file():
        rows = read_generations(path)
        return {k: r for k, r in rows.items() if r.get("set", set_name) == set_name}
    tried = []
    if (path / "summary.json").is_file():
        eval_dir = json.loads((path / "summary.json").read_text()).get("artifacts", {}).get("eval")
        tried.append(f"{path / 'summary.json'} (artifacts.eval)")
        if eval_dir:
            path = Path(eval_dir)
    index = path / "generations.json"
    tried.append(str(index))
    if index.is_file():
        sets = json.loads(index.read_text())
        if set_name in sets:
            return read_generations(Path(sets[set_name]))
    tried.append(str(path / f"{set_name}.jsonl"))
    if (path / f"{set_name}.jsonl").is_file():
        return read_generations(path / f"{set_name}.jsonl")
    raise FileNotFoundError(f"eval.judge.baseline={baseline}: no answers for prompt set "
                            f"{set_name!r}; looked in {tried}")


def judge_prompt(judge_cfg: DictConfig) -> tuple[str, str]:
    """The judge prompt's text and sha256.

    ``eval.judge.prompt`` is a file name under ``conf/judge/prompts/`` or a path; prompts are
    versioned by name (``pairwise_v1.txt``) and the hash goes into every raw verdict record.
    That the file exists is checked once, with the config (``lobass.schema.rules``).
    """
    path = judge_prompt_path(judge_cfg.prompt)
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
        host = plain_http_host(str(judge_cfg.base_url))
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
            judge, template, ours, baseline, tie_margin=float(judge_cfg.tie_margin),
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
