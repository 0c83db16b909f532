"""Byte-level BPE text tokenizer with CLIP's algorithm and vocabulary.

The algorithm and the vocabulary (``assets/bpe_simple_vocab_16e6.txt.gz``) are
OpenAI CLIP's (MIT licence, see ``assets/LICENSE-CLIP-BPE.txt``). This module is
an independent implementation of the same procedure; ``tests/test_tokenizer.py``
checks it id for id against OpenAI's ``clip/simple_tokenizer.py`` from the
``clip-anytorch==2.6.0`` wheel.

The procedure, in order:

1. Clean: ``ftfy.fix_text``, then ``html.unescape`` applied twice, ``strip``,
   every run of (Unicode) whitespace collapsed to one space, ``strip`` again,
   and lower-casing.
2. Split into pieces with CLIP's pattern: the contractions ``'s 't 're 've 'm
   'll 'd``, runs of letters, single digits, and runs of anything that is
   neither whitespace, letter nor digit.
3. Each piece is UTF-8 encoded; each byte is a base symbol, and the last one
   carries the end-of-word marker ``</w>``.
4. Byte-pair merges are applied, lowest rank first: each round takes the
   adjacent pair with the lowest rank and merges all of its occurrences, left
   to right without overlap, until no adjacent pair has a rank.

Vocabulary layout (49,408 ids): 256 byte symbols, the same 256 with ``</w>``,
48,894 merges (lines 1..48894 of the file, line 0 is a header), then
``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.

Deliberate differences from OpenAI's ``simple_tokenizer``:

* The literal strings ``<|startoftext|>`` and ``<|endoftext|>`` inside a text
  are tokenized as ordinary text (``<|``, ``startoftext``, ``|>``); the
  reference turns them into the special ids, which would let a caption inject
  an end token. Every other ``str`` gives exactly the reference's ids.
* Nothing raises on any ``str`` (or ``bytes``, decoded as UTF-8 with
  replacement). Characters that cannot be UTF-8 encoded after cleaning (lone
  surrogates; ftfy normally already turns them into U+FFFD) become U+FFFD.
* ``decode`` drops special tokens and padding and strips the trailing space
  that the reference leaves after the last word.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import importlib.resources
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

__all__ = ["Tokenizer"]

_PACKAGE = "dalle_jax"
_DEFAULT_VOCAB = "assets/bpe_simple_vocab_16e6.txt.gz"
_END_OF_WORD = "</w>"
_SOT_TEXT = "<|startoftext|>"
_EOT_TEXT = "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of its file (after the header line).
_MERGE_COUNT = 49152 - 256 - 2

# CLIP's split pattern, without its two special-token alternatives (see above).
_PIECES = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
# The same split for lower-case ASCII without whitespace: there \p{L} is [a-z]
# and \p{N} is [0-9], and case-insensitivity changes nothing.
_ASCII_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^a-z0-9]+")
_WHITESPACE_RUN = regex.compile(r"\s+")
_SURROGATE = regex.compile(r"[\ud800-\udfff]")
# ASCII text with none of these characters is left unchanged by ftfy.fix_text
# (checked by the tests): ftfy only alters ASCII through HTML entities ('&'),
# line breaks ('\r'), terminal escapes ('\x1b') and control characters. Text
# that passes also has no '&', so html.unescape is the identity on it.
_ASCII_NEEDS_FULL_CLEAN = regex.compile(r"[^\t\n\x20-\x25\x27-\x7e]")

# Length bounds for what the caches keep (longer entries are computed each time).
_MAX_CACHED_TEXT_CHARS = 512
_MAX_CACHED_WORD_CHARS = 64
# Words at least this many bytes long use the heap-based merge loop.
_LONG_WORD_BYTES = 16


def _byte_symbols() -> list[tuple[int, str]]:
    """CLIP's reversible byte -> printable character table, in vocabulary order.

    Bytes that are printable Latin-1 characters ('!'..'~', '\xa1'..'\xac',
    '\xae'..'\xff') stand for themselves and come first, in byte order; the
    other 68 bytes (controls, space, NBSP, soft hyphen) are given the characters
    U+0100, U+0101, ... in byte order and come after them.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    kept = set(printable)
    table = [(b, chr(b)) for b in printable]
    spare = 256
    for b in range(256):
        if b not in kept:
            table.append((b, chr(spare)))
            spare += 1
    return table


