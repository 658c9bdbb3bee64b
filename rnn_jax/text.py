"""Text -> tokens -> ids: the language-model corpus pipeline.

The pipeline has three stages, each a plain function of its input::

    text = read_text(path)                 # str; None = the bundled Time Machine
    toks = tokenize(text, "char")          # list[str]
    vocab = Vocab(toks, min_freq=0, mode="char")
    ids = vocab.to_ids(toks)               # <int32>[N]

or in one call ``ids, vocab = load_corpus(path, tokens="char", min_freq=0)``.

Token modes (the ``tokens`` flag):

* ``"char"``: the book's (Dive into Deep Learning) cleaning: every run of
  characters other than ``A-Z a-z`` becomes one space, then lowercase; the tokens
  are the characters. On the bundled text this gives 26 letters and the space.
* ``"raw_char"``: the characters of the text exactly as read, no cleaning (a
  leading UTF-8 byte-order mark is not text: :func:`read_text` drops it).
* ``"word"``: the same cleaning as ``"char"``, then split on spaces.

The vocabulary puts ``<unk>`` at index 0, then the ``reserved`` tokens in the order
given, then every token seen at least ``min_freq`` times, by descending frequency
and then alphabetically, so the same tokens always give the same ids. Rarer tokens
map to ``<unk>``. ``Vocab.to_json`` / ``Vocab.from_json`` store and restore it
exactly, so generation can decode ids of a finished run.
"""

from __future__ import annotations

import codecs
import collections
import importlib.resources
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

UNK = "<unk>"
MODES = ("char", "raw_char", "word")

_SEPARATORS = {"char": "", "raw_char": "", "word": " "}
_JSON_FORMAT = "rnn_jax.vocab"
_JSON_VERSION = 1


# --- reading ----------------------------------------------------------------


def read_text(path: str | os.PathLike[str] | None = None, *, keep_bom: bool = False) -> str:
    """Reads a UTF-8 text file, exactly as stored (no newline translation; a leading
    byte-order mark is dropped).

    Args:
      path: the file to read; None reads the bundled ``rnn_jax/assets/timemachine.txt``.
      keep_bom: keep a leading byte-order mark as the text's first character, as
        rnn_jax read it until 2026-12-08 (for the runs trained then).

    Returns:
      The file's text.

    Raises:
      ValueError: with a one-line message, when the file is missing, is a directory,
        cannot be read, is not valid UTF-8 (with the byte offset) or is empty or only
        whitespace.
    """
    if path is None:
        where = "bundled corpus rnn_jax/assets/timemachine.txt"
        resource = importlib.resources.files("rnn_jax") / "assets" / "timemachine.txt"
        data = _read_bytes(resource, where)
    else:
        where = f"text file {os.fspath(path)!s}"
        data = _read_bytes(path, where)
    return _decode(data, where, keep_bom)


def starts_with_bom(path: str | os.PathLike[str] | None) -> bool:
    """Whether the file at ``path`` starts with a UTF-8 byte-order mark (False for
    None, the bundled text, and for a file that cannot be read)."""
    if path is None:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
    except OSError:
        return False


def _read_bytes(source, where: str) -> bytes:
    """The bytes of ``source`` (a path or an importlib Traversable)."""
    if isinstance(source, str | os.PathLike):
        if not os.path.exists(source):
            raise ValueError(f"{where} not found (no such file)")
        if os.path.isdir(source):
            raise ValueError(f"{where} is a directory, not a file")
        try:
            with open(source, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{where} is unreadable: {e.strerror or e}") from None
    try:
        return source.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where} not found (no such file)") from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a directory, not a file") from None
    except OSError as e:
        raise ValueError(f"{where} is unreadable: {e.strerror or e}") from None


def _decode(data: bytes, where: str, keep_bom: bool = False) -> str:
    """``data`` as UTF-8 text; rejects invalid bytes and empty or blank text. A
    leading byte-order mark (``EF BB BF``, as editors on Windows save UTF-8) marks
    the encoding and is not text: it is dropped, so it never becomes a token."""
    if not data:
        raise ValueError(f"{where} is empty (0 bytes)")
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) and not keep_bom else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        bad = data[at : at + 1].hex()
        raise ValueError(
            f"{where} is not valid UTF-8: invalid byte 0x{bad} at byte offset {at}"
        ) from None
    if not text.strip():
        mark = "a byte-order mark and " if start else ""
        raise ValueError(f"{where} is empty: it contains only {mark}whitespace")
    return text


