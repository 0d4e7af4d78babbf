"""The tokenizer a GGUF file describes, rebuilt as a ``tokenizers`` ``tokenizer.json``.

GGUF keeps the tokenizer as metadata: ``tokenizer.ggml.model`` names the kind,
``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` hold the vocabulary, ``tokenizer.ggml.pre``
names how text is split before BPE, and ``tokenizer.chat_template`` is the chat format. This
module turns that into the two files an HF model directory would have, so that a shard set
converted from GGUF stands alone: ``tokenizer.json`` (read by
:class:`llm.text.tokenizer.HFTokenizer`)
and ``tokenizer_config.json`` (special tokens and ``chat_template``, read by
:class:`llm.text.chat_template.ChatTemplate`).

Kinds are dispatched by ``tokenizer.ggml.model`` in :data:`BUILDERS`; today ``gpt2`` (byte-level
BPE). Another kind (e.g. SentencePiece's ``llama``) is one more builder with the same signature.

Byte-level BPE: tokens are spelled in GPT-2's byte alphabet (``Ġ`` for a space); merges are
``"left right"`` pairs in priority order; tokens of type CONTROL (3) become special added tokens
(kept whole in text, dropped when decoding with ``skip_special_tokens``), USER_DEFINED (4) plain
added tokens. Pre-tokenizers by ``tokenizer.ggml.pre`` name (:data:`PRE_TOKENIZERS`):

* ``gpt2`` family: GPT-2's split pattern (contractions, letters, numbers, punctuation runs,
  whitespace runs).
* ``smollm`` / ``starcoder`` family: every digit on its own first, then GPT-2's pattern.
* ``llama3`` family and ``qwen2``: their split patterns (numbers in groups of up to 3 or alone).
"""

from __future__ import annotations

import json
from pathlib import Path

from .gguf_source import GGUFError, GGUFFile

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _split_pre(pattern: str):
    def build():
        from tokenizers import Regex, pre_tokenizers

        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


#: ``tokenizer.ggml.pre`` name -> builder of the ``tokenizers`` pre-tokenizer
PRE_TOKENIZERS = {
    "default": _gpt2_pre,
    "gpt2": _gpt2_pre,
    "gpt-2": _gpt2_pre,
    "smollm": _digits_then_gpt2_pre,
    "starcoder": _digits_then_gpt2_pre,
    "refact": _digits_then_gpt2_pre,
    "codeshell": _digits_then_gpt2_pre,
    "llama3": _split_pre(_LLAMA3_SPLIT),
    "llama-bpe": _split_pre(_LLAMA3_SPLIT),
    "llama-v3": _split_pre(_LLAMA3_SPLIT),
    "smaug-bpe": _split_pre(_LLAMA3_SPLIT),
    "qwen2": _split_pre(_QWEN2_SPLIT),
}


def _byte_level_bpe(meta: dict):
    """``tokenizers.Tokenizer`` of a ``gpt2``-kind GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens, merges = meta["tokens"], meta.get("merges")
    if not merges:
        raise GGUFError("byte-level BPE vocabulary without tokenizer.ggml.merges")
    pre = meta.get("pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFError(f"merge {m!r} is not two tokens separated by a space")
        pairs.append((left, right))
    tok = Tokenizer(
        models.BPE(
            vocab,
            pairs,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    types = meta.get("token_type") or [1] * len(tokens)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == TOKEN_TYPE_CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == TOKEN_TYPE_USER_DEFINED
        ]
    )
    bos = meta.get("bos_token_id")
    if meta.get("add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


#: ``tokenizer.ggml.model`` -> ``builder(metadata dict) -> tokenizers.Tokenizer``
BUILDERS = {"gpt2": _byte_level_bpe}


def tokenizer_metadata(f: GGUFFile) -> dict:
    """The ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` values, short keys."""
    meta = {}
    for key in (
        "model",
        "pre",
        "tokens",
        "merges",
        "token_type",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
        "add_eos_token",
    ):
        value = f.get(f"tokenizer.ggml.{key}")
        if value is not None:
            meta[key] = value
    template = f.get("tokenizer.chat_template")
    if template is not None:
        meta["chat_template"] = template
    return meta


def build_tokenizer(meta: dict):
    """``tokenizers.Tokenizer`` from :func:`tokenizer_metadata` (raises :class:`GGUFError`)."""
    kind = meta.get("model")
    if kind is None or "tokens" not in meta:
        raise GGUFError("the file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    if kind not in BUILDERS:
        raise GGUFError(
            f"tokenizer kind {kind!r} (tokenizer.ggml.model) is not supported; "
            f"supported: {', '.join(sorted(BUILDERS))}"
        )
    return BUILDERS[kind](meta)


def tokenizer_config(meta: dict) -> dict:
    """An HF ``tokenizer_config.json`` dict: special tokens, BOS/EOS flags, chat template."""
    tokens = meta["tokens"]
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("add_bos_token", False)),
        "add_eos_token": bool(meta.get("add_eos_token", False)),
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        if meta.get(key) is not None:
            out[name] = tokens[meta[key]]
    if "chat_template" in meta:
        out["chat_template"] = meta["chat_template"]
    return out


def tokenizer_files(f: GGUFFile) -> dict[str, bytes]:
    """``{"tokenizer.json": ..., "tokenizer_config.json": ...}`` of a GGUF file."""
    meta = tokenizer_metadata(f)
    tok = build_tokenizer(meta)
    return {
        "tokenizer.json": tok.to_str().encode("utf-8"),
        "tokenizer_config.json": (
            json.dumps(tokenizer_config(meta), indent=1, ensure_ascii=False) + "\n"
        ).encode("utf-8"),
    }


def write_tokenizer_files(f: GGUFFile, directory) -> list[str]:
    """Write :func:`tokenizer_files` into ``directory``; returns the file names."""
    names = []
    for name, data in tokenizer_files(f).items():
        (Path(directory) / name).write_bytes(data)
        names.append(name)
    return names
