"""The judges: an OpenAI-compatible server (GPT-4 as in the paper) and a local transformers model.

Both take rendered comparison prompts and return one verdict record per prompt (see
:class:`lobass.evaluation.judge.Judge`); :func:`lobass.evaluation.judge.judge_pairwise` runs them
in both orders. Built from config by ``hydra.utils.instantiate`` (``_target_`` in conf/judge/).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import torch
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential
from torch.nn import functional as F

from lobass.evaluation.judge import VERDICT_TAGS, parse_verdict
from lobass.formatting import tokenize_prompt

log = logging.getLogger(__name__)


@dataclass
class OpenAICompatibleJudge:
    """Any OpenAI-style ``/chat/completions`` server (OpenAI, a local vLLM, ...), via ``httpx``.

    Transient failures (no connection, a timeout, HTTP 429 and 5xx) are retried by ``tenacity``
    with exponential back-off (1, 2, 4 ... s) up to ``retries`` tries in all; any other HTTP
    error means the request is wrong and fails at once. Errors name ``base_url`` and the URL.

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
        try:
            response = httpx.get(url, headers=headers, timeout=self.probe_timeout_s)
        except httpx.TransportError as err:
            raise RuntimeError(f"eval.judge.base_url={self.base_url}: no answer from {url} within "
                               f"{self.probe_timeout_s} s ({err!r}); start the server or fix the "
                               "URL (eval.judge.probe_timeout_s=null skips this check)") from err
        if response.status_code in (401, 403):
            raise RuntimeError(f"eval.judge.base_url={self.base_url}: HTTP "
                               f"{response.status_code} from {url}: the server refused the key in "
                               f"${self.api_key_env}")
        if response.is_error:
            log.info("eval.judge.base_url=%s answers (HTTP %d from %s)", self.base_url,
                     response.status_code, url)

    def complete(self, prompt: str) -> str:
        """The judge model's answer to one user message (greedy), retrying transient errors."""
        body = {"model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "messages": [{"role": "user", "content": prompt}]}
        url = self.base_url.rstrip("/") + "/chat/completions"
        retrying = Retrying(stop=stop_after_attempt(self.retries), reraise=True,
                            wait=wait_exponential(multiplier=1.0, exp_base=2.0),
                            retry=retry_if_exception(_is_transient))
        try:
            for attempt in retrying:
                with attempt:
                    response = httpx.post(url, json=body, headers=self._headers(),
                                          timeout=self.timeout_s)
                    response.raise_for_status()
        except httpx.HTTPStatusError as err:
            code = err.response.status_code
            if not _is_transient(err):  # our request is wrong: no retry
                raise RuntimeError(f"eval.judge.base_url={self.base_url}: HTTP {code} "
                                   f"from {url}") from err
            raise RuntimeError(f"eval.judge.base_url={self.base_url}: {url} failed after "
                               f"{self.retries} tries (HTTP {code})") from err
        except httpx.TransportError as err:
            raise RuntimeError(f"eval.judge.base_url={self.base_url}: {url} failed after "
                               f"{self.retries} tries ({err!r})") from err
        content: str = response.json()["choices"][0]["message"]["content"]
        return content

    def judge(self, prompts: Sequence[str]) -> list[dict[str, Any]]:  # noqa: D102
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            texts = list(pool.map(self.complete, prompts))
        return [{"verdict": parse_verdict(t), "raw": t} for t in texts]


def _is_transient(err: BaseException) -> bool:
    """Worth another try: no connection or a timeout, a rate limit (429), a server error (5xx)."""
    if isinstance(err, httpx.HTTPStatusError):
        code = err.response.status_code
        return code == 429 or code >= 500
    return isinstance(err, httpx.TransportError)


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
        # The comparison prompt (question and answers) is row text: a "<|im_end|>" an answer
        # writes stays text, and cannot end the judge's turn.
        return tokenize_prompt(({"role": "user", "content": prompt},), self.tokenizer,
                               self.template, suffix=self.prefix)[-self.max_length:]

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
                # use_cache=False here and below: one forward each, no token follows it
                logits = self.model(torch.tensor([ids], device=device),
                                    use_cache=False).logits[0, -1]  # (V,)
                logp = F.log_softmax(logits.float(), dim=-1)  # float32: a stable softmax
                return {n: float(logp[c[0]]) for n, c in zip(names, cands, strict=True)}
            out = {}
            for name, cand in zip(names, cands, strict=True):
                full = torch.tensor([ids + cand], device=device)  # (1, T + C)
                logits = self.model(full, use_cache=False).logits[0]  # (T + C, V)
                logp = F.log_softmax(logits.float(), dim=-1)
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
