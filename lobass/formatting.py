"""Prompt formatting, tokenisation and response-only label masking.

The prompt is everything the model conditions on (chat template applied to all turns but the last,
with the generation prompt); the response is the last assistant turn through its end-of-turn token.
Prompt and response are tokenised separately, so the boundary is exactly where generation would
start, and prompt labels are ``-100`` so that every loss in lobass is over response tokens only.

Text is text: a special-token string inside a row (``<|im_end|>``, ``<eos>``) is tokenised as the
plain characters it is, never as the control token the template writes around turns, unless
``data.allow_special_tokens=true``. Otherwise a response could teach the model to keep talking
after an end-of-turn, and a user turn could forge a whole assistant turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from collections.abc import Iterator
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
    special_text: int = 0  # special-token strings in the row's text (plain text unless allowed)

    @property
    def n_response(self) -> int:
        """Number of response tokens that carry a label."""
        return len(self.input_ids) - self.n_prompt


@dataclass(frozen=True)
class Text:
    """A rendered template and where the row's own text lies in it.

    ``spans`` are the ``[start, end)`` character ranges of message contents; ``None`` means the
    text is tokenised as the tokenizer does by default (special-token strings anywhere become
    control tokens), which is exact for text holding none in its contents.
    """

    text: str
    spans: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def join(cls, parts: list[tuple[str, bool]]) -> Text:
        """``(piece, is_row_text)`` pieces concatenated, with the spans of the row's pieces."""
        spans, pos = [], 0
        for piece, row_text in parts:
            if row_text and piece:
                spans.append((pos, pos + len(piece)))
            pos += len(piece)
        return cls("".join(p for p, _ in parts), tuple(spans))

    def slice(self, start: int, end: int) -> Text:
        """``text[start:end]`` with its spans clipped and shifted."""
        if self.spans is None:
            return Text(self.text[start:end])
        spans = tuple((max(a, start) - start, min(b, end) - start) for a, b in self.spans
                      if a < end and b > start)
        return Text(self.text[start:end], spans)

    def __add__(self, suffix: str) -> Text:
        """The text with template ``suffix`` appended (e.g. a forced start of the answer)."""
        return Text(self.text + suffix, self.spans)

    def template_gaps(self) -> Iterator[tuple[int, int]]:
        """The ``[start, end)`` ranges the template wrote (everything outside the spans)."""
        pos = 0
        for start, end in self.spans or ():
            yield pos, start
            pos = end
        yield pos, len(self.text)


@dataclass(frozen=True)
class _Specials:
    """A tokenizer's special tokens: their ids and a pattern finding them leftmost-longest."""

    ids: dict[str, int]
    lstrip: frozenset[str]
    rstrip: frozenset[str]
    pattern: re.Pattern[str] | None


_SPECIALS: weakref.WeakKeyDictionary[Any, _Specials] = weakref.WeakKeyDictionary()


