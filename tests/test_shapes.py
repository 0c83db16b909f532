"""Tests of the captioned-shapes dataset (dalle_jax/data/shapes.py) against docs/SHAPES.md."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_jax.data import shapes as S

N_SCENES = 1500  # per split, for the property tests below


@pytest.fixture(scope="module")
def scenes():
    return {split: [S.scene(i, split) for i in range(N_SCENES)] for split in S.SPLITS}


def all_scenes(scenes):
    return scenes["train"] + scenes["eval"]


# ---------------------------------------------------------------------------------------------
# Golden value.

# SHA-256 of the bytes of example(i, "train", 0, 64)[0] for i = 0..4, concatenated. Changing
# it means a new dataset version: every stored sample, score and checkpoint trained on the old
# data stops being comparable. Update it only on purpose (and say so in the changelog).
GOLDEN_SHA256 = "6215375dd2280fd0023d9a38711e6271f3cac48a7b7a420cf039420f8f0a9bd8"
GOLDEN_CAPTIONS = [
    "a blue circle above a red circle",
    "a large yellow diamond on the right on a gray background",
    "a large purple triangle in the center",
    "a cyan square",
    "a pink diamond",
]


def test_golden():
    digest = hashlib.sha256()
    captions = []
    for i in range(5):
        image, caption = S.example(i, "train", 0, 64)
        digest.update(image.tobytes())
        captions.append(caption)
    assert captions == GOLDEN_CAPTIONS
    assert digest.hexdigest() == GOLDEN_SHA256


# ---------------------------------------------------------------------------------------------
# Determinism.


def test_determinism():
    for split in S.SPLITS:
        for i in (0, 1, 7, 12345):
            a, ca = S.example(i, split, 3, 64)
            b, cb = S.example(i, split, 3, 64)
            assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
            assert a.tobytes() == b.tobytes() and ca == cb
            assert S.scene(i, split, 3) == S.scene(i, split, 3)
            # The scene (hence the caption) does not depend on the canvas size.
            for size in (32, 128):
                image, caption = S.example(i, split, 3, size)
                assert image.shape == (size, size, 3) and caption == ca


def test_seed_split_index_matter():
    base = S.scene(5, "train", 0)
    assert S.scene(5, "train", 1) != base
    assert S.scene(5, "eval", 0) != base
    assert S.scene(6, "train", 0) != base
    # Many distinct scenes.
    assert len({S.scene(i).objects for i in range(200)}) == 200


def test_bad_arguments():
    with pytest.raises(ValueError):
        S.scene(0, "test")
    with pytest.raises(ValueError):
        S.scene(-1)


def test_examples_batch():
    images, captions = S.examples(range(3, 9), "eval", 2, 32)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    for n, i in enumerate(range(3, 9)):
        image, caption = S.example(i, "eval", 2, 32)
        assert np.array_equal(images[n], image) and captions[n] == caption


# ---------------------------------------------------------------------------------------------
# Held-out pairs and the split mix.


def test_train_never_holds_out_pairs():
    for i in range(20_000):
        sc = S.scene(i, "train")
        for o in sc.objects:
            assert (o.colour, o.shape) not in S.HELD_OUT, (i, sc.caption)
        parsed = S.parse_caption(sc.caption)
        for o in parsed.objects:
            assert (o.colour, o.shape) not in S.HELD_OUT, (i, sc.caption)


def test_eval_holds_out_pairs(scenes):
    one = [sc for sc in scenes["eval"] if len(sc.objects) == 1]
    held = [sc for sc in one if (sc.objects[0].colour, sc.objects[0].shape) in S.HELD_OUT]
    assert len(held) / len(one) >= 0.45  # 0.5 forced + 0.5 * 4/40 expected
    assert {(sc.objects[0].colour, sc.objects[0].shape) for sc in held} == set(S.HELD_OUT)
    two = [sc for sc in scenes["eval"] if len(sc.objects) == 2]
    two_held = [sc for sc in two if any((o.colour, o.shape) in S.HELD_OUT for o in sc.objects)]
    assert len(two_held) / len(two) >= 0.4
    # The non-held-out pairs occur in eval too.
    assert len({(o.colour, o.shape) for sc in scenes["eval"] for o in sc.objects}) == 40


def test_mix(scenes):
    for split in S.SPLITS:
        scs = scenes[split]
        two = sum(len(sc.objects) == 2 for sc in scs) / len(scs)
        assert 0.25 < two < 0.35
        one = [sc for sc in scs if len(sc.objects) == 1]
        for attribute, p in (("size", 0.7), ("position", 0.7), ("background", 0.5)):
            frac = sum(attribute in sc.stated for sc in one) / len(one)
            assert abs(frac - p) < 0.06, (split, attribute, frac)
        assert {sc.background for sc in scs} == set(S.BACKGROUNDS)
        assert {o.shape for sc in scs for o in sc.objects} == set(S.SHAPES)
        assert {o.colour for sc in scs for o in sc.objects} == set(S.COLOURS)
        assert {(o.row, o.col) for sc in one for o in sc.objects} == set(S.POSITIONS.values())


# ---------------------------------------------------------------------------------------------
# Geometry.


def test_objects_geometry(scenes):
    for sc in all_scenes(scenes):
        assert sc.background in S.BACKGROUNDS
        assert len(sc.objects) in (1, 2)
        for o in sc.objects:
            base = S.SIZES[o.size_name]
            assert 0.95 * base <= o.size_frac <= 1.05 * base
            hw = o.size_frac / 2
            hh = o.size_frac * S.HEIGHT_RATIO[o.shape] / 2
            x0, y0, x1, y1 = o.bbox()
            assert 0.0 <= x0 and x1 <= 1.0 and 0.0 <= y0 and y1 <= 1.0
            # Cell centre + jitter, then moved inward just enough (clipped to [hw, 1 - hw]).
            for centre, cell, half in ((o.cx, o.col, hw), (o.cy, o.row, hh)):
                c = (2 * cell + 1) / 6
                lo = min(max(c - 0.04, half), 1 - half)
                hi = min(max(c + 0.04, half), 1 - half)
                assert lo - 1e-12 <= centre <= hi + 1e-12
            assert S.POSITIONS[o.position] == (o.row, o.col)


def test_large_edge_objects_touch_the_edge():
    touching = 0
    for i in range(300):
        for o in S.scene(i).objects:
            if o.size_name == "large" and o.col == 0:
                assert o.bbox()[0] == pytest.approx(0.0, abs=1e-12)
                touching += 1
    assert touching > 0


def test_two_object_scenes(scenes):
    n = 0
    for sc in all_scenes(scenes):
        if len(sc.objects) != 2:
            assert sc.relation is None
            continue
        n += 1
        a, b = sc.objects
        assert a.size_name == b.size_name == "small"
        assert a.colour != b.colour
        assert sc.relation in S.RELATIONS and "background" not in sc.stated
        ax0, ay0, ax1, ay1 = a.bbox()
        bx0, by0, bx1, by1 = b.bbox()
        assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0  # disjoint
        if sc.relation == "to the left of":
            assert a.row == b.row and a.col < b.col
        elif sc.relation == "to the right of":
            assert a.row == b.row and a.col > b.col
        elif sc.relation == "above":
            assert a.col == b.col and a.row < b.row
        else:
            assert a.col == b.col and a.row > b.row
    assert n > 500


def _inradius(shape: str, w: float) -> tuple[float, float]:
    """(radius of a disc inside the shape, offset of its centre below the bbox centre)."""
    if shape in ("circle", "square"):
        return w / 2, 0.0
    if shape == "diamond":
        return w / (2 * math.sqrt(2)), 0.0
    if shape == "triangle":
        return w / (2 * math.sqrt(3)), w * math.sqrt(3) / 2 / 6  # incentre = centroid
    # Star: distance from the circumcentre to the line tip (90 deg) -> inner vertex (126 deg).
    big = w / (2 * math.sin(math.radians(72)))
    small = 0.45 * big
    tip = np.array([0.0, big])
    inner = small * np.array([math.cos(math.radians(126)), math.sin(math.radians(126))])
    edge = inner - tip
    dist = abs(edge[0] * tip[1] - edge[1] * tip[0]) / np.hypot(*edge)
    h = big * (1 + math.cos(math.radians(36)))
    return dist, big - h / 2


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_pixels(size):
    """Pixels well inside an object have its exact colour; pixels well away from every object
    have the exact background colour."""
    centres = np.arange(size) + 0.5
    interior_seen = 0
    for i in range(40):
        sc = S.scene(i, "eval")
        image = S.render(sc, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        far = np.ones((size, size), dtype=bool)
        for o in sc.objects:
            w = o.size_frac * size
            r, off = _inradius(o.shape, w)
            cx, cy = o.cx * size, o.cy * size + off
            d = np.hypot(centres[None, :] - cx, centres[:, None] - cy)
            interior = d <= r - 0.75  # the pixel's whole square lies inside the disc
            interior_seen += int(interior.sum())
            assert (image[interior] == S.COLOURS[o.colour]).all(), (i, o)
            x0, y0, x1, y1 = (v * size for v in o.bbox())
            near_x = (centres >= x0 - 1) & (centres <= x1 + 1)
            near_y = (centres >= y0 - 1) & (centres <= y1 + 1)
            far &= ~(near_y[:, None] & near_x[None, :])
        assert (image[far] == S.BACKGROUNDS[sc.background]).all(), i
    assert interior_seen > 0


def test_render_crops_match_whole_canvas():
    """The region-wise renderer gives the bytes of Pillow's BOX filter on the whole 4x canvas."""
    for size in (32, 64):
        for i in range(25):
            sc = S.scene(i, "eval")
            assert np.array_equal(S.render(sc, size), S.render_full(sc, size))


