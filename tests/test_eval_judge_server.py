"""The openai_compatible judge end to end against a real OpenAI-style HTTP server on 127.0.0.1.

The server is stdlib ``http.server`` in a thread serving ``/v1/chat/completions`` with the tiny
random model's own greedy generations (chat template applied to the request's messages), so the
judge's request building, auth header, retries, response parsing and record keeping all run for
real. The tiny model writes no verdict, so every order is ``unparsed`` and every pair a tie.
"""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from omegaconf import OmegaConf

from conftest import local_http_server
from lobass.evaluation.generation import generate_batch
from lobass.evaluation.judge import judge_pairwise, judge_prompt, render_prompt
from lobass.evaluation.judges import OpenAICompatibleJudge
from lobass.formatting import format_prompt, prompt_token_ids

KEY = "sk-test-not-a-secret-123"


def _answer(model, tokenizer, messages, max_tokens):
    ids = prompt_token_ids(format_prompt(tuple(messages), tokenizer, "chat"), tokenizer)
    tokens, finished = generate_batch(model, tokenizer, [ids], max_new_tokens=max_tokens)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True), finished


@pytest.fixture
def server(tiny) -> Iterator[dict]:
    model, tokenizer = tiny
    state = {"requests": [], "fail_next": 1, "auth": set(), "posts": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802  (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["auth"].add(self.headers.get("Authorization"))
            state["posts"] += 1
            with lock:
                if state["fail_next"]:  # one transient failure: the client must retry
                    state["fail_next"] -= 1
                    self.send_error(503, "warming up")
                    return
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                state["requests"].append(body)
                text, finished = _answer(model, tokenizer, body["messages"], body["max_tokens"])
            payload = json.dumps({
                "id": f"cmpl-{len(state['requests'])}", "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if finished else "length"}],
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # keep the test output quiet
            pass

    with local_http_server(Handler) as url:
        state["base_url"] = f"{url}/v1"
        yield state


def test_openai_compatible_judge_end_to_end(server, tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setenv("LOBASS_TEST_JUDGE_KEY", KEY)
    judge = OpenAICompatibleJudge(base_url=server["base_url"], model="tiny-judge",
                                  api_key_env="LOBASS_TEST_JUDGE_KEY", max_tokens=8,
                                  max_workers=2)
    template = judge_prompt(OmegaConf.create({"prompt": "pairwise_v1.txt"}))[0]
    ours = [{"id": "1", "prompt": "Name a colour.", "output": "Blue."},
            {"id": "2", "prompt": "What is 2+2?", "output": "4"},
            {"id": "3", "prompt": "Say hi.", "output": "Hi!"}]
    baseline = {"1": {"output": "Trains."}, "2": {"output": "5"}, "3": {"output": "Bye."}}
    records, m = judge_pairwise(judge, template, ours, baseline, bootstrap_iters=100)

    assert len(server["requests"]) == 6  # 3 pairs x 2 orders, after one retried 503
    assert server["auth"] == {f"Bearer {KEY}"}
    assert all(r["model"] == "tiny-judge" and r["temperature"] == 0.0
               for r in server["requests"])
    sent = {r["messages"][0]["content"] for r in server["requests"]}
    assert render_prompt(template, "What is 2+2?", "4", "5") in sent  # ours as A
    assert render_prompt(template, "What is 2+2?", "5", "4") in sent  # swapped
    # The raw verdicts are the server model's actual answers to the exact prompts.
    for record, row in zip(records, ours, strict=True):
        other = baseline[row["id"]]["output"]
        for key, (a, b) in (("ours_first", (row["output"], other)),
                            ("baseline_first", (other, row["output"]))):
            prompt = render_prompt(template, row["prompt"], a, b)
            expected, _ = _answer(model, tokenizer, [{"role": "user", "content": prompt}], 8)
            assert record[key]["raw"] == expected
            assert record[key]["verdict"] == "unparsed"  # a random model writes no [[A]]
        assert record["outcome"] == "tie"
    assert (m["n"], m["win"], m["tie"], m["lose"], m["unparsed"]) == (3, 0, 3, 0, 6)
    assert m["win_rate"] == 0.5 and m["win_rate_ci_low"] == m["win_rate_ci_high"] == 0.5
    assert KEY not in json.dumps(records)


def test_missing_key_and_client_errors_are_clear(server, monkeypatch):
    monkeypatch.delenv("LOBASS_TEST_JUDGE_KEY", raising=False)
    judge = OpenAICompatibleJudge(base_url=server["base_url"], model="m",
                                  api_key_env="LOBASS_TEST_JUDGE_KEY", retries=1)
    with pytest.raises(RuntimeError, match="LOBASS_TEST_JUDGE_KEY: that environment variable"):
        judge.complete("hi")
    server["fail_next"] = 0
    wrong = OpenAICompatibleJudge(base_url=server["base_url"] + "/nope", model="m",
                                  api_key_env=None)
    posts = server["posts"]
    with pytest.raises(RuntimeError, match=r"base_url=http://127\.0\.0\.1:\d+/v1/nope: HTTP 404"):
        wrong.complete("hi")
    assert server["posts"] == posts + 1  # a client error is not retried (retries=3)
    server["fail_next"] = 5  # a server that stays down: retried, then a clear error
    down = OpenAICompatibleJudge(base_url=server["base_url"], model="m", api_key_env=None,
                                 retries=2)
    with pytest.raises(RuntimeError, match=r"chat/completions failed after 2 tries \(HTTP 503\)"):
        down.complete("hi")
    assert server["posts"] == posts + 3 and server["fail_next"] == 3
