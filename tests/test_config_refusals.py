"""Issue 27, config findings: unknown keys, the selection against the pool, secret shapes.

Each case failed on the main of issue 27 (the key was accepted and ignored, the check came after
the reference and scoring, or the secret passed) and passes now; docs/reliability.md, Round 3.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, TINY, local_http_server
from lobass.config import ConfigError, validate, validate_pool, with_defaults
from lobass.data import read_examples
from lobass.pipeline import run
from lobass.pool import read_pool
from lobass.schema import find_secret, plain_http_host


def _refused_fast(make_cfg, tmp_path: Path, *overrides: str, artifacts: bool = False) -> str:
    """run(cfg) raises a ConfigError in seconds, before any artifact; returns its message."""
    cfg = make_cfg(*TINY, *overrides)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert time.perf_counter() - start < 20  # the reference and scoring alone take longer
    assert not (tmp_path / "artifacts").exists()  # no stage started, nothing cached
    assert str(err.value) in (tmp_path / "run" / "error.txt").read_text()
    return str(err.value)


# ---------------------------------------------------------------------------------------------
# Unknown keys: refused in every group, with the closest known key

UNKNOWN = [  # (overrides, message)
    (["+train.lora.rank=8"], "train.lora.rank is not a config key (it would be ignored); known "
                             "keys: alpha, dropout, r"),
    (["+train.learnig_rate=0.001"], "train.learnig_rate is not a config key (it would be "
                                    "ignored); did you mean train.learning_rate?"),
    (["+reference.fractoin=0.5"], "did you mean reference.fraction?"),
    (["+seeed=1"], "seeed is not a config key (it would be ignored); did you mean seed?"),
    (["+data.mix.gsm8k.max_row=3"], "did you mean data.mix.gsm8k.max_rows?"),
    (["+eval.generation.sets.vicuna.max_row=3"], "did you mean "
                                                 "eval.generation.sets.vicuna.max_rows?"),
    (["+eval.judge.tie_margn=0.1"], "did you mean eval.judge.tie_margin?"),
    (["judge=openai_compatible", "+eval.judge.retry=5"], "did you mean eval.judge.retries?"),
    (["logger=wandb", "+logger.projct=x"], "did you mean logger.project?"),
    (["+selection.ratoi=0.5"], "did you mean selection.ratio?"),
    (["+score.shard_row=4"], "did you mean score.shard_rows?"),
    (["+model.hubid=x"], "did you mean model.hub_id?"),
    (["selection.keep_sources=[gsm8kk]"], "selection.keep_sources names 'gsm8kk', which is no "
                                          "source of the pool; did you mean gsm8k? the sources "
                                          "are ['alpaca', 'gsm8k']"),
]


@pytest.mark.parametrize(("overrides", "message"), UNKNOWN, ids=[o[-1] for o, _ in UNKNOWN])
def test_unknown_keys_are_refused_with_a_did_you_mean(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*TINY, *overrides))
    assert message in str(err.value)
    assert "\n" not in str(err.value)  # one line


def test_a_misspelt_key_in_an_experiment_file_stops_the_run_before_any_artifact(make_cfg,
                                                                               tmp_path):
    # An experiment file in a search-path folder, as a user's own conf/ would add it.
    experiments = tmp_path / "user_conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "typo.yaml").write_text("# @package _global_\n"
                                           "train:\n  learnig_rate: 1.0e-3\n")
    message = _refused_fast(make_cfg, tmp_path,
                            f"hydra.searchpath=[file://{tmp_path / 'user_conf'}]",
                            "experiment=typo")
    assert message == ("train.learnig_rate is not a config key (it would be ignored); did you "
                       "mean train.learning_rate?")


def test_free_form_mappings_take_any_key(make_cfg):
    # model.arch and train.fsdp_config are passed on to transformers and accelerate as they are
    validate(make_cfg(*TINY, "+model.arch.rope_theta=10000.0",
                      "+train.fsdp_config.fsdp_version=2"))


# ---------------------------------------------------------------------------------------------
# The selection against the pool: before the reference and scoring, with counts

@pytest.mark.parametrize(("overrides", "message"), [
    (["selection.by_source=true"],
     "selection.count=10 with selection.by_source=true is larger than source gsm8k (8 rows of 32 "
     "read from data=alpaca_gsm8k_cpu); choose a count in [1, 8] or set selection.ratio"),
    (["selection.count=30", "selection.keep_sources=[gsm8k]"],
     "selection.count=30 is larger than the pool (24 rows ranked of 32 read from "
     "data=alpaca_gsm8k_cpu, keep_sources ['gsm8k'] not ranked); choose a count in [1, 24]"),
], ids=["by_source", "keep_sources"])
def test_a_count_larger_than_a_ranked_group_fails_before_the_reference(make_cfg, tmp_path,
                                                                       overrides, message):
    assert message in _refused_fast(make_cfg, tmp_path, "selection=count", "selection.ratio=null",
                                    "selection.count=10", *overrides)


def _listed_file(tmp_path: Path) -> Path:
    """Three rows of the shipped pool, two edited rows that match no pool row, one bad row."""
    pool = json.loads(Path(CONF.parent / "lobass/resources/data/alpaca/alpaca_pool_1k.json")
                      .read_text())
    edited = [{**row, "output": row["output"] + " (edited)"} for row in pool[3:5]]
    path = tmp_path / "peer_selection.json"
    path.write_text(json.dumps([*pool[:3], *edited, {"instruction": "no output"}]))
    return path


def test_listed_rows_that_match_no_pool_row_are_counted_and_logged(make_cfg, tmp_path, caplog):
    listed = _listed_file(tmp_path)
    cfg = make_cfg(*TINY, f"selection.listed={listed}", "selection.keep_sources=[gsm8k]")
    examples, _ = read_pool(cfg.data)
    with caplog.at_level(logging.INFO, logger="lobass.config"):
        metrics = validate_pool(cfg, examples)
    assert metrics == {"selection/kept_rows/gsm8k": 8.0, "selection/listed/rows": 5.0,
                       "selection/listed/matched": 3.0, "selection/listed/unmatched": 2.0,
                       "selection/listed/skipped": 1.0}
    warning = [r for r in caplog.records
               if r.levelno == logging.WARNING and r.name == "lobass.config"]
    assert len(warning) == 1 and "3 in the pool, 2 match no pool row (not selected), 1 bad rows "\
                                 "skipped" in warning[0].getMessage()
    # the same ids the select stage will match (it reads the file the same way)
    rows, _ = read_examples(listed, "alpaca", on_bad_row="skip")
    assert len({e.id for e in rows} & {e.id for e in examples}) == 3


def test_a_listed_file_matching_no_pool_row_fails_before_the_reference(make_cfg, tmp_path):
    listed = tmp_path / "other_pool.json"
    listed.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    message = _refused_fast(make_cfg, tmp_path, f"selection.listed={listed}")
    assert message.startswith(f"selection.listed={listed}: none of its 1 rows (0 more skipped "
                              "as bad) is a pool row")


# ---------------------------------------------------------------------------------------------
# Secret shapes, credentials in URLs, the judge's key variable

HEX40 = "0123456789abcdef0123456789abcdef01234567"
SHAPES = [  # (override, the secret it carries, why it is refused)
    ("eval.judge.base_url=https://alice:s3cr3tpw@judge.example.com/v1", "s3cr3tpw",
     "a URL holds credentials (user:password@ before its host)"),
    ("eval.judge.base_url=https://tok3n@judge.example.com/v1", "tok3n",
     "a URL holds credentials"),
    ("eval.judge.base_url='https://judge.example.com/v1?api_key=abc123'", "abc123",
     "a URL's query holds a credential parameter (api_key=...)"),
    ("eval.judge.model=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "bPxRfiCYEXAMPLEKEY",
     "the shape of an AWS secret key"),
    ("eval.judge.model=AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", "SyDaGmWKa4JsXZ",
     "API-key prefix"),
    ("tags=['https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/abcdefghijklmnopqrstuvwx']",
     "abcdefghijklmnopqrstuvwx", "detect-secrets' Slack Token pattern"),
    ("data.name=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIwIn0.oYDGVCn6P9sJIEtONmeVeAyi7Gj-X32dDfc7VmEEKAk",
     "oYDGVCn6P9sJIEtONmeVeAyi7Gj", "detect-secrets' JSON Web Token pattern"),
    (f"tags=[wandb-{HEX40}]", HEX40, "it contains 40 hex digits (the shape of a W&B key)"),
]


@pytest.mark.parametrize(("override", "secret", "reason"), SHAPES,
                         ids=["basic_auth", "url_user", "url_query", "aws_secret", "google",
                              "slack_webhook", "jwt", "wandb_inside"])
def test_more_secret_shapes_are_refused_without_echo(make_cfg, tmp_path, override, secret,
                                                     reason):
    message = _refused_fast(make_cfg, tmp_path, "judge=openai_compatible", override)
    assert "looks like a secret" in message and reason in message
    assert secret not in message
    for path in (tmp_path / "run").rglob("*"):  # config.yaml is not written either
        assert secret.encode() not in path.read_bytes(), path


def test_paths_commits_and_local_urls_are_not_taken_for_secrets():
    snapshot = ("/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/"
                f"snapshots/{HEX40}")
    for key, value in [("model.hub_id", snapshot), ("model.revision", HEX40),
                       ("eval.judge.base_url", "http://127.0.0.1:8000/v1"),
                       ("eval.judge.base_url", "https://api.openai.com/v1?model=gpt-4o"),
                       ("data.path", "/data/Alpaca52k/Train/alpacaData2023.json"),
                       ("eval.judge.baseline", "multirun/2026-12-05/12-00-00/3")]:
        assert find_secret(key, value) is None, (key, value)


def test_the_judge_key_variable_must_name_a_key(make_cfg):
    def judge(*overrides):
        return make_cfg(*TINY, "judge=openai_compatible", *overrides)

    with pytest.raises(ConfigError) as err:
        validate(judge("eval.judge.api_key_env=HOME"))
    assert str(err.value) == (
        "eval.judge.api_key_env=HOME: its value would be sent as a bearer token, so it must name "
        "a key's variable (ending in _KEY, _TOKEN, _SECRET); rename it, or set "
        "eval.judge.allow_any_env=true if HOME really holds the key")
    with pytest.raises(ConfigError, match=r"is not an environment variable name"):
        validate(judge("eval.judge.api_key_env='MY KEY'"))
    for name in ("OPENAI_API_KEY", "HF_TOKEN", "VLLM_SECRET", "null"):
        validate(judge(f"eval.judge.api_key_env={name}"))
    validate(judge("eval.judge.api_key_env=JUDGE_CREDENTIAL", "eval.judge.allow_any_env=true"))


def test_the_preflight_sends_no_other_variable_and_warns_on_plain_http(monkeypatch, caplog):
    from http.server import BaseHTTPRequestHandler

    from lobass.evaluation.judge import preflight_judge

    sent = []

    class Models(BaseHTTPRequestHandler):  # a real OpenAI-style server on 127.0.0.1
        def do_GET(self):  # noqa: N802  (http.server's naming)
            sent.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    def check(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = with_defaults(compose(config_name="config", overrides=[
                "judge=openai_compatible", "eval.judge.baseline=full_data", *overrides]))
        preflight_judge(cfg.eval, ["eval"])

    monkeypatch.setenv("LOBASS_HOME_DIR", "private-value")
    with local_http_server(Models) as url:
        with pytest.raises(ConfigError, match="eval.judge.api_key_env=LOBASS_HOME_DIR: its "
                                              "value would be sent as a bearer token"):
            check(f"eval.judge.base_url={url}/v1", "eval.judge.api_key_env=LOBASS_HOME_DIR")
        assert sent == []  # the variable's value never left the process
        check(f"eval.judge.base_url={url}/v1", "eval.judge.api_key_env=LOBASS_HOME_DIR",
              "eval.judge.allow_any_env=true")
        assert sent == ["Bearer private-value"]  # the user said so
    monkeypatch.setenv("LOBASS_TEST_KEY", "test-key")
    with caplog.at_level(logging.WARNING, logger="lobass.evaluation.suite"):
        check("eval.judge.base_url=http://judge.example.com/v1", "eval.judge.probe_timeout_s=null",
              "eval.judge.api_key_env=LOBASS_TEST_KEY")
        assert [r.getMessage() for r in caplog.records] == [
            "eval.judge.base_url=http://judge.example.com/v1 is plain http:// to "
            "judge.example.com, not this machine: the key in $LOBASS_TEST_KEY, the prompts and "
            "the answers cross the network unencrypted; use https://"]
        caplog.clear()
        check("eval.judge.base_url=http://localhost:8000/v1", "eval.judge.probe_timeout_s=null",
              "eval.judge.api_key_env=LOBASS_TEST_KEY")
        check("eval.judge.base_url=https://judge.example.com/v1", "eval.judge.probe_timeout_s=null",
              "eval.judge.api_key_env=LOBASS_TEST_KEY")
        assert caplog.records == []
    assert [plain_http_host(u) for u in ("http://[::1]:8000/v1", "http://127.0.0.2/v1",
                                         "http://10.0.0.5:8000/v1", "HTTP://Judge.lan/v1")] == [
        None, None, "10.0.0.5", "judge.lan"]