def test_box_downsample_of_a_64px_picture_is_near_the_32px_rendering():
    """A decoder drawing at 64 px is read by a 32 px CLIP through images.box_downsample. Both
    that and the 32 px rendering average a finer drawing (the 64 px one 8 x 8 samples a pixel,
    the 32 px one 4 x 4), so they agree but for antialiased edges: a stride or an axis mix-up
    would miss whole edges (a stride differs by up to 147 levels here)."""
    from dalle_jax import images as images_lib
    errors = []
    for i in range(20):
        sc = S.scene(i, "train")
        big, small = S.render(sc, 64).astype(np.float32), S.render(sc, 32).astype(np.float32)
        down = images_lib.box_downsample(big, 32)
        assert down.shape == (32, 32, 3)
        errors.append(np.abs(down - small))
        assert images_lib.box_downsample(big[None], 32).shape == (1, 32, 32, 3)  # batched
    assert max(e.max() for e in errors) <= 32  # measured 28.5: two of 16 edge samples
    assert np.mean(errors) < 0.25              # measured 0.16 levels of 255
    assert images_lib.box_downsample(small, 32) is small
    with pytest.raises(ValueError, match="whole multiple"):
        images_lib.box_downsample(np.zeros((48, 48, 3)), 32)


def test_render_shapes_areas():
    """Rendered coverage matches each shape's analytic area (a check of the geometry)."""
    for shape in S.SHAPES:
        for colour, bg in (("red", "white"), ("cyan", "black")):
            obj = S.Obj(colour, shape, "large", 0.42, 1, 1, 0.5, 0.5)
            image = S.render(S.Scene(bg, (obj,), "", None, frozenset()), 128).astype(np.float64)
            fg = np.array(S.COLOURS[colour], dtype=np.float64)
            bgc = np.array(S.BACKGROUNDS[bg], dtype=np.float64)
            alpha = ((image - bgc) @ (fg - bgc)) / ((fg - bgc) @ (fg - bgc))
            area = alpha.sum() / 128**2
            assert area == pytest.approx(S.AREA_RATIO[shape] * 0.42**2, rel=0.01), shape
            # The bounding box: width 0.42, height as the contract says, centred.
            cols = np.nonzero((alpha > 0.02).any(axis=0))[0]
            rows = np.nonzero((alpha > 0.02).any(axis=1))[0]
            assert (cols[-1] + 1 - cols[0]) / 128 == pytest.approx(0.42, abs=2 / 128)
            height = 0.42 * S.HEIGHT_RATIO[shape]
            assert (rows[-1] + 1 - rows[0]) / 128 == pytest.approx(height, abs=2 / 128)
            assert (rows[-1] + 1 + rows[0]) / 2 / 128 == pytest.approx(0.5, abs=1 / 128)