class _Vocabulary:
    """Immutable tables derived from one merges file; shared between tokenizers."""

    def __init__(self, raw: bytes):
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + _MERGE_COUNT]]

        symbols = _byte_symbols()
        strings = [ch for _, ch in symbols]
        strings += [ch + _END_OF_WORD for _, ch in symbols]
        strings += ["".join(m) for m in merges]
        strings += [_SOT_TEXT, _EOT_TEXT]
        # As in CLIP, a string that occurs twice keeps its last id.
        self.token_to_id: dict[str, int] = {s: i for i, s in enumerate(strings)}
        self.size = len(strings)
        self.sot = self.token_to_id[_SOT_TEXT]
        self.eot = self.token_to_id[_EOT_TEXT]

        # Symbol ids for byte b inside a word and at the end of a word.
        self.byte_id = [0] * 256
        self.final_byte_id = [0] * 256
        char_to_byte = {}
        for b, ch in symbols:
            self.byte_id[b] = self.token_to_id[ch]
            self.final_byte_id[b] = self.token_to_id[ch + _END_OF_WORD]
            char_to_byte[ch] = b

        # (left id, right id) -> rank; rank -> merged id and the pair itself.
        self.rank: dict[tuple[int, int], int] = {}
        self.merged_id: list[int] = []
        self.pair_of_rank: list[tuple[int, int]] = []
        for m in merges:
            if len(m) != 2 or m[0] not in self.token_to_id or m[1] not in self.token_to_id:
                # Unusable merge line: keep the rank numbering, never match it.
                self.merged_id.append(-1)
                self.pair_of_rank.append((-1, -1))
                continue
            pair = (self.token_to_id[m[0]], self.token_to_id[m[1]])
            self.rank[pair] = len(self.merged_id)  # a repeated pair keeps its last rank
            self.merged_id.append(self.token_to_id[m[0] + m[1]])
            self.pair_of_rank.append(pair)

        # id -> the bytes its symbol stands for, '</w>' kept literally (as CLIP).
        self.id_bytes: list[bytes] = []
        id_to_string = {i: s for s, i in self.token_to_id.items()}
        for i in range(self.size):
            s = id_to_string.get(i)
            if s is None or s in (_SOT_TEXT, _EOT_TEXT):
                self.id_bytes.append(b"")
                continue
            self.id_bytes.append(bytes(char_to_byte.get(c, 0x3F) for c in s))


@functools.lru_cache(maxsize=4)
def _load_vocabulary(path: str | None) -> _Vocabulary:
    if path is None:
        raw = importlib.resources.files(_PACKAGE).joinpath(_DEFAULT_VOCAB).read_bytes()
    else:
        with open(path, "rb") as f:
            raw = f.read()
    return _Vocabulary(raw)


def _merge_short(syms: list[int], rank: dict, merged_id: list[int]) -> list[int]:
    """BPE on a short word: rescan the pairs each round (fast for a few symbols)."""
    get = rank.get
    while len(syms) > 1:
        best = -1
        best_rank = 1 << 62
        prev = syms[0]
        for s in syms[1:]:
            r = get((prev, s))
            if r is not None and r < best_rank:
                best_rank = r
                best = prev
                best_right = s
            prev = s
        if best < 0:
            break
        new = merged_id[best_rank]
        out = []
        i = 0
        n = len(syms)
        while i < n:
            s = syms[i]
            if s == best and i + 1 < n and syms[i + 1] == best_right:
                out.append(new)
                i += 2
            else:
                out.append(s)
                i += 1
        syms = out
    return syms