# --- tokens -----------------------------------------------------------------


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        allowed = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"unknown tokens mode {mode!r}: tokens must be one of {allowed}")
    return mode


def preprocess(text: str, mode: str = "char") -> str:
    """Cleans ``text`` for a token mode.

    ``"char"`` and ``"word"``: every run of non-letters (anything but ``A-Za-z``)
    becomes one space, then lowercase (``"Hello,  World!! 42x" -> "hello world x"``).
    ``"raw_char"``: the text unchanged.

    Raises:
      ValueError: for an unknown mode.
    """
    if _check_mode(mode) == "raw_char":
        return text
    return re.sub("[^A-Za-z]+", " ", text).lower()


def tokenize(text: str, mode: str = "char") -> list[str]:
    """Splits ``text`` into tokens after :func:`preprocess`.

    Returns:
      ``list[str]`` of length N: characters for ``"char"`` / ``"raw_char"``, words
      (no empty strings) for ``"word"``.

    Raises:
      ValueError: for an unknown mode.
    """
    clean = preprocess(text, mode)
    if mode == "word":
        return clean.split()
    return list(clean)


# --- vocabulary -------------------------------------------------------------


class Vocab:
    """A token <-> id table; ``<unk>`` is id 0.

    Args:
      tokens: the corpus tokens whose frequencies decide the table.
      min_freq: tokens seen fewer than ``min_freq`` times are left out (they map to
        ``<unk>``).
      reserved: tokens given the ids right after ``<unk>``, in this order, whether
        or not they occur.
      mode: the token mode (see :data:`MODES`); it decides how :meth:`join` glues
        tokens back into text.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (),
        min_freq: int = 0,
        reserved: Sequence[str] = (),
        mode: str = "char",
    ):
        is_int = isinstance(min_freq, (int, np.integer)) and not isinstance(min_freq, np.bool_)
        if isinstance(min_freq, bool) or not is_int or min_freq < 0:
            raise ValueError(f"min_freq must be an integer >= 0; got {min_freq!r}")
        min_freq = int(min_freq)
        counts = collections.Counter(tokens)
        if isinstance(reserved, str):  # would reserve each of its characters
            raise ValueError(
                f"reserved: expected a sequence of tokens, got the string {reserved!r}; "
                f"write [{reserved!r}]"
            )
        head = _unique([UNK, *reserved])
        kept = [t for t, n in counts.items() if n >= min_freq and t not in head]
        kept.sort(key=lambda t: (-counts[t], t))
        self._set(head + kept, mode)

    def _set(self, idx_to_token: list[str], mode: str) -> None:
        self.mode = _check_mode(mode)
        self._idx_to_token = list(idx_to_token)
        self._token_to_idx = {t: i for i, t in enumerate(self._idx_to_token)}

    @property
    def tokens(self) -> list[str]:
        """All tokens, indexed by id (a copy)."""
        return list(self._idx_to_token)

    @property
    def separator(self) -> str:
        """What :meth:`join` puts between tokens: ``" "`` for words, else ``""``."""
        return _SEPARATORS[self.mode]

    @property
    def unk(self) -> int:
        """The id of ``<unk>`` (0)."""
        return 0

    def __len__(self) -> int:
        return len(self._idx_to_token)

    def __contains__(self, token: object) -> bool:
        return token in self._token_to_idx

    def unknown(self, text: str) -> list[str]:
        """The tokens of ``text`` (tokenized in this vocabulary's mode) that it lacks,
        each once, in order: what :meth:`to_ids` reads as ``<unk>``."""
        return list(dict.fromkeys(t for t in tokenize(text, self.mode) if t not in self))

    def __getitem__(self, token: str) -> int:
        """The id of one token; unknown tokens give 0."""
        return self._token_to_idx.get(token, 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.mode == other.mode and self._idx_to_token == other._idx_to_token

    __hash__ = None  # mutable-looking object with value equality

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, mode={self.mode!r})"

    def to_ids(self, tokens: Iterable[str]) -> np.ndarray:
        """Maps tokens to ids: ``list[str]`` of length N -> ``<int32>[N]``; unknown -> 0.

        A string is a sequence of character tokens: right for the character modes;
        a word vocabulary refuses it (ValueError: tokenize it first)."""
        if isinstance(tokens, str) and self.mode == "word":
            raise ValueError(
                f"tokens: a word vocabulary maps a list of words, got the string "
                f"{tokens[:40]!r}; use text.tokenize(s, 'word') first"
            )
        get = self._token_to_idx.get
        return np.fromiter((get(t, 0) for t in tokens), dtype=np.int32)

    def to_tokens(self, ids: Iterable[int] | np.ndarray) -> list[str]:
        """Maps ids back to tokens: ``<int>[N]`` -> ``list[str]`` of length N.

        Raises:
          ValueError: for an id outside ``[0, len(vocab))``.
        """
        flat = np.asarray(ids).reshape(-1)
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"ids must be integers; got dtype {flat.dtype}")
        bad = flat[(flat < 0) | (flat >= len(self))]
        if bad.size:
            raise ValueError(f"id {int(bad[0])} is out of range for a vocab of {len(self)} tokens")
        return [self._idx_to_token[i] for i in flat.tolist()]

    def join(self, tokens: Iterable[str]) -> str:
        """Glues tokens into text: with ``""`` for character modes, ``" "`` for words."""
        return self.separator.join(tokens)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """``join(to_tokens(ids))``: ids ``<int>[N]`` -> text (one sequence: decode
        the rows of a batch one by one)."""
        if np.ndim(ids) > 1:
            raise ValueError(
                f"ids: expected one sequence <int>[N], got shape {np.shape(ids)}; decode each row"
            )
        return self.join(self.to_tokens(ids))

    def to_json(self) -> str:
        """The vocab as a JSON string (mode and tokens in id order)."""
        payload = {
            "format": _JSON_FORMAT,
            "version": _JSON_VERSION,
            "mode": self.mode,
            "tokens": self._idx_to_token,
        }
        return json.dumps(payload, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> Vocab:
        """Rebuilds exactly the vocab that :meth:`to_json` wrote.

        Raises:
          ValueError: when ``data`` is not such a JSON document.
        """
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"vocab JSON is not valid JSON: {e}") from None
        tokens = _check_payload(payload)
        vocab = cls.__new__(cls)
        vocab._set(tokens, payload["mode"])
        return vocab


def some(items: Sequence[str], limit: int = 5) -> str:
    """``'a', 'b', ...``: the first ``limit`` items quoted, for a message."""
    return ", ".join(map(repr, items[:limit])) + (", ..." if len(items) > limit else "")


def _unique(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, first occurrence kept."""
    return list(dict.fromkeys(items))


def _check_payload(payload: object) -> list[str]:
    """The token list of a vocab JSON payload, after checking its structure."""
    if not isinstance(payload, dict) or payload.get("format") != _JSON_FORMAT:
        raise ValueError(f"vocab JSON must be an object with format {_JSON_FORMAT!r}")
    if payload.get("version") != _JSON_VERSION:
        raise ValueError(f"vocab JSON version {payload.get('version')!r} is not supported")
    if payload.get("mode") not in MODES:
        raise ValueError(f"vocab JSON mode must be one of {MODES}; got {payload.get('mode')!r}")
    tokens = payload.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError("vocab JSON tokens must be a list of strings")
    if not tokens or tokens[0] != UNK:
        raise ValueError(f"vocab JSON tokens must start with {UNK!r}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("vocab JSON tokens must be unique")
    return tokens


# --- all together -----------------------------------------------------------


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    tokens: str = "char",
    min_freq: int = 0,
    *,
    keep_bom: bool = False,
) -> tuple[np.ndarray, Vocab]:
    """Reads, tokenizes and numbers a text.

    Args:
      path: the text file; None for the bundled Time Machine.
      tokens: the token mode, one of :data:`MODES`.
      min_freq: see :class:`Vocab`.
      keep_bom: see :func:`read_text`.

    Returns:
      ``(ids, vocab)``: ids ``<int32>[N]``, one per token, and the vocab built on
      this text.

    Raises:
      ValueError: for a bad file (see :func:`read_text`), an unknown mode, or a text
        that has no tokens after cleaning.
    """
    _check_mode(tokens)
    toks = tokenize(read_text(path, keep_bom=keep_bom), tokens)
    if not toks:
        where = "the bundled corpus" if path is None else os.fspath(path)
        raise ValueError(f"{where} has no {tokens!r} tokens after preprocessing")
    vocab = Vocab(toks, min_freq=min_freq, mode=tokens)
    return vocab.to_ids(toks), vocab
