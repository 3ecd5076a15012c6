"""A small byte-level BPE tokenizer for the embedded tiny models, trained offline in about a second.

Byte-level BPE covers any text; the training corpus (chain tags, the prompt, the degradation vocabulary and
common caption words) only decides which strings get short encodings. A 1k vocabulary makes vLLM sampling
about 10x faster on CPU than Qwen's 151k one. The chain tags are single tokens so that the tiny policy can
learn the format quickly; Qwen's special tokens are carried so that Qwen's chat template and vLLM's
Qwen2.5-VL processor work unchanged.

``build_chain_tokenizer(n, exact=True)`` gives exactly ``n`` ids at any size, e.g. Qwen2.5's 151,665 (151,643
regular + 22 added), so that tests can run an engine at the real vocabulary layout with tiny widths: past what
the corpus trains, the BPE is filled with deterministic synthetic merges (``_synthetic_merges``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from core.chain import DEFAULT_PROMPT, DEGRADATION_ITEMS, LEVELS, TAGS, degradation_text

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CHAIN_TAG_TOKENS: tuple[str, ...] = tuple(itertools.chain.from_iterable((f"<{t}>", f"</{t}>") for t in TAGS))

# Qwen2-VL's chat template, trimmed to what the chain needs (text and image parts, no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CAPTION_WORDS = (
    "this image shows a the an of with on in and at under over near behind front background foreground "
    "person woman man face portrait astronaut suit flag space helmet cat kitten fur eyes whiskers coffee cup "
    "saucer spoon table wooden rocket launch pad smoke sky cloud clouds motorcycle wheel engine bike road "
    "galaxy stars telescope retina eye vessels camera photographer tripod field grass building buildings city "
    "coins metal text page book horse animal tree trees leaves flower flowers water sea beach rock rocks "
    "mountain hill snow light dark bright red green blue yellow white black orange brown gray grey close up "
    "detailed texture sharp edges fine details smooth surface pattern striped shiny colorful small large "
    "group lying standing sitting looking wearing holding round square left right top bottom center"
).split()


def _corpus() -> list[str]:
    lines = [DEFAULT_PROMPT, " ".join(TAGS), " ".join(CAPTION_WORDS)]
    for level in LEVELS:
        lines.append(degradation_text({item: level for item in DEGRADATION_ITEMS}))
    words = CAPTION_WORDS
    for i in range(0, len(words) - 8, 3):  # short pseudo-captions so word pairs get merges
        lines.append("This image shows " + " ".join(words[i : i + 8]) + ".")
    return lines * 4


def _byte_level_chars() -> list[str]:
    """The byte-level alphabet (GPT-2's byte -> printable char map), printable ASCII bytes first, then the
    others, each group in byte order: the order synthetic tokens are made in."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # bytes that map to themselves
    char = {b: chr(b) for b in printable}
    char.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in char)})
    return [char[b] for b in sorted(range(256), key=lambda b: (not 0x20 <= b <= 0x7E, b))]


def _synthetic_merges(vocab: dict[str, int]) -> Iterator[tuple[str, str]]:
    """Merges that make new tokens from the byte-level alphabet: every 2-char token, then every 3-char one,
    ... (each ``prefix + last char``, so its parts exist once the shorter lengths are complete), skipping
    strings already in ``vocab``. Deterministic; infinite. Only ever ranked after the trained merges."""
    chars = _byte_level_chars()
    missing = set(chars) - set(vocab)
    if missing:
        raise ValueError(f"the trained BPE lacks {len(missing)} byte-level characters; cannot add merges")
    seen = set(vocab)
    for n in itertools.count(2):
        for combo in itertools.product(chars, repeat=n):
            token = "".join(combo)
            if token not in seen:
                seen.add(token)
                yield token[:-1], token[-1]


def _fill_bpe(tok: Tokenizer, size: int) -> Tokenizer:
    """``tok``'s BPE with synthetic merges appended (after the trained ones) until it has ``size`` tokens."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("the trained BPE's ids are not contiguous")
    merges = data["model"]["merges"]
    for left, right in itertools.islice(_synthetic_merges(vocab), size - len(vocab)):
        vocab[left + right] = len(vocab)
        merges.append([left, right])
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def build_chain_tokenizer(vocab_size: int = 1024, exact: bool = False) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it with Qwen's special tokens and chat template.

    ``vocab_size`` caps the trained vocabulary: the corpus saturates at 765 ids in all (743 BPE + 22 added),
    which is what the default 1024 gives. ``exact=True`` makes ``len(tokenizer) == vocab_size`` exactly (a
    ValueError when it cannot): the trained merges come first, so chain text encodes as short as before,
    then synthetic ones fill the rest (``_synthetic_merges``; 151,665 builds in about 2 s). The added
    tokens (Qwen's special tokens, then the chain tags) follow the BPE ids either way, the same strings in
    the same order.
    """
    added = len(QWEN_SPECIAL_TOKENS) + len(CHAIN_TAG_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if exact:
        bpe_size = tok.get_vocab_size(with_added_tokens=False)
        if bpe_size > vocab_size - added:
            raise ValueError(
                f"build_chain_tokenizer(vocab_size={vocab_size}, exact=True): the byte-level BPE alone has "
                f"{bpe_size} tokens and {added} added tokens follow; vocab_size must be >= {bpe_size + added}"
            )
        if bpe_size < vocab_size - added:
            tok = _fill_bpe(tok, vocab_size - added)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(list(CHAIN_TAG_TOKENS))  # normal added tokens: kept when decoding with skip_special_tokens
    if exact and len(fast) != vocab_size:
        raise ValueError(f"build_chain_tokenizer(vocab_size={vocab_size}, exact=True) made {len(fast)} ids")
    return fast
