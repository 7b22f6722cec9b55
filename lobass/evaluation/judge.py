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
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn import functional as F

from lobass.evaluation.generation import read_generations
from lobass.formatting import format_prompt, prompt_token_ids
from lobass.stats import bootstrap_interval

log = logging.getLogger(__name__)

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


def render_prompt(template: str, question: str, answer_a: str, answer_b: str) -> str:
    """Fill ``{question}``, ``{answer_a}``, ``{answer_b}`` in one pass (answers may hold braces)."""
    values = {"question": question, "answer_a": answer_a, "answer_b": answer_b}
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


@dataclass
class OpenAICompatibleJudge:
    """Any OpenAI-style ``/chat/completions`` server (OpenAI, a local vLLM, ...), via stdlib HTTP.

    The key is read from the environment variable named by ``api_key_env`` at call time and sent
    only in the ``Authorization`` header; it never reaches configs or logs.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    max_tokens: int = 512
    temperature: float = 0.0
    timeout_s: float = 120.0
    retries: int = 3
    max_workers: int = 4
    probe_timeout_s: float | None = None  # preflight(): seconds for GET {base_url}/models
    name: str = "openai_compatible"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RuntimeError(f"eval.judge.api_key_env={self.api_key_env}: that environment "
                                   "variable is not set; export it, or set "
                                   "eval.judge.api_key_env=null for a server without keys")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def preflight(self) -> None:
        """Check, before the first stage, that the key is set and ``base_url`` answers.

        The key's environment variable must be set and non-empty; then, unless
        ``probe_timeout_s`` is ``None``, one ``GET {base_url}/models`` must get an HTTP answer
        within that many seconds. Any answer but 401/403 counts (some servers have no
        ``/models``); 401/403 means the server refused the key.

        Raises:
            RuntimeError: the key's variable is unset or empty, the key was refused, or the
                server did not answer; the message says which setting to change.

        """
        headers = self._headers()
        if self.probe_timeout_s is None:
            return
        url = self.base_url.rstrip("/") + "/models"
        request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=self.probe_timeout_s):
                pass
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise RuntimeError(f"eval.judge.base_url={self.base_url}: HTTP {err.code} from "
                                   f"{url}: the server refused the key in ${self.api_key_env}"
                                   ) from err
            log.info("eval.judge.base_url=%s answers (HTTP %d from %s)", self.base_url,
                     err.code, url)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise RuntimeError(f"eval.judge.base_url={self.base_url}: no answer from {url} within "
                               f"{self.probe_timeout_s} s ({reason}); start the server or fix the "
                               "URL (eval.judge.probe_timeout_s=null skips this check)") from err

    def complete(self, prompt: str) -> str:
        """The judge model's answer to one user message (greedy), retrying transient errors."""
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        url = self.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.retries):
            request = urllib.request.Request(url, data=body, headers=self._headers(),
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
                content: str = answer["choices"][0]["message"]["content"]
                return content
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                code = getattr(err, "code", None)
                if code is not None and code < 500 and code != 429:  # our request is wrong
                    raise RuntimeError(f"eval.judge.base_url={self.base_url}: HTTP {code} "
                                       f"from {url}") from err
                if attempt == self.retries - 1:
                    raise RuntimeError(f"eval.judge.base_url={self.base_url}: {url} failed "
                                       f"after {self.retries} tries ({err})") from err
                time.sleep(2.0 ** attempt)  # back off: rate limits and restarting servers
        raise AssertionError("unreachable")

    def judge(self, prompts: Sequence[str]) -> list[dict[str, Any]]:  # noqa: D102
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            texts = list(pool.map(self.complete, prompts))
        return [{"verdict": parse_verdict(t), "raw": t} for t in texts]


@dataclass
class LocalHFJudge:
    """A local transformers model scoring the three verdicts' log-probabilities.

    The prompt is rendered with the judge model's template and the assistant turn is started
    with ``[[``; each verdict (``A``, ``B``, ``C``) is scored by the summed log-probability of its
    tokens. When every verdict is one token (as with Llama-style BPE vocabularies), one forward
    pass over the prompt gives all three (the fast path); otherwise each is scored in full.
    """

    model: Any
    tokenizer: Any
    template: str = "chat"
    max_length: int = 2048  # prompt tokens kept (from the left: the verdict request is at the end)
    name: str = "local_hf"
    prefix: str = "[["
    candidates: tuple[str, str, str] = ("A", "B", "C")
    fast: bool = True

    def _prompt_ids(self, prompt: str) -> list[int]:
        text = format_prompt(({"role": "user", "content": prompt},), self.tokenizer,
                             self.template) + self.prefix
        return prompt_token_ids(text, self.tokenizer)[-self.max_length:]

    def _candidate_ids(self) -> list[list[int]]:
        return [self.tokenizer(c, add_special_tokens=False)["input_ids"]
                for c in self.candidates]

    def score(self, prompt: str) -> dict[str, float]:
        """Log-probability of each verdict (``A``, ``B``, ``tie``) after the prompt."""
        device = next(self.model.parameters()).device
        ids = self._prompt_ids(prompt)
        cands = self._candidate_ids()
        names = [VERDICT_TAGS[c[0]] for c in self.candidates]
        with torch.inference_mode():
            if self.fast and all(len(c) == 1 for c in cands):
                # One forward pass: every verdict is a single token, so its log-probability is
                # read off the distribution after the prompt (the slow path gives the same).
                logits = self.model(torch.tensor([ids], device=device)).logits[0, -1]  # (V,)
                logp = F.log_softmax(logits.float(), dim=-1)  # float32: a stable softmax
                return {n: float(logp[c[0]]) for n, c in zip(names, cands, strict=True)}
            out = {}
            for name, cand in zip(names, cands, strict=True):
                full = torch.tensor([ids + cand], device=device)  # (1, T + C)
                logp = F.log_softmax(self.model(full).logits[0].float(), dim=-1)  # (T + C, V)
                positions = range(len(ids) - 1, len(ids) - 1 + len(cand))
                out[name] = float(sum(logp[p, t] for p, t in zip(positions, cand, strict=True)))
            return out

    def judge(self, prompts: Sequence[str]) -> list[dict[str, Any]]:  # noqa: D102
        from tqdm.auto import tqdm

        records = []
        for prompt in tqdm(prompts, desc="judge local_hf", unit="prompt"):
            logprobs = self.score(prompt)
            records.append({"verdict": max(logprobs.items(), key=lambda kv: kv[1])[0],
                            "raw": logprobs, "logprobs": logprobs})
        return records


# ---------------------------------------------------------------------------------------------
# Pairwise protocol


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