def _merge_long(syms: list[int], rank: dict, merged_id: list[int], pair_of_rank: list) -> list[int]:
    """BPE on a long word in O(n log n): a heap of (rank, position) over a linked list.

    Same result as ``_merge_short``: all entries of the lowest rank are taken
    out of the heap together and merged left to right, skipping those that an
    earlier merge of the round overlapped or that are stale. A merge creates
    only pairs that contain the new symbol, which is longer than both halves,
    so no pair of the current rank can appear during its round.
    """
    n = len(syms)
    sym = list(syms)  # -1 marks a removed node
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    get = rank.get
    heap = []
    for i in range(n - 1):
        r = get((sym[i], sym[i + 1]))
        if r is not None:
            heap.append((r, i))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        r = heap[0][0]
        positions = []
        while heap and heap[0][0] == r:
            positions.append(pop(heap)[1])
        positions.sort()
        left, right = pair_of_rank[r]
        new = merged_id[r]
        done = []
        for i in positions:
            if sym[i] != left:
                continue
            j = nxt[i]
            if j < 0 or sym[j] != right:
                continue
            sym[i] = new
            sym[j] = -1
            k = nxt[j]
            nxt[i] = k
            if k >= 0:
                prv[k] = i
            done.append(i)
        for i in done:
            p = prv[i]
            if p >= 0:
                q = get((sym[p], new))
                if q is not None:
                    push(heap, (q, p))
            k = nxt[i]
            if k >= 0:
                q = get((new, sym[k]))
                if q is not None:
                    push(heap, (q, i))
    out = []
    i = 0
    while i >= 0:
        out.append(sym[i])
        i = nxt[i]
    return out


def _clean_to_words(text: str) -> tuple[list[str], bool]:
    """CLIP's text cleaning (see the module docstring), split at its spaces.

    Returns the space-separated words of the cleaned text and whether they are
    plain ASCII (then ``_ASCII_PIECES`` splits them exactly as ``_PIECES``).
    """
    if text.isascii() and _ASCII_NEEDS_FULL_CLEAN.search(text) is None:
        # ftfy.fix_text and html.unescape are the identity here (no '&'), and
        # str.split splits on exactly regex's \s for the characters left.
        return text.lower().split(), True
    try:
        text = ftfy.fix_text(text)
    except Exception:  # not known to happen; the tokenizer must stay total
        text = _SURROGATE.sub("\ufffd", text)
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE_RUN.sub(" ", text).strip().lower()
    return (text.split(" ") if text else []), False


def _as_str(text) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", errors="replace")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


