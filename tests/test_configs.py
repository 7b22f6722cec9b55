"""Every shipped config option and experiment composes, resolves and validates; every group's bad
values fail in seconds, before any model or artifact, naming the key and the valid values."""

import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, TINY, local_http_server
from lobass.config import ConfigError, validate
from lobass.pipeline import run
from lobass.schema import find_secret

GROUPS = ["model", "data", "scorer", "selection", "score", "reference", "train", "eval", "judge",
          "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
POOL = "data.path=${pkg_data:alpaca/alpaca_pool_1k.json}"  # for data options whose path is ???


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))  # as composed: unfilled


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    cfg = _compose(f"{group}={option}", POOL)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)
    assert (cfg.eval.judge if group == "judge" else cfg[group]) is not None


# Composed configs whose eval key the filled defaults move, and why (issue 32's note): the
# GSM8K solutions set of study 1 wrote no `questions`, now filled null and kept in the key.
EVAL_KEY_MOVES = {"experiment=cpu_gemma_learnability"}


def _subset(small, big) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k])
                                             for k, v in small.items())
    return small == big or small == "auto"  # auto: resolved for this machine (devices.py)


@pytest.mark.parametrize("overrides", [[f"{g}={o}", POOL] for g, o in OPTIONS]
                         + [[f"experiment={e}"] for e in EXPERIMENTS] + [TINY])
def test_validate_fills_every_default_and_moves_no_fine_tune_key(overrides):
    from lobass.evaluation.stage import eval_recipe
    from lobass.finetune import weights_recipe
    from lobass.schema.rules import defaults_patch

    composed = _compose(*overrides)
    filled = validate(_compose(*overrides))
    before = OmegaConf.to_container(composed, resolve=True)
    after = OmegaConf.to_container(filled, resolve=True)
    assert _subset(before, after)  # every value given is kept as given, auto resolved
    assert filled.model.dtype != "auto" and isinstance(filled.score.shard_rows, int)
    assert defaults_patch(before) and defaults_patch(after) == {}  # nothing left to fill
    if composed.train.get("enabled", True):
        assert filled.train.fsdp is False or overrides == ["train=lora_gpu_fsdp", POOL]
    for group in ("train", "reference"):
        assert weights_recipe(filled[group]) == weights_recipe(composed[group]), group
    moved = eval_recipe(filled.eval, None) != eval_recipe(composed.eval, None)
    assert moved == (" ".join(overrides) in EVAL_KEY_MOVES)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "judge").glob("*.yaml")))