def test_star_geometry_constants():
    assert S.HEIGHT_RATIO["star"] == pytest.approx(
        (1 + math.cos(math.radians(36))) / (2 * math.sin(math.radians(72)))
    )
    assert S.HEIGHT_RATIO["triangle"] == pytest.approx(math.sqrt(3) / 2)


# ---------------------------------------------------------------------------------------------
# Captions.

_WORD = re.compile(r"^[a-z]+$")


def test_caption_grammar(scenes):
    for sc in all_scenes(scenes):
        c = sc.caption
        assert c == c.lower() and c.isascii() and c == c.strip()
        assert not c.endswith(".") and "  " not in c
        words = c.split()
        assert all(_WORD.match(w) for w in words)
        for k, word in enumerate(words[:-1]):
            if word in ("a", "an"):
                assert word == ("an" if words[k + 1][0] in "aeiou" else "a"), c
        assert S.caption_of(sc) == c
        o = sc.objects[0]
        if len(sc.objects) == 1:
            expected = " ".join(
                ([o.size_name] if "size" in sc.stated else []) + [o.colour, o.shape]
            )
            assert c.startswith(("a ", "an ")) and c.split(" ", 1)[1].startswith(expected)
            assert (o.position in c) == ("position" in sc.stated)
            assert c.endswith(f" on a {sc.background} background") == ("background" in sc.stated)
        else:
            b = sc.objects[1]
            assert c.endswith(f"{b.colour} {b.shape}") and f" {sc.relation} " in c
    assert S.caption_of(
        S.Scene("black", (S.Obj("orange", "star", "small", 0.22, 0, 0, 0.2, 0.2),), "", None,
                frozenset({"colour", "shape"})),
    ) == "an orange star"


