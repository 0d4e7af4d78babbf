"""Tokenizers: HF ``tokenizer.json`` through the ``tokenizers`` library, or a byte-level fallback.

The fallback (:class:`ByteTokenizer`) is for models without a tokenizer, e.g. random-weight runs:
it maps each UTF-8 byte ``b`` to id ``b + offset``. The offset is 3 when the vocabulary has room
(ids 0, 1, 2 stay free for pad / BOS / EOS, as in LLaMA 2), else 0; vocabularies smaller than
256 ids cannot use it. Text made of such ids is only meaningful for a model trained on them.

:class:`StreamDecoder` turns a growing list of ids into text pieces as they become complete,
holding back a piece while it ends inside a multi-byte character.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

REPLACEMENT_CHAR = "\ufffd"
#: A ``tokenizer.json`` larger than this is refused unread (the largest real ones are ~20 MB).
MAX_TOKENIZER_BYTES = 1 << 30


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (damaged, not a tokenizer, or not this model's)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte ``b`` is id ``b + offset``.

    Parameters
    ----------
    vocab_size : int
        At least 256.
    bos_id : int, optional
    eos_ids : ints, optional
    offset : int, optional
        Id of byte 0; defaults to 3 if ``vocab_size >= 259``, else 0.
    """

    def __init__(
        self,
        vocab_size: int,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        offset: int | None = None,
    ):
        if offset is None:
            offset = 3 if vocab_size >= 259 else 0
        if vocab_size < 256 + offset:
            raise ValueError(
                f"a vocabulary of {vocab_size} ids is too small for the byte-level "
                f"tokenizer (it needs {256 + offset}); provide a tokenizer.json"
            )
        self.vocab_size, self.offset = int(vocab_size), int(offset)
        self.bos_id = bos_id
        self.eos_ids = tuple(int(e) for e in eos_ids)
        specials = ([bos_id] if bos_id is not None else []) + list(self.eos_ids)
        # Special ids that do not also stand for a byte.
        self._specials = {s for s in specials if not self._is_byte(s)}

    def _is_byte(self, i: int) -> bool:
        return self.offset <= i < self.offset + 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; BOS first if requested and it is not itself a byte id."""
        ids = [b + self.offset for b in text.encode("utf-8")]
        if add_special_tokens and self.bos_id is not None and self.bos_id in self._specials:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Ids that are not bytes are dropped; broken UTF-8 becomes U+FFFD."""
        data = bytes(int(i) - self.offset for i in ids if self._is_byte(int(i)))
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` library.

    Parameters
    ----------
    path : path
        The ``tokenizer.json`` file.
    bos_id : int, optional
    eos_ids : ints, optional
        Normally from the model's ``config.json`` / ``generation_config.json``.
    """

    def __init__(self, path, bos_id: int | None = None, eos_ids: Iterable[int] = ()):
        self.path = Path(path)
        self._tok = _read_tokenizer(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        #: The largest token id the tokenizer can produce.
        self.max_id = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        self.bos_id = bos_id
        self.eos_ids = tuple(int(e) for e in eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; the tokenizer's own post-processor adds BOS etc. if requested."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text (incomplete UTF-8 at the end becomes U+FFFD)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer:
    """A SentencePiece ``tokenizer.model`` (LLaMA 1/2 style checkpoints without a
    ``tokenizer.json``), through the optional ``sentencepiece`` package.

    Raises ``ValueError`` naming the fix when the package is not installed (the byte-level
    fallback would print garbage for such a model).
    """

    def __init__(self, path, bos_id: int | None = None, eos_ids: Iterable[int] = ()):
        self.path = Path(path)
        try:
            import sentencepiece
        except ImportError:
            raise ValueError(
                f"{self.path.parent} has a SentencePiece tokenizer.model but no "
                "tokenizer.json: pip install sentencepiece (or pip install "
                "'waferllm-mpi[spm]') to read it, or save a tokenizer.json with "
                "transformers (AutoTokenizer.from_pretrained(DIR)"
                ".save_pretrained(DIR))"
            ) from None
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = bos_id if bos_id is not None else _valid(self._sp.bos_id())
        self.eos_ids = tuple(int(e) for e in eos_ids) or tuple(
            e for e in [_valid(self._sp.eos_id())] if e is not None
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; BOS first if requested (as LLaMA's tokenizer does)."""
        ids = list(self._sp.encode(text))
        if add_special_tokens and self.bos_id is not None:
            ids.insert(0, int(self.bos_id))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text (BOS/EOS dropped when ``skip_special_tokens``; ids beyond the
        tokenizer's pieces, as in a model vocabulary padded past it, give no text)."""
        special = {self.bos_id, *self.eos_ids} if skip_special_tokens else set()
        return self._sp.decode(
            [int(i) for i in ids if int(i) not in special and 0 <= int(i) < self.vocab_size]
        )


def _read_tokenizer(path: Path):
    """A ``tokenizer.json`` read by the ``tokenizers`` library, once checked to be a JSON
    object with a ``model`` (:class:`TokenizerError` naming the file if it is not usable)."""
    from tokenizers import Tokenizer

    bad = f"{path} is not a usable tokenizer.json"
    try:
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{bad} (larger than {MAX_TOKENIZER_BYTES >> 20} MiB)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{bad}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TokenizerError(f"{bad}: {e.strerror or e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{bad}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise TokenizerError(f'{bad}: a JSON object with a "model" object is expected')
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
        raise TokenizerError(f"{bad}: {' '.join(str(e).split())[:200]}") from None


def _valid(token_id: int) -> int | None:
    return None if token_id is None or token_id < 0 else int(token_id)


def _special_ids(model_dir: Path | None, config) -> tuple[int | None, tuple, int | None]:
    """(bos id, eos ids, vocab size) from a ModelConfig or the directory's JSON files."""
    if config is not None:
        return config.bos_token_id, tuple(config.eos_ids), config.vocab_size
    assert model_dir is not None, "a model directory or a config"  # load_tokenizer checks it
    bos, eos, vocab = None, [], None
    for fname in ("config.json", "generation_config.json"):
        path = model_dir / fname
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        vocab = d.get("vocab_size", vocab)
        bos = d.get("bos_token_id", bos)
        e = d.get("eos_token_id")
        for tok in [] if e is None else [e] if isinstance(e, int) else e:
            if tok not in eos:
                eos.append(int(tok))
    return bos, tuple(eos), vocab


def load_tokenizer(model_dir=None, config=None):
    """The tokenizer of a model directory.

    Parameters
    ----------
    model_dir : path, optional
        Uses ``tokenizer.json`` if present, else a SentencePiece ``tokenizer.model``, else the
        byte-level fallback.
    config : ModelConfig, optional
        Source of the BOS / EOS ids and vocabulary size (else ``config.json`` and
        ``generation_config.json`` of ``model_dir``). Without ``model_dir`` the result is the
        byte-level tokenizer for this config.

    Returns
    -------
    HFTokenizer, SentencePieceTokenizer or ByteTokenizer
        Both have ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``bos_id``, ``eos_ids``.
    """
    model_dir = None if model_dir is None else Path(model_dir)
    if model_dir is None and config is None:
        raise ValueError("load_tokenizer needs a model directory or a config")
    bos, eos, vocab = _special_ids(model_dir, config)
    if model_dir is not None and (model_dir / "tokenizer.json").exists():
        tok = HFTokenizer(model_dir / "tokenizer.json", bos, eos)
        if vocab is not None and tok.max_id >= vocab:
            raise TokenizerError(
                f"{tok.path} has token ids up to {tok.max_id}, beyond the model's vocabulary "
                f"(0..{vocab - 1}): is it the tokenizer of another model?"
            )
        return tok
    if model_dir is not None and (model_dir / "tokenizer.model").exists():
        return SentencePieceTokenizer(model_dir / "tokenizer.model", bos, eos)
    if vocab is None:
        raise ValueError(f"no tokenizer.json and no vocab_size in {model_dir}")
    return ByteTokenizer(int(vocab), bos, eos)


class StreamDecoder:
    """Incremental detokenisation for streaming output.

    Each :meth:`push` returns the text the new token completes (possibly ``""``). Text is held
    back while the decoded tail ends in U+FFFD (a character split across tokens); tokenizers
    whose decoding depends on the neighbouring tokens (leading spaces) are handled by decoding a
    small window that overlaps the text already emitted.

    Examples
    --------
    >>> stream = StreamDecoder(tok)
    >>> text = "".join(stream.push(t) for t in ids) + stream.flush()   # == tok.decode(ids)
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: tokens before it never change the output
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        """Add one token; return the newly completed text."""
        self.ids.append(int(token))
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith(REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """The text still held back (incomplete characters shown as U+FFFD)."""
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(done) :]
