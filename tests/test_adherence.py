"""Tests of the analytic adherence scorer (dalle_jax/metrics/adherence.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalle_jax.data import shapes as S
from dalle_jax.metrics import adherence as A

SIZES = (32, 64, 128)
PER_SPLIT = 200  # examples per split and size: 400 per size


@pytest.fixture(scope="module")
def scored():
    """{size: [(split, index, caption, result)]} for the ground truth."""
    out = {}
    for size in SIZES:
        rows = []
        for split in S.SPLITS:
            for i in range(PER_SPLIT):
                image, caption = S.example(i, split, 0, size)
                rows.append((split, i, caption, A.score(image, caption)))
        out[size] = rows
    return out


def _wrong_captions(caption: str) -> list[tuple[str, str]]:
    """(kind, caption) for every caption that differs from the true one in one attribute."""
    out = []
    for attribute in S.ATTRIBUTES:
        out += [(attribute, v) for v in S.caption_variants(caption, attribute)[1:]]
    if len(S.parse_caption(caption).objects) == 2:
        out.append(("swap", S.swap_colours(caption)[1]))
        out.append(("reverse", S.reverse_relation(caption)[1]))
    return out


@pytest.mark.parametrize("size", SIZES)
def test_ground_truth_accepted(scored, size):
    rows = scored[size]
    assert len(rows) >= 300
    bad = [(split, i, c, r.checks) for split, i, c, r in rows if not r.ok]
    assert 1 - len(bad) / len(rows) >= 0.99, bad[:10]
    for split in S.SPLITS:
        sub = [r for s, _, _, r in rows if s == split]
        assert sum(r.ok for r in sub) / len(sub) >= 0.99, split
    # Held-out pairs are read back as well as the others.
    held = [r for s, _, c, r in rows if s == "eval"
            and any((o.colour, o.shape) in S.HELD_OUT for o in S.parse_caption(c).objects)]
    assert len(held) > 50 and sum(r.ok for r in held) / len(held) >= 0.99


@pytest.mark.parametrize("size", SIZES)
def test_wrong_captions_rejected(scored, size):
    rejected = Counter()
    total = Counter()
    for _, _, caption, result in scored[size]:
        for kind, wrong in _wrong_captions(caption):
            total[kind] += 1
            rejected[kind] += not A.check(result.found, wrong).ok
    assert set(total) == set(S.ATTRIBUTES) | {"swap", "reverse"}
    for kind in total:
        assert rejected[kind] / total[kind] >= 0.98, (kind, rejected[kind], total[kind])


def test_score_equals_check_of_analyse():
    """The rejection test above uses check(found, caption); score() must agree with it."""
    for i in range(12):
        image, caption = S.example(i, "eval", 0, 32)
        found = A.analyse(image)
        for _, wrong in [("truth", caption)] + _wrong_captions(caption)[::5]:
            assert A.score(image, wrong).ok == A.check(found, wrong).ok
            assert A.score(image, wrong).checks == A.check(found, wrong).checks


def test_found_reads_the_scene_back():
    for i in range(30):
        sc = S.scene(i, "eval")
        image = S.render(sc, 64)
        found = A.score(image, sc.caption).found
        assert found["background"] == sc.background
        objs = sorted(found["objects"], key=lambda o: o["cx"] + o["cy"])
        truth = sorted(sc.objects, key=lambda o: o.cx + o.cy)
        assert len(objs) == len(truth)
        for got, want in zip(objs, truth):
            assert (got["colour"], got["shape"], got["size"], got["position"]) == (
                want.colour, want.shape, want.size_name, want.position)
            assert got["width"] == pytest.approx(want.size_frac, abs=0.02)
            assert got["cx"] == pytest.approx(want.cx, abs=0.02)
            assert got["cy"] == pytest.approx(want.cy, abs=0.02)


def test_checks_keys():
    image, caption = S.example(3, "eval", 0, 64)  # "a large purple circle in the bottom right on ..."
    result = A.score(image, caption)
    assert set(result.checks) == {"colour", "shape", "size", "position", "background", "count"}
    result = A.score(image, "a purple circle")
    assert result.ok and set(result.checks) == {"colour", "shape", "background", "count"}
    image, caption = S.example(1, "eval", 0, 64)  # a two-object scene
    result = A.score(image, caption)
    assert result.ok and set(result.checks) == {"object1", "object2", "relation", "background", "count"}


def test_two_objects_required():
    """A one-object caption on a two-object image fails on the count, and vice versa."""
    sc = S.scene(1, "eval")
    assert len(sc.objects) == 2
    image = S.render(sc, 64)
    a = sc.objects[0]
    assert not A.score(image, f"a {a.colour} {a.shape}").ok
    single = S.Scene(sc.background, (a,), "", None, frozenset())
    assert not A.score(S.render(single, 64), sc.caption).ok


CAPTIONS = [
    "a red circle",
    "a large red square in the center",
    "a small blue star at the top on a black background",
    "a red square to the left of a blue circle",
    "a green diamond above a pink triangle",
]


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_degenerate_images_rejected(size):
    rng = np.random.default_rng(size)
    images = {
        "black": np.zeros((size, size, 3), np.uint8),
        "white": np.full((size, size, 3), 255, np.uint8),
        "gray": np.full((size, size, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "gray noise": np.clip(rng.normal(128, 60, (size, size, 3)), 0, 255).astype(np.uint8),
    }
    for name, rgb in S.COLOURS.items():
        images[name] = np.full((size, size, 3), rgb, np.uint8)
    for name, image in images.items():
        for caption in CAPTIONS + [f"a {c} square" for c in S.COLOURS]:
            assert not A.score(image, caption).ok, (name, caption)


def test_unparseable_caption():
    image, caption = S.example(0, "train", 0, 32)
    for bad in ("", "a photo of a cat", caption + " and a dog", "a red"):
        result = A.score(image, bad)
        assert result.ok is False and result.checks == {"caption": False}


def test_malformed_images():
    for bad in (np.zeros((8, 8)), np.zeros((32, 32, 1)), np.zeros((2, 2, 3)), "not an image"):
        assert A.score(bad, "a red circle").ok is False


def test_batch_and_accuracy():
    images, captions = S.examples(range(20), "train", 0, 32)
    results = A.score_batch(images, captions)
    assert len(results) == 20 and all(r.ok for r in results)
    assert A.accuracy(images, captions) == 1.0
    wrong = [S.caption_variants(c, "shape")[1] for c in captions]
    assert A.accuracy(images, wrong) == 0.0
    assert A.accuracy(images[:0], []) == 0.0
    with pytest.raises(ValueError):
        A.score_batch(images, captions[:3])


def test_one_object_shape_rates_name_the_shape_that_fails():
    """Every one-object picture scored against its own caption, then the stars' captions
    swapped for another shape: only "star" (and its sizes) drop to 0, the others stay at 1."""
    images, captions = S.examples(range(80), "eval", 0, 32)
    one = [(im, c) for im, c in zip(images, captions) if len(S.parse_caption(c).objects) == 1]
    images, captions = np.stack([im for im, _ in one]), [c for _, c in one]
    rates = A.one_object_shape_rates(A.score_batch(images, captions), captions)
    assert set(rates) >= {"circle", "star", "square"} and all(v == 1.0 for v in rates.values())
    wrong = [S.caption_variants(c, "shape")[1] if S.parse_caption(c).objects[0].shape == "star"
             else c for c in captions]
    rates = A.one_object_shape_rates(A.score_batch(images, wrong), captions)
    assert rates["star"] == 0.0 and rates["circle"] == 1.0
    assert all(v == (0.0 if k.startswith("star") else 1.0) for k, v in rates.items()), rates
    assert any(k.startswith("star, ") for k in rates)  # sizes, where stated


def test_two_object_check_rates_single_out_the_relation():
    """Two-object pictures scored against captions with the relation reversed: both objects
    are still found, only the relation check fails; one-object captions are left out."""
    images, captions = S.examples(range(60), "eval", 0, 32)
    two = [i for i, c in enumerate(captions) if len(S.parse_caption(c).objects) == 2]
    assert len(two) >= 5
    rates = A.check_rates(A.score_batch(images, captions), captions, 2)
    assert set(rates) == {"object1", "object2", "relation", "count", "background"}
    assert all(v == 1.0 for v in rates.values()), rates
    reversed_ = [S.reverse_relation(c)[1] if i in two else c for i, c in enumerate(captions)]
    rates = A.check_rates(A.score_batch(images, reversed_), reversed_, 2)
    assert rates["relation"] == 0.0
    assert rates["object1"] == rates["object2"] == rates["count"] == 1.0


def test_float_images_accepted():
    image, caption = S.example(4, "eval", 0, 64)
    assert A.score(image.astype(np.float32) / 255.0, caption).ok
    assert A.score(image.astype(np.int64), caption).ok


_some_captions = [S.scene(i, "eval").caption for i in range(40)]


@st.composite
def images(draw):
    size = draw(st.integers(16, 40))
    kind = draw(st.sampled_from(["noise", "flat", "blocks", "shapes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if kind == "flat":
        return np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    if kind == "blocks":
        cells = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        return np.kron(cells, np.ones((size // 4 + 1, size // 4 + 1, 1), np.uint8))[:size, :size]
    image = S.example(int(rng.integers(1000)), "eval", 0, size)[0].copy()
    noise = rng.integers(-40, 41, image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images(), st.one_of(st.text(max_size=40), st.sampled_from(_some_captions)))
def test_never_raises(image, caption):
    result = A.score(image, caption)
    assert isinstance(result.ok, bool) and isinstance(result.checks, dict)
    assert "error" not in result.found or result.found["error"] == "not a shapes caption"