def test_parse_round_trip(scenes):
    for sc in all_scenes(scenes):
        parsed = S.parse_caption(sc.caption)
        assert parsed == S.parsed_of(sc)
        assert S.format_caption(parsed) == sc.caption
    # Lenient about case, white space, a trailing period.
    assert S.parse_caption("  A Large  RED circle in the top left. ") == S.parse_caption(
        "a large red circle in the top left"
    )
    for bad in ("", "a", "a red", "a red circle in the middle", "a purple blob",
                "a red circle to the left of", "a red circle above a red", "two red circles",
                "a red circle on a pink background", "a large red circle small"):
        assert S.parse_caption(bad) is None, bad
    assert S.parse_caption(None) is None  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises(text):
    result = S.parse_caption(text)
    assert result is None or isinstance(result, S.ParsedCaption)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 60), st.text(max_size=5))
def test_parse_never_raises_on_mutations(index, cut, junk):
    caption = S.scene(index, "eval").caption
    for text in (caption[:cut] + junk + caption[cut:], caption[:cut], caption + junk):
        result = S.parse_caption(text)
        assert result is None or isinstance(result, S.ParsedCaption)


def _diff_fields(p: S.ParsedCaption, q: S.ParsedCaption) -> set[str]:
    out = set()
    if p.background != q.background:
        out.add("background")
    if p.relation != q.relation:
        out.add("relation")
    for k, (a, b) in enumerate(zip(p.objects, q.objects)):
        for name in ("colour", "shape", "size", "position"):
            if getattr(a, name) != getattr(b, name):
                out.add(f"{name}{k + 1}")
    return out


def test_caption_variants(scenes):
    n_values = {"colour": 8, "shape": 5, "size": 2, "position": 9, "background": 3}
    for sc in all_scenes(scenes)[::7]:
        original = S.parse_caption(sc.caption)
        two = len(sc.objects) == 2
        for attribute in S.ATTRIBUTES:
            variants = S.caption_variants(sc.caption, attribute)
            assert variants[0] == sc.caption
            assert len(set(variants)) == len(variants)
            stated = attribute in ("colour", "shape") or (not two and attribute in sc.stated)
            if not stated:
                assert variants == [sc.caption]
                continue
            expected = n_values[attribute] - 1 - (1 if two and attribute == "colour" else 0)
            assert len(variants) == 1 + expected
            for v in variants[1:]:
                parsed = S.parse_caption(v)
                assert parsed is not None and S.format_caption(parsed) == v, v
                field = attribute if attribute == "background" else f"{attribute}1"
                assert _diff_fields(original, parsed) == {field}, (sc.caption, v)
                if two:
                    assert parsed.objects[0].colour != parsed.objects[1].colour
    assert "an orange circle" in S.caption_variants("a red circle", "colour")
    assert "a small orange circle" in S.caption_variants("a small red circle", "colour")
    assert S.caption_variants("an orange circle", "colour")[1] == "a red circle"
    with pytest.raises(ValueError):
        S.caption_variants("a red circle", "texture")
    with pytest.raises(ValueError):
        S.caption_variants("not a caption", "colour")


