"""Property tests: the tokenizer and the adherence scorer's caption parser take any string.

Prompts come from users and captions from data files, so both must be total: no exception for
unicode of any category, control and format characters, or strings far past any context
length; and where they accept a string they must give the answer the rest of the system relies
on (rows laid out as [sot] ids [eot] 0..., a caption read back as what it states). The
strategies lean on what generic text() rarely draws: runs of control characters, long strings
(past the tokenizer's text cache, through its long-word merge loop) and captions with noise.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalle_jax.data import shapes as S
from dalle_jax.metrics import adherence as A
from dalle_jax.tokenizer import Tokenizer

TOK = Tokenizer()
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)  # all but surrogates
CONTROL = st.characters(categories=("Cc", "Cf", "Zs", "Zl", "Zp", "Mn"))
WORDS = st.sampled_from(["a", "red", "circle", "on", "the", "top", "left", "blue", "star",
                         "&amp;", "<|endoftext|>", "ünïcödé", "🙂", "x" * 40])
MIXED = st.lists(st.one_of(CONTROL, WORDS, UNICODE), max_size=30).map("".join)
LONG = st.one_of(
    st.tuples(MIXED, st.integers(20, 400)).map(lambda t: (t[0] * t[1])[:20_000]),
    st.tuples(st.sampled_from("abxyz"), st.integers(100, 5000)).map(lambda t: t[0] * t[1]),
)
ANY = st.one_of(UNICODE, MIXED, LONG)


@SETTINGS
@given(ANY, st.integers(2, 80))
def test_tokenizer_takes_any_string(text, context_length):
    ids = TOK.encode(text)
    assert all(isinstance(i, int) and 0 <= i < TOK.vocab_size for i in ids)
    assert TOK.encode(text) == ids  # the caches give the same answer twice
    assert TOK.encode(text.encode("utf-8")) == ids  # bytes are their UTF-8 text
    row = TOK([text], context_length)[0]
    n = min(len(ids), context_length - 2)
    assert row.dtype == np.int32 and row.shape == (context_length,)
    assert row[0] == TOK.sot_token and row[n + 1] == TOK.eot_token
    assert row[1:n + 1].tolist() == ids[:n] and not row[n + 2:].any()


@SETTINGS
@given(st.lists(ANY, min_size=1, max_size=6), st.integers(2, 30))
def test_tokenizer_rows_do_not_depend_on_their_batch(texts, context_length):
    batch = TOK(texts, context_length)
    for text, row in zip(texts, batch):
        np.testing.assert_array_equal(row, TOK([text], context_length)[0])


PLAIN_WORD = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz"), min_size=1, max_size=30)


@SETTINGS
@given(st.lists(PLAIN_WORD, min_size=1, max_size=400),
       st.lists(st.sampled_from([" ", "  ", "\t", "\n", " \r\n "]), min_size=1, max_size=4))
def test_long_plain_text_is_its_words_and_decodes_back(words, separators):
    """Lower-case words split only at white space, so a text of any length (cached or not)
    encodes as its words one by one and decodes back to them."""
    text = "".join(w + separators[i % len(separators)] for i, w in enumerate(words))
    ids = TOK.encode(text)
    assert ids == [i for w in words for i in TOK.encode(w)]
    assert TOK.decode(ids) == " ".join(words)


@SETTINGS
@given(ANY)
def test_caption_parser_takes_any_string(text):
    parsed = S.parse_caption(text)
    assert parsed is None or isinstance(parsed, S.ParsedCaption)
    if parsed is not None:  # what it reads, it reads the same in canonical form
        assert S.parse_caption(S.format_caption(parsed)) == parsed


def _noisy(draw, caption: str) -> str:
    words = caption.split(" ")
    spaces = draw(st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\u3000", "\x1f"]),
                           min_size=len(words), max_size=len(words)))
    upper = draw(st.lists(st.booleans(), min_size=len(words), max_size=len(words)))
    text = "".join((w.upper() if u else w) + s for w, s, u in zip(words, spaces, upper))
    return draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.sampled_from(["", ".", ". "]))


@st.composite
def noisy_captions(draw):
    scene = S.scene(draw(st.integers(0, 10 ** 6)), draw(st.sampled_from(["train", "eval"])))
    return scene, _noisy(draw, S.caption_of(scene))


@SETTINGS
@given(noisy_captions(), st.text(st.characters(exclude_categories=("Cs",)), min_size=1,
                                 max_size=3).filter(lambda s: s.strip(" .") != ""))
def test_captions_read_back_through_noise_and_not_through_junk(scene_and_text, junk):
    scene, text = scene_and_text
    assert S.parse_caption(text) == S.parsed_of(scene)
    assert S.parse_caption(text + " " + junk + "x") is None  # a word more is not a caption


FOUND = A.analyse(S.example(3, "eval", 0, 32)[0])


@SETTINGS
@given(st.one_of(ANY, noisy_captions().map(lambda t: t[1])))
def test_adherence_check_takes_any_caption(text):
    result = A._check(FOUND, text)  # the unguarded check: a bug here is not swallowed
    assert isinstance(result.ok, bool) and all(isinstance(v, bool) for v in result.checks.values())
    if S.parse_caption(text) is None:
        assert not result.ok and result.checks == {"caption": False}
    summary = A.summary([result], [text])
    assert sum(summary[k] for k in summary if k.startswith("n_")) == (
        S.parse_caption(text) is not None)
