"""Prompt formatting, tokenisation and response-only label masking.

The prompt is everything the model conditions on (chat template applied to all turns but the last,
with the generation prompt); the response is the last assistant turn through its end-of-turn token.
Prompt and response are tokenised separately, so the boundary is exactly where generation would
start, and prompt labels are ``-100`` so that every loss in lobass is over response tokens only.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

from lobass.data import ALPACA_TEMPLATE, Example, Message

IGNORE_INDEX = -100  # the label value that torch's cross_entropy and transformers ignore


@dataclass(frozen=True)
class Features:
    """One tokenised example: ``input_ids`` and ``labels`` of equal length."""

    input_ids: list[int]
    labels: list[int]
    n_prompt: int
    truncated: bool

    @property
    def n_response(self) -> int:
        """Number of response tokens that carry a label."""
        return len(self.input_ids) - self.n_prompt


def _alpaca_prompt(messages: tuple[Message, ...], eos: str) -> str:
    """Alpaca template for base models; earlier turns (multi-turn rows) are replayed in it."""
    parts: list[str] = []
    for message in messages:
        if message["role"] == "user":
            parts.append(ALPACA_TEMPLATE.format(user=message["content"]))
        elif message["role"] == "assistant":
            parts.append(message["content"] + eos + "\n\n")
        else:  # a system message leads the prompt
            parts.append(message["content"] + "\n\n")
    return "".join(parts)


def format_prompt(messages: tuple[Message, ...], tokenizer: Any, template: str) -> str:
    """The text of the prompt for ``messages`` (all turns but the last assistant one).

    Args:
        messages: conversation; the last message is the response and is left out.
        tokenizer: a transformers tokenizer (its chat template is used when ``template='chat'``).
        template: ``chat`` (the tokenizer's own chat template) or ``alpaca``.

    """
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    if template == "chat":
        if not tokenizer.chat_template:
            raise ValueError("model.template=chat but the tokenizer has no chat template; "
                             "set model.template=alpaca")
        text: str = tokenizer.apply_chat_template(
            list(history), add_generation_prompt=True, tokenize=False
        )
        return text
    if template == "alpaca":
        return _alpaca_prompt(history, tokenizer.eos_token or "")
    raise ValueError(f"unknown model.template {template!r}; choose 'chat' or 'alpaca'")


def _response_text(messages: tuple[Message, ...], tokenizer: Any, template: str,
                   prompt: str) -> str:
    """The response through its end-of-turn token, as the template writes it."""
    content = messages[-1]["content"]
    eos = tokenizer.eos_token or ""
    if template != "chat":
        return content + eos
    full: str = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full "
                         "conversation; lobass cannot find the response boundary (use alpaca)")
    tail = full[len(prompt):]
    end = tail.rfind(eos) if eos else -1
    # Keep the end-of-turn token (the model must learn to stop) but not what follows it.
    return tail[: end + len(eos)] if end >= 0 else tail + eos


def prompt_token_ids(prompt: str, tokenizer: Any) -> list[int]:
    """Tokenise a prompt, adding BOS when the tokenizer wants one and the text lacks it.

    Chat templates that need BOS write it themselves; base models (Gemma, LLaMA) need it added.
    """
    ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if wants_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def wants_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts a sequence with BOS when asked to add special tokens.

    Asked of the tokenizer itself rather than read from an ``add_bos_token`` attribute, which
    not every tokenizer class exposes (transformers' Gemma tokenizer adds BOS without it).
    """
    if tokenizer.bos_token_id is None:
        return False
    probe: list[int] = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


# Tokenizers are asked once for their longest token (in characters), by object identity.
_LONGEST_TOKEN: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry (an upper bound per token).

    Byte-level vocabularies spell each byte as one character and SentencePiece ones a space as
    one, so no token covers more characters of text than its vocabulary entry has.
    """
    try:
        return _LONGEST_TOKEN[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    with contextlib.suppress(TypeError):  # a tokenizer without weak references: not cached
        _LONGEST_TOKEN[tokenizer] = longest
    return longest


def _cut_messages(messages: tuple[Message, ...], bound: int) -> tuple[tuple[Message, ...], bool]:
    """Messages with every turn cut to ``bound`` characters, and whether any was cut.

    The response keeps its start and prompt turns their end, as truncation keeps them.
    """
    out: list[Message] = []
    cut = False
    for i, message in enumerate(messages):
        content = message["content"]
        if len(content) > bound:
            last = i == len(messages) - 1 and message["role"] == "assistant"
            content = content[:bound] if last else content[-bound:]
            cut = True
        out.append({**message, "content": content})
    return tuple(out), cut


def tokenize_example(
    example: Example, tokenizer: Any, template: str, max_length: int
) -> Features:
    """Tokenise one example with response-only labels, truncated to ``max_length`` tokens.

    Over-long rows keep their prompt and lose the end of the response; when the prompt alone
    leaves no room, its beginning is cut so that at least a quarter of ``max_length`` (or the
    whole response, if shorter) stays scoreable.

    Memory is bounded by ``max_length``, not by the row: a turn longer than ``2 x max_length x``
    the longest token's characters (far more text than ``max_length`` tokens can cover) is cut to
    that many characters before tokenising (tokenisers take ~150 bytes of memory per character).
    The cut text still yields more than ``max_length`` tokens (checked; the bound grows
    otherwise), so the kept tokens are those of the whole text; shorter rows are not cut at all.
    """
    messages = example.messages
    if max(len(m["content"]) for m in messages) <= 2 * max_length:
        return _tokenize(messages, tokenizer, template, max_length)[0]
    bound = 2 * max_length * longest_token_chars(tokenizer)
    while True:
        cut_messages, cut = _cut_messages(messages, bound)
        features, n_prompt, n_response = _tokenize(cut_messages, tokenizer, template, max_length)
        # A cut turn must still give more tokens than max_length, or the cut decided the result.
        prompt_cut = any(len(m["content"]) > bound for m in messages[:-1])
        response_cut = len(messages[-1]["content"]) > bound
        if not cut or ((not prompt_cut or n_prompt > max_length)
                       and (not response_cut or n_response > max_length)):
            return features
        bound *= 4


def _tokenize(messages: tuple[Message, ...], tokenizer: Any, template: str,
              max_length: int) -> tuple[Features, int, int]:
    """Features for ``messages``, and the prompt and response token counts before truncation."""
    prompt = format_prompt(messages, tokenizer, template)
    prompt_ids = prompt_token_ids(prompt, tokenizer)
    response_ids: list[int] = tokenizer(
        _response_text(messages, tokenizer, template, prompt), add_special_tokens=False
    )["input_ids"]
    n_prompt, n_response = len(prompt_ids), len(response_ids)
    truncated = n_prompt + n_response > max_length
    if truncated:
        keep_response = max(max_length - len(prompt_ids), min(len(response_ids), max_length // 4))
        response_ids = response_ids[:keep_response]
        room = max_length - len(response_ids)
        if len(prompt_ids) > room:  # cut the prompt's start, but keep a leading BOS first
            head = prompt_ids[:1] if prompt_ids[0] == tokenizer.bos_token_id else []
            prompt_ids = head + prompt_ids[len(prompt_ids) - (room - len(head)):]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return Features(input_ids, labels, len(prompt_ids), truncated), n_prompt, n_response


def response_only(features: Features, start_token_id: int) -> Features:
    """The same response tokens with the prompt replaced by one start token: the input of ``L(y)``.

    IFD (Cherry LLM) divides ``L(y|x)`` by the loss of the response alone. Reusing the already
    tokenised (and possibly truncated) response keeps exactly the same target tokens in both
    losses, so the ratio compares like with like; the start token (BOS, or EOS for tokenizers
    without one) gives the first response token something to be predicted from.
    """
    response = features.input_ids[features.n_prompt:]
    return Features([start_token_id, *response], [IGNORE_INDEX, *response], 1, features.truncated)