def test_swap_and_reverse(scenes):
    n = 0
    for sc in all_scenes(scenes):
        if len(sc.objects) != 2:
            with pytest.raises(ValueError):
                S.swap_colours(sc.caption)
            with pytest.raises(ValueError):
                S.reverse_relation(sc.caption)
            continue
        n += 1
        p = S.parse_caption(sc.caption)
        out = S.swap_colours(sc.caption)
        assert out[0] == sc.caption and len(out) == 2
        q = S.parse_caption(out[1])
        assert q is not None and S.format_caption(q) == out[1]
        assert _diff_fields(p, q) == {"colour1", "colour2"}
        assert (q.objects[0].colour, q.objects[1].colour) == (p.objects[1].colour, p.objects[0].colour)
        out = S.reverse_relation(sc.caption)
        assert out[0] == sc.caption and len(out) == 2
        q = S.parse_caption(out[1])
        assert _diff_fields(p, q) == {"relation"}
        assert S.reverse_relation(out[1])[1] == sc.caption
    assert n > 0
    assert S.swap_colours("a red star above an orange circle")[1] == "an orange star above a red circle"
    assert S.reverse_relation("a red star to the left of a blue circle")[1] == (
        "a red star to the right of a blue circle"
    )


# ---------------------------------------------------------------------------------------------
# Counterfactual scenes (the minimal pairs of a contrastive batch).


def test_counterfactual_changes_one_hard_attribute_and_draws_it():
    from dalle_jax.metrics import adherence

    kinds = set()
    for i in range(120):
        sc = S.scene(i, "train")
        cf = S.counterfactual(sc, np.random.default_rng(i))
        assert cf.caption != sc.caption and cf.background == sc.background
        assert not any(S.is_held_out(o.colour, o.shape) for o in cf.objects)
        before, after = S.parse_caption(sc.caption), S.parse_caption(cf.caption)
        if len(sc.objects) == 1:
            a, b = before.objects[0], after.objects[0]
            assert (a.colour, a.size, a.position, before.background) == (
                b.colour, b.size, b.position, after.background)
            assert a.shape != b.shape
            kinds.add("shape")
        elif after.relation != before.relation:
            assert after.objects == before.objects and S.reverse_relation(sc.caption)[1] == cf.caption
            kinds.add("relation")
        elif [o.shape for o in after.objects] == [o.shape for o in before.objects]:
            assert S.swap_colours(sc.caption)[1] == cf.caption
            kinds.add("swap")
        else:
            changed = [x != y for x, y in zip(before.objects, after.objects)]
            assert sum(changed) == 1
            kinds.add("two-object shape")
        # The picture shows the new caption, not the old one.
        picture = S.render(cf, 64)
        assert adherence.score(picture, cf.caption).ok, (i, cf.caption)
        assert not adherence.score(picture, sc.caption).ok, (i, sc.caption)
    assert kinds == {"shape", "relation", "swap", "two-object shape"}


def test_counterfactual_of_a_held_out_eval_scene():
    held = next(sc for sc in (S.scene(i, "eval") for i in range(200))
                if len(sc.objects) == 1 and S.is_held_out(sc.objects[0].colour, sc.objects[0].shape))
    cf = S.counterfactual(held, np.random.default_rng(0))
    assert not S.is_held_out(cf.objects[0].colour, cf.objects[0].shape)
    allowed = [S.counterfactual(held, np.random.default_rng(s), allow_held_out=True)
               for s in range(20)]
    assert {o.objects[0].shape for o in allowed} == set(S.SHAPES) - {held.objects[0].shape}
