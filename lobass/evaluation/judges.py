"""The judges: an OpenAI-compatible server (GPT-4 as in the paper) and a local transformers model.

Both take rendered comparison prompts and return one verdict record per prompt (see
:class:`lobass.evaluation.judge.Judge`); :func:`lobass.evaluation.judge.judge_pairwise` runs them
in both orders. Built from config by ``hydra.utils.instantiate`` (``_target_`` in conf/judge/).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from lobass.evaluation.judge import VERDICT_TAGS, parse_verdict
from lobass.formatting import tokenize_prompt

log = logging.getLogger(__name__)


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