def _specials(tokenizer: Any) -> _Specials:
    """The added tokens marked special: those that ``split_special_tokens=True`` leaves as text.

    Cached per tokenizer object. The pattern matches leftmost-longest, as the tokenizer does.
    """
    with contextlib.suppress(KeyError, TypeError):
        return _SPECIALS[tokenizer]
    added = {t.content: (i, t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    strings = sorted(added)
    found = _Specials(
        {k: i for k, (i, _) in added.items()},
        frozenset(k for k, (_, t) in added.items() if t.lstrip),
        frozenset(k for k, (_, t) in added.items() if t.rstrip),
        re.compile(_trie_pattern(strings)) if strings else None)
    with contextlib.suppress(TypeError):  # a tokenizer without weak references: not cached
        _SPECIALS[tokenizer] = found
    return found


def _trie_pattern(strings: list[str]) -> str:
    """A regex matching any of ``strings``, longest first, built as a prefix tree.

    Written by hand because a flat alternation of Gemma's 6,249 special tokens is tried one
    alternative at a time at every ``<`` (its cost per row: benchmarks/README.md); the tree tries
    each character once.
    """
    trie: dict[str, Any] = {}
    for string in strings:
        node = trie
        for char in string:
            node = node.setdefault(char, {})
        node[""] = {}  # a string ends here

    def emit(node: dict[str, Any]) -> str:
        branches = [re.escape(c) + emit(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        body = "(?:" + "|".join(branches) + ")" if len(branches) > 1 else branches[0]
        return f"(?:{body})?" if "" in node else body  # a shorter string ends here: longest first

    return emit(trie)


def count_special_text(messages: tuple[Message, ...], tokenizer: Any) -> int:
    """How many special-token strings (``<|im_end|>``, ``<eos>``) the messages' text holds."""
    pattern = _specials(tokenizer).pattern
    if pattern is None:
        return 0
    return sum(len(pattern.findall(m["content"])) for m in messages)


def encode_text(text: Text | str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` without added BOS/EOS; row text never yields a special token.

    The template's own special tokens (found only outside ``text.spans``) are split off exactly
    as the tokenizer splits added tokens before its model sees the text, honouring their
    ``lstrip``/``rstrip`` flags, and every piece between them is encoded with
    ``split_special_tokens=True``. A text without special-token strings in its spans therefore
    gives the ids of the plain ``tokenizer(text)`` call (tests/test_formatting.py checks this on
    the shipped rows), and one with them gives those strings' plain-character tokens.
    """
    if isinstance(text, str) or text.spans is None:
        return list(tokenizer(str(getattr(text, "text", text)),
                              add_special_tokens=False)["input_ids"])
    specials = _specials(tokenizer)
    ids: list[int] = []
    whole, start = text.text, 0  # start: where the pending plain-text piece begins

    def plain(end: int) -> None:
        if end > start:
            ids.extend(tokenizer(whole[start:end], add_special_tokens=False,
                                 split_special_tokens=True)["input_ids"])

    for gap_start, gap_end in text.template_gaps():
        if specials.pattern is None:
            break
        for match in specials.pattern.finditer(whole, gap_start, gap_end):
            token = match.group()
            cut = match.start()
            if token in specials.lstrip:  # the token swallows the whitespace before it
                cut = max(start, start + len(whole[start:cut].rstrip()))
            plain(cut)
            ids.append(specials.ids[token])
            start = match.end()
            if token in specials.rstrip:  # ... or after it
                start += len(whole[start:]) - len(whole[start:].lstrip())
    plain(len(whole))
    return ids


def _alpaca_parts(messages: tuple[Message, ...], eos: str) -> list[tuple[str, bool]]:
    """Alpaca template for base models as ``(piece, is_row_text)``; earlier turns replayed."""
    head, tail = ALPACA_TEMPLATE.split("{user}")
    parts: list[tuple[str, bool]] = []
    for message in messages:
        if message["role"] == "user":
            parts += [(head, False), (message["content"], True), (tail, False)]
        elif message["role"] == "assistant":
            parts += [(message["content"], True), (eos + "\n\n", False)]
        else:  # a system message leads the prompt
            parts += [(message["content"], True), ("\n\n", False)]
    return parts


# Stand-ins for message contents when locating them in a rendered chat template: private-use
# characters, which no template writes, around the message's index.
_MARK = re.compile("\ue000([0-9]+)\ue001")


def _chat_text(messages: tuple[Message, ...], tokenizer: Any, *, generation_prompt: bool,
               spans: bool) -> Text:
    """The chat template's rendering of ``messages`` and, with ``spans``, where each content is.

    The contents are located by rendering the conversation once more with a marker in place of
    each content: the markers split the template's text from the row's. This holds when the
    template writes contents verbatim (or stripped, as Gemma's ``| trim``); otherwise the row's
    special-token strings cannot be told from the template's, and that is an error.
    """
    text: str = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=generation_prompt, tokenize=False)
    if not spans:
        return Text(text)
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    skeleton: str = tokenizer.apply_chat_template(
        marked, add_generation_prompt=generation_prompt, tokenize=False)
    pieces = _MARK.split(skeleton)  # template, index, template, index, ..., template
    for strip in (False, True):
        parts = [(piece, False) if k % 2 == 0 else
                 (messages[int(piece)]["content"].strip() if strip
                  else messages[int(piece)]["content"], True)
                 for k, piece in enumerate(pieces)]
        found = Text.join(parts)
        if found.text == text:
            return found
    raise ValueError("the chat template rewrites message text, so lobass cannot tell a "
                     "special-token string in a row from the template's own; set "
                     "data.allow_special_tokens=true to let such strings act as control tokens, "
                     "or use model.template=alpaca")


def render_prompt(messages: tuple[Message, ...], tokenizer: Any, template: str, *,
                  spans: bool = False) -> Text:
    """The prompt for ``messages`` (all turns but the last assistant one) as a :class:`Text`.

    Args:
        messages: conversation; the last message is the response and is left out.
        tokenizer: a transformers tokenizer (its chat template is used when ``template='chat'``).
        template: ``chat`` (the tokenizer's own chat template) or ``alpaca``.
        spans: locate the messages' text in the prompt, so that :func:`encode_text` keeps its
            special-token strings as text; ``False``: the tokenizer's default tokenisation.

    """
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    if template == "chat":
        if not tokenizer.chat_template:
            raise ValueError("model.template=chat but the tokenizer has no chat template; "
                             "set model.template=alpaca")
        return _chat_text(history, tokenizer, generation_prompt=True, spans=spans)
    if template == "alpaca":
        found = Text.join(_alpaca_parts(history, tokenizer.eos_token or ""))
        return found if spans else Text(found.text)
    raise ValueError(f"unknown model.template {template!r}; choose 'chat' or 'alpaca'")


def format_prompt(messages: tuple[Message, ...], tokenizer: Any, template: str) -> str:
    """The text of the prompt for ``messages``; see :func:`render_prompt`."""
    return render_prompt(messages, tokenizer, template).text


def _response_text(messages: tuple[Message, ...], tokenizer: Any, template: str,
                   prompt: Text) -> Text:
    """The response through its end-of-turn token, as the template writes it."""
    content = messages[-1]["content"]
    eos = tokenizer.eos_token or ""
    with_spans = prompt.spans is not None
    if template != "chat":
        found = Text.join([(content, True), (eos, False)])
        return found if with_spans else Text(found.text)
    full = _chat_text(messages, tokenizer, generation_prompt=False, spans=with_spans)
    if not full.text.startswith(prompt.text):
        raise ValueError("the chat template renders the prompt differently inside the full "
                         "conversation; lobass cannot find the response boundary (use alpaca)")
    tail = full.slice(len(prompt.text), len(full.text))
    # Keep the end-of-turn token (the model must learn to stop) but not what follows it. The
    # template's own: an end-of-turn string inside the response's text is not where it ends.
    end = tail.text.rfind(eos) if eos else -1
    while end >= 0 and any(a <= end < b for a, b in tail.spans or ()):
        end = tail.text.rfind(eos, 0, end)
    if end >= 0:
        return tail.slice(0, end + len(eos))
    return tail + eos


def prompt_token_ids(prompt: Text | str, tokenizer: Any) -> list[int]:
    """Tokenise a prompt, adding BOS when the tokenizer wants one and the text lacks it.

    Chat templates that need BOS write it themselves; base models (Gemma, LLaMA) need it added.
    A :class:`Text` with spans keeps the special-token strings of its row text as text.
    """
    ids = encode_text(prompt, tokenizer)
    bos = tokenizer.bos_token_id
    if wants_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def tokenize_prompt(messages: tuple[Message, ...], tokenizer: Any, template: str, *,
                    allow_special_tokens: bool = False, suffix: str = "") -> list[int]:
    """Token ids of the prompt for ``messages`` (generation, judging), BOS added as needed.

    Args:
        messages: the conversation so far (a last assistant turn is left out).
        tokenizer: a transformers tokenizer.
        template: ``chat`` or ``alpaca``.
        allow_special_tokens: special-token strings in the messages act as control tokens
            (``data.allow_special_tokens``); ``False``: they are tokenised as plain text.
        suffix: template text appended after the prompt (a forced start of the answer).

    """
    spans = not allow_special_tokens and count_special_text(messages, tokenizer) > 0
    return prompt_token_ids(render_prompt(messages, tokenizer, template, spans=spans) + suffix,
                            tokenizer)


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
    example: Example, tokenizer: Any, template: str, max_length: int, *,
    allow_special_tokens: bool = False,
) -> Features:
    """Tokenise one example with response-only labels, truncated to ``max_length`` tokens.

    Special-token strings in the row's text are tokenised as plain text unless
    ``allow_special_tokens`` (``data.allow_special_tokens``); either way ``special_text`` counts
    them. A row without any is tokenised exactly as the tokenizer does by default.

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
    special_text = count_special_text(messages, tokenizer)
    spans = special_text > 0 and not allow_special_tokens
    if max(len(m["content"]) for m in messages) <= 2 * max_length:
        features = _tokenize(messages, tokenizer, template, max_length, spans)[0]
        return dataclasses.replace(features, special_text=special_text)
    bound = 2 * max_length * longest_token_chars(tokenizer)
    while True:
        cut_messages, cut = _cut_messages(messages, bound)
        features, n_prompt, n_response = _tokenize(cut_messages, tokenizer, template, max_length,
                                                   spans)
        # A cut turn must still give more tokens than max_length, or the cut decided the result.
        prompt_cut = any(len(m["content"]) > bound for m in messages[:-1])
        response_cut = len(messages[-1]["content"]) > bound
        if not cut or ((not prompt_cut or n_prompt > max_length)
                       and (not response_cut or n_response > max_length)):
            return dataclasses.replace(features, special_text=special_text)
        bound *= 4


def _tokenize(messages: tuple[Message, ...], tokenizer: Any, template: str,
              max_length: int, spans: bool) -> tuple[Features, int, int]:
    """Features for ``messages``, and the prompt and response token counts before truncation."""
    prompt = render_prompt(messages, tokenizer, template, spans=spans)
    prompt_ids = prompt_token_ids(prompt, tokenizer)
    response_ids = encode_text(_response_text(messages, tokenizer, template, prompt), tokenizer)
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