class Tokenizer:
    """CLIP's byte-level BPE tokenizer (OpenAI's algorithm and vocabulary).

    ``Tokenizer()(texts, context_length=77)`` gives an int32 array of shape
    ``(len(texts), context_length)``: each row is ``[sot] + ids[:context_length
    - 2] + [eot]`` followed by zeros. ``encode`` gives the bare ids.

    Caches: a per-word BPE cache (keys are the space-separated words of cleaned
    text and the pieces they split into; bounded, first in first out) and a
    per-text LRU cache (bounded); both belong to the instance and are safe to
    use from several threads. Bounds: ``word_cache_size`` and
    ``text_cache_size`` (class attributes, may be set per instance). Instances
    pickle by their vocabulary path only.
    """

    sot_token = 49406
    eot_token = 49407
    vocab_size = 49408
    text_cache_size = 32768
    word_cache_size = 100_000

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        # An absolute path, so that a pickled tokenizer loads the same file anywhere.
        self.vocab_path = None if vocab_path is None else os.path.abspath(os.fspath(vocab_path))
        v = _load_vocabulary(self.vocab_path)
        self._vocab = v
        if v.size != type(self).vocab_size or v.sot != type(self).sot_token:
            # Another merges file: the special ids follow its merges.
            self.sot_token = v.sot
            self.eot_token = v.eot
            self.vocab_size = v.size
        self._words: dict[str, tuple[int, ...]] = {}
        self._texts: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __reduce__(self):
        return (type(self), (self.vocab_path,))

    # -- encoding ---------------------------------------------------------

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one piece of the split (a match of ``_PIECES``)."""
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:
            data = _SURROGATE.sub("\ufffd", piece).encode("utf-8")
        v = self._vocab
        byte_id = v.byte_id
        syms = [byte_id[b] for b in data[:-1]]
        syms.append(v.final_byte_id[data[-1]])
        if len(syms) < _LONG_WORD_BYTES:
            return tuple(_merge_short(syms, v.rank, v.merged_id))
        return tuple(_merge_long(syms, v.rank, v.merged_id, v.pair_of_rank))

    def _cached_ids(self, words: Iterable[str], ascii_only: bool) -> tuple[int, ...]:
        """Concatenated ids of words (or pieces), through the word cache."""
        get = self._words.get
        out: list[int] = []
        for word in words:
            word_ids = get(word)
            if word_ids is None:
                word_ids = self._word_ids(word, ascii_only)
            out += word_ids
        return tuple(out)

    def _word_ids(self, word: str, ascii_only: bool) -> tuple[int, ...]:
        """Ids of one space-separated word of cleaned text; fills the word cache.

        The cache maps a word to the concatenated ids of its pieces. A piece
        split on its own gives back itself, so words and pieces share the cache.
        """
        pieces = (_ASCII_PIECES if ascii_only else _PIECES).findall(word)
        if len(pieces) == 1 and pieces[0] == word:
            ids = self._bpe(word)
        else:
            ids = self._cached_ids(pieces, ascii_only)
        if len(word) <= _MAX_CACHED_WORD_CHARS:
            words = self._words
            with self._lock:
                if len(words) >= self.word_cache_size:
                    try:
                        del words[next(iter(words))]  # first in, first out
                    except (StopIteration, KeyError, RuntimeError):
                        words.clear()
                words[word] = ids
        return ids

    def _encode_str(self, text: str) -> tuple[int, ...]:
        cacheable = len(text) <= _MAX_CACHED_TEXT_CHARS
        if cacheable:
            cache = self._texts
            with self._lock:
                ids = cache.get(text)
                if ids is not None:
                    cache.move_to_end(text)
                    return ids
        words, ascii_only = _clean_to_words(text)
        ids = self._cached_ids(words, ascii_only)
        if cacheable:
            with self._lock:
                cache[text] = ids
                if len(cache) > self.text_cache_size:
                    cache.popitem(last=False)
        return ids

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text``, without start or end tokens."""
        return list(self._encode_str(_as_str(text)))

    def __call__(
        self, texts: str | bytes | Sequence[str | bytes], context_length: int = 77
    ) -> np.ndarray:
        """Padded batch: int32 ``(B, context_length)``, ``[sot] ids [eot] 0 ...``.

        A text longer than ``context_length - 2`` ids keeps its first
        ``context_length - 2`` ids, so the end token is always present.
        """
        length = int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length!r}")
        if isinstance(texts, (str, bytes, bytearray, memoryview)):
            texts = (texts,)
        elif not isinstance(texts, Sequence) and not isinstance(texts, np.ndarray):
            texts = list(texts) if isinstance(texts, Iterable) else [texts]
        room = length - 2
        out = np.zeros((len(texts), length), dtype=np.int32)
        out[:, 0] = self.sot_token
        eot = self.eot_token
        encode = self._encode_str
        for row, text in enumerate(texts):
            ids = encode(text if type(text) is str else _as_str(text))
            n = len(ids)
            if n > room:
                ids = ids[:room]
                n = room
            if n:
                out[row, 1 : n + 1] = ids
            out[row, n + 1] = eot
        return out

    # -- decoding ---------------------------------------------------------

    def decode(self, ids) -> str:
        """Text of a sequence of ids, as CLIP's decoder, minus specials and padding.

        Everything from the first end token on is padding; start tokens,
        trailing zeros and ids outside the vocabulary are dropped. As in CLIP,
        each end of word becomes a space ("a cat." -> "a cat . "); the result
        is stripped ("a cat .").
        """
        arr = np.asarray(ids)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise ValueError(f"decode takes one sequence of ids, got shape {arr.shape}")
        seq = [int(i) for i in arr.tolist()]
        if self.eot_token in seq:
            seq = seq[: seq.index(self.eot_token)]
        while seq and seq[-1] == 0:
            seq.pop()
        id_bytes = self._vocab.id_bytes
        size = len(id_bytes)
        data = b"".join(id_bytes[i] for i in seq if 0 <= i < size)
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()