def test_every_judge_validates_when_it_judges(option, tmp_path):
    # With a baseline, the judge's prompt file and baseline path are checked too.
    baseline = tmp_path / "vicuna.jsonl"
    baseline.write_text("")
    validate(_compose(f"judge={option}", f"eval.judge.baseline={baseline}"))
    validate(_compose(f"judge={option}", "eval.judge.baseline=full_data"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_validates_and_names_itself(experiment):
    cfg = _compose(f"experiment={experiment}", POOL)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict) and resolved["model"]["name"]
    validate(cfg)
    header = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_" and header[1].startswith("# run: python run.py")
    usage = [line for line in header if "experiment=" in line and line.startswith("#")]
    assert usage and all(f"experiment={experiment} " in line or line.endswith(
        f"experiment={experiment}") for line in usage if "run.py" in line), usage


def test_required_groups_exist():
    for group in [*GROUPS, "experiment"]:
        assert (CONF / group).is_dir(), group
    for model in ("smollm2_135m", "gemma3_270m", "llama_7b", "llama_13b", "tiny_random"):
        assert (CONF / "model" / f"{model}.yaml").is_file()


def test_shipped_data_paths_exist():
    cfg = _compose()
    for path in (cfg.data.path, cfg.data.mix.gsm8k.path, cfg.eval.heldout.path):
        assert Path(path).is_file(), path


# ---------------------------------------------------------------------------------------------
# Configs as deltas

# The reference recipes as they were composed before the reference group derived from train/
# (python run.py reference=NAME --cfg job --package reference, on the parent commit).
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
FIT = {"fit": "in_sample", "folds": 2}  # since issue 28; resolved into rows, in no fine-tune key
REFERENCE_CPU = {
    **FIT, "fraction": 1.0, "seed": 0, "epochs": 1, "max_steps": -1, "batch_size": 8,
    "grad_accum": 1,
    "micro_batch_size": 2,  # passes of 2 rows on the CPU since issue 14
    "learning_rate": 2.0e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "gradient_checkpointing": False, "logging_steps": 5, "save_steps": 10,
    "compile": False,  # an option since issue 14; off, it leaves the artifact keys as they were
    "share_prefix": True,  # since issue 14; in the key only where applied (no LoRA dropout)
    "lora": {**LORA, "dropout": 0.0}}  # lora_cpu without LoRA dropout since issue 14
REFERENCE_GPU = {
    **FIT, "fraction": 1.0, "seed": 0, "epochs": 3, "max_steps": -1, "batch_size": 8,
    "micro_batch_size": None, "global_batch_size": 128, "grad_accum": 16,
    "learning_rate": 2.0e-4, "lr_scheduler": "cosine",
    "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0,
    "gradient_checkpointing": True, "compile": False, "share_prefix": True,  # not applied here
    "logging_steps": 10, "save_steps": 100,
    "fsdp": False,
    "fsdp_config": {}, "deepspeed": None, "lora": LORA}


@pytest.mark.parametrize("train", ["lora_cpu", "lora_gpu"])
def test_reference_recipes_derive_from_train_and_compose_as_before(train):
    def reference(option):
        return OmegaConf.to_container(_compose(f"reference={option}", f"train={train}").reference)

    assert reference("lora_cpu") == REFERENCE_CPU  # whichever train option is chosen
    assert reference("lora_gpu") == REFERENCE_GPU
    for sharded in ("lora_gpu_fsdp", "lora_gpu_deepspeed"):
        trained = OmegaConf.to_container(_compose(f"train={sharded}").train)
        assert reference(sharded) == {**trained, **FIT, "fraction": 1.0, "seed": 0}
        assert reference(sharded)["fsdp"] or reference(sharded)["deepspeed"]
    for path in sorted((CONF / "reference").glob("*.yaml")):
        defaults = yaml.safe_load(path.read_text())["defaults"]
        assert defaults == [f"/train/{path.stem}@_here_", "_self_"], path.name


@pytest.mark.parametrize("experiment", ["cpu_alpaca_mix", "cpu_gemma_learnability"])
def test_committed_cpu_studies_keep_the_lora_dropout_they_ran_with(experiment):
    """lora_cpu's dropout (0.05 -> 0) and micro-batches (whole -> 2 rows) changed after these
    studies ran: they pin what they ran with, so their configs and artifact keys stay the same."""
    cfg = _compose(f"experiment={experiment}")
    assert cfg.train.lora.dropout == cfg.reference.lora.dropout == 0.05
    assert cfg.train.micro_batch_size is None and cfg.reference.micro_batch_size is None
    assert _compose().train.lora.dropout == 0.0 and _compose().train.micro_batch_size == 2


def test_13b_experiment_is_the_7b_one_with_another_model():
    seven = OmegaConf.to_container(_compose("experiment=paper_alpaca_llama7b", POOL), resolve=True)
    thirteen = OmegaConf.to_container(_compose("experiment=paper_alpaca_llama13b", POOL),
                                      resolve=True)
    assert thirteen["model"]["name"] == "llama_13b" and seven["model"]["name"] == "llama_7b"
    assert {k: v for k, v in seven.items() if k != "model"} == \
        {k: v for k, v in thirteen.items() if k != "model"}
    defaults = yaml.safe_load((CONF / "experiment" / "paper_alpaca_llama13b.yaml").read_text())
    assert defaults == {"defaults": ["paper_alpaca_llama7b", {"override /model": "llama_13b"}]}


# ---------------------------------------------------------------------------------------------
# Bad values fail fast: run(cfg) on the tiny model raises before any artifact or model exists.

TEN_HEX = "0123456789abcdef0123456789abcdef01234567"  # 40 hex digits, the shape of a W&B key
BAD = [  # (overrides, message); one or more per group
    (["stages=[score,finetune]"], "unknown stage(s) ['finetune'] in stages=; choose from"),
    (["seed=abc"], "seed must be an integer, got 'abc'"),
    (["memory_check=maybe"], "memory_check='maybe' is not supported; choose one of ['error', "
                             "'off', 'warn']"),
    (["model.name=../../escaped"], "model.name='../../escaped' must be a plain name"),
    (["model.device=gpu"], "model.device='gpu' is not supported; choose one of ['auto', 'cpu', "
                           "'cuda']"),
    (["model.template=llama"], "model.template='llama' is not supported; choose one of "
                               "['alpaca', 'chat']"),
    (["model.attn_implementation=fast"], "model.attn_implementation='fast' is not supported"),
    (["data.source=../pool"], "data.source='../pool' must be a plain name"),
    (["data.mix.gsm8k.reader=csv"], "data.mix.gsm8k.reader='csv' is not supported; choose one of "
                                    "['alpaca', 'dolly', 'gsm8k', 'jsonl']"),
    (["scorer.name=perplexity"], "scorer.name='perplexity' is not supported; choose one of"),
    (["selection.ratio=true"], "selection.ratio must be a number in (0, 1], got True"),
    (["selection.count=3"], "use selection=count selection.count=3"),
    (["selection.ratio=0.0"], "selection.ratio must be in (0, 1], got 0.0"),
    (["selection.ratio=1.5"], "selection.ratio must be in (0, 1], got 1.5"),
    (["selection.ratio=-0.1"], "selection.ratio must be in (0, 1], got -0.1"),
    (["selection.ratio=null"], "set exactly one of selection.ratio and selection.count"),
    (["selection.band=[0.3,0.2]"], "selection.band must be [lo, hi] score quantiles with 0 <= lo "
                                   "< hi <= 1, got [0.3, 0.2]"),
    (["selection.budget=tokens"], "selection.budget=tokens needs exactly one of selection.tokens "
                                  "and selection.match_tokens"),
    (["score.max_tokens_per_batch=0"], "score.max_tokens_per_batch must be an integer >= 1, "
                                       "got 0"),
    (["score.max_tokens_per_batch=-5"], "score.max_tokens_per_batch must be an integer >= 1"),
    (["score.extra_scorers=[rho,ppl]"], "unknown value(s) ['ppl'] in score.extra_scorers=; "
                                        "choose from"),
    (["reference.lora.r=0"], "reference.lora.r must be an integer >= 1, got 0"),
    (["reference.micro_batch_size=0"], "reference.micro_batch_size must be an integer >= 1"),
    (["reference.epochs=0", "reference.max_steps=-1"],
     "reference.epochs=0 with reference.max_steps=-1 trains nothing"),
    (["train.lora.r=0"], "train.lora.r must be an integer >= 1, got 0"),
    (["train.batch_size=0"], "train.batch_size must be an integer >= 1, got 0"),
    (["train.learning_rate=-1"], "train.learning_rate must be > 0, got -1"),
    (["train.epochs=0", "train.max_steps=-1"], "train.epochs=0 with train.max_steps=-1 trains "
                                               "nothing; set train.epochs > 0 or"),
    (["train.lr_scheduler=cosine_annealing"], "train.lr_scheduler='cosine_annealing' is not "
                                              "supported; choose one of"),
    (["train.lora.dropout=1"], "train.lora.dropout must be in [0, 1), got 1"),
    (["eval.backend=vlm"], "eval.backend='vlm' is not supported; choose one of ['hf', 'vllm']"),
    (["eval.backend=hff"], "eval.backend='hff' is not supported; choose one of ['hf', 'vllm']"),
    (["eval.gsm8k.batch_size=0"], "eval.gsm8k.batch_size must be an integer >= 1 or auto"),
    (["eval.ifeval.batch_size=big"], "eval.ifeval.batch_size must be an integer >= 1 or auto"),
    (["eval.heldout.path=/nonexistent/heldout.json"],
     "eval.heldout.path=/nonexistent/heldout.json: no such file"),
    (["eval.generation.sets.vicuna.reader=csv"], "eval.generation.sets.vicuna.reader='csv' is "
                                                 "not supported; choose one of ['alpaca', "
                                                 "'dolly', 'fastchat', 'gsm8k', 'jsonl']"),
    (["eval.judge.name=gpt"], "eval.judge.name='gpt' is not supported; choose one of "
                              "['local_hf', 'openai_compatible']"),
    (["eval.judge.baseline=/nonexistent/run"], "eval.judge.baseline=/nonexistent/run: no such "
                                               "file or directory"),
    (["eval.judge.baseline=full_data", "eval.judge.prompt=pairwise_v9.txt"],
     "pairwise_v9.txt: no such file; shipped prompts: ['pairwise_v1.txt', "
     "'pairwise_v2.txt']"),
    (["judge=openai_compatible", "eval.judge.retries=0"],
     "eval.judge.retries must be an integer >= 1, got 0"),
    (["logger=wandb", "logger.mode=cloud"], "logger.mode='cloud' is not supported; choose one "
                                            "of ['disabled', 'offline', 'online']"),
    (["logger.kind=tensorboard"], "logger.kind='tensorboard' is not supported; choose one of "
                                  "['none', 'wandb']"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_in_each_group_fails_in_seconds_before_any_artifact(make_cfg, tmp_path,
                                                                      overrides, message):
    cfg = make_cfg(*TINY, *overrides)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert time.perf_counter() - start < 10  # the reference alone takes minutes
    assert message in str(err.value)
    assert not (tmp_path / "artifacts").exists()  # no stage started, nothing cached
    assert message in (tmp_path / "run" / "error.txt").read_text()


def test_accepted_values_of_new_keys(make_cfg):
    # lm-eval's automatic batch, the device choice (unknown keys: tests/test_config_refusals.py)
    validate(make_cfg(*TINY, "eval.gsm8k.batch_size=auto", "eval.ifeval.batch_size=auto:4",
                      "model.device=cpu"))


# ---------------------------------------------------------------------------------------------
# Secrets: refused wherever they are typed, and never echoed

GITHUB = "ghp_" + "0123456789abcdefABCDEF0123456789abcd"
SECRETS = [  # (override, the secret it carries)
    ("judge=openai_compatible eval.judge.api_key_env=sk-proj-Abc123Def456Ghi789",
     "sk-proj-Abc123Def456Ghi789"),
    ("+eval.judge.api_key=not-a-key-shape-at-all", "not-a-key-shape-at-all"),
    ("data.name=hf_AbCdEfGhIjKlMnOpQrStUvWx", "hf_AbCdEfGhIjKlMnOpQrStUvWx"),
    (f"eval.judge.model={GITHUB}", GITHUB),
    ("tags=[sweep1,xoxb-1234-5678-abcdefgh]", "xoxb-1234-5678-abcdefgh"),
    ("model.hub_id=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("eval.judge.prompt=Zq8sLx2Pw9Rt4Vb7Nm3Kd6Hj1Fg5Ys0Q", "Zq8sLx2Pw9Rt4Vb7Nm3Kd6Hj1Fg5Ys0Q"),
    (f"data.source={TEN_HEX}", TEN_HEX),
]


@pytest.mark.parametrize(("override", "secret"), SECRETS, ids=[s[:4] for _, s in SECRETS])
def test_secret_like_values_are_refused_without_echo(make_cfg, tmp_path, override, secret):
    cfg = make_cfg(*TINY, *override.split())
    with pytest.raises(ConfigError, match="looks like a secret") as err:
        run(cfg)
    assert secret not in str(err.value) and "environment variables only" in str(err.value)
    assert secret not in (tmp_path / "run" / "error.txt").read_text()
    assert not (tmp_path / "artifacts").exists()


def test_ordinary_values_are_not_taken_for_secrets():
    cfg = OmegaConf.to_container(_compose("experiment=paper_alpaca_llama7b", POOL), resolve=True)
    assert cfg["model"]["revision"] and find_secret("model.revision", cfg["model"]["revision"]) \
        is None  # a pinned 40-hex commit
    for key, value in [("eval.judge.baseline", f"artifacts/eval/{TEN_HEX}{TEN_HEX[:24]}"),
                       ("model.hub_id", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                       ("data.name", "paper_alpaca_llama7b_lobass_ratio0.06_seed0"),
                       ("model.gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                       ("data.path", "/data/task-sk-ready/alpaca_data.json"),
                       ("eval.judge.api_key_env", "OPENAI_API_KEY")]:
        assert find_secret(key, value) is None, (key, value)


def test_a_refused_secret_reaches_no_file_of_the_run(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, "judge=openai_compatible",
                   "eval.judge.api_key_env=sk-proj-Abc123Def456Ghi789")
    with pytest.raises(ConfigError):
        run(cfg)
    for path in (tmp_path / "run").rglob("*"):
        assert b"sk-proj-Abc123Def456Ghi789" not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------
# Objects chosen by config are built from their _target_; the judge is checked before stage 1

def test_judges_and_loggers_are_built_from_their_target(tiny, tmp_path):
    from lobass.evaluation.judge import make_judge
    from lobass.evaluation.judges import LocalHFJudge, OpenAICompatibleJudge
    from lobass.tracking import NullLogger, WandbLogger, make_logger

    cfg = _compose("judge=openai_compatible", "eval.judge.model=judge-7b", "eval.judge.retries=5")
    judge = make_judge(cfg.eval.judge, load_local=None, template="chat")  # type: ignore[arg-type]
    assert judge == OpenAICompatibleJudge(
        base_url="https://api.openai.com/v1", model="judge-7b", api_key_env="OPENAI_API_KEY",
        max_tokens=512, temperature=0.0, timeout_s=120, retries=5, max_workers=4,
        probe_timeout_s=10)
    asked = []

    def load_local(name):
        asked.append(name)
        return tiny

    cfg = _compose("judge=local_hf", "eval.judge.max_length=512")
    local = make_judge(cfg.eval.judge, load_local, template="alpaca")
    assert isinstance(local, LocalHFJudge) and asked == [None]
    assert (local.model, local.tokenizer) == tiny
    assert (local.template, local.max_length, local.name) == ("alpaca", 512, "local_hf")

    cfg = _compose("logger=none")
    assert isinstance(make_logger(cfg.logger, {"seed": 0}, tmp_path), NullLogger)
    cfg = _compose("logger=wandb", "logger.project=lobass-test", "tags=[a,b]")
    logger = make_logger(cfg.logger, {"seed": 7}, tmp_path)
    try:
        assert isinstance(logger, WandbLogger)
        assert (logger.run.project, list(logger.run.tags), logger.run.config["seed"]) == (
            "lobass-test", ["a", "b"], 7)
        assert list((tmp_path / "wandb").glob("offline-run-*"))  # offline: files under run_dir
    finally:
        logger.finish()


@pytest.fixture
def models_endpoint():
    """A real OpenAI-style server on 127.0.0.1 answering ``GET /v1/models`` with ``status``."""
    import json
    from http.server import BaseHTTPRequestHandler

    state = {"requests": [], "status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's naming)
            state["requests"].append((self.path, self.headers.get("Authorization")))
            if state["status"] != 200:
                self.send_error(state["status"])
                return
            payload = json.dumps({"object": "list", "data": [{"id": "judge"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    with local_http_server(Handler) as url:
        state["base_url"] = f"{url}/v1"
        yield state


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_judge_key_and_server_are_checked_before_the_first_stage(models_endpoint, monkeypatch):
    from lobass.evaluation.judge import preflight_judge

    def check(*overrides, stages=("eval",)):
        cfg = _compose("judge=openai_compatible", "eval.judge.baseline=full_data",
                       f"eval.judge.base_url={models_endpoint['base_url']}",
                       "eval.judge.api_key_env=LOBASS_TEST_JUDGE_KEY", *overrides)
        preflight_judge(cfg.eval, list(stages))

    monkeypatch.delenv("LOBASS_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(RuntimeError, match="LOBASS_TEST_JUDGE_KEY: that environment variable is "
                                           "not set"):
        check()
    monkeypatch.setenv("LOBASS_TEST_JUDGE_KEY", "")  # set but empty is no key either
    with pytest.raises(RuntimeError, match="that environment variable is not set"):
        check()
    check(stages=("reference", "score"))  # no eval stage: no judge, nothing to check
    check("eval.judge.baseline=null")  # no baseline: nothing is judged
    assert models_endpoint["requests"] == []

    monkeypatch.setenv("LOBASS_TEST_JUDGE_KEY", "test-key")
    check()
    assert models_endpoint["requests"] == [("/v1/models", "Bearer test-key")]
    models_endpoint["status"] = 404  # a server without /models still answers
    check()
    models_endpoint["status"] = 401
    with pytest.raises(RuntimeError, match=r"HTTP 401 from .*/v1/models: the server refused the "
                                           r"key in \$LOBASS_TEST_JUDGE_KEY"):
        check()
    check("eval.judge.probe_timeout_s=null")  # probe off: the key alone is checked
    assert len(models_endpoint["requests"]) == 3

    closed = f"http://127.0.0.1:{_free_port()}/v1"
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"no answer from .*/v1/models within 2 s .*start the "
                                           r"server or fix the URL"):
        check(f"eval.judge.base_url={closed}", "eval.judge.probe_timeout_s=2")
    assert time.perf_counter() - start < 5
