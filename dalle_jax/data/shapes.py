"""The captioned-shapes dataset (see ``docs/SHAPES.md``; every number there is binding).

A procedurally generated text-to-image dataset: coloured shapes on a flat background with an
exact caption, so that prompt adherence can be scored analytically
(:mod:`dalle_jax.metrics.adherence`).

The dataset is a pure function of ``(seed, split, index)``. Each example draws from its own
``np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))``, so examples can be
generated in any order, in parallel, and an epoch of any length can be re-created exactly. The
structured :class:`Scene` never depends on the canvas size; only :func:`render` does.

Public API::

    example(index, split="train", seed=0, size=64) -> (uint8 [size, size, 3], caption)
    examples(indices, split="train", seed=0, size=64) -> (uint8 [N, size, size, 3], [caption])
    scene(index, split="train", seed=0) -> Scene
    render(scene, size=64) -> uint8 [size, size, 3]
    caption_of(scene) -> str
    parse_caption(caption) -> ParsedCaption | None      # never raises
    format_caption(parsed) -> str
    caption_variants(caption, attribute) -> [str]        # the caption first
    swap_colours(caption) -> [str]
    reverse_relation(caption) -> [str]

The mix of scenes (the contract leaves it open; this is version 1 of the generator):

* Both splits: 70% one-object scenes, 30% two-object scenes. Backgrounds are uniform.
* One-object scenes: colour, shape, size, grid cell uniform; the caption states the size with
  probability 0.7, the position with probability 0.7 and the background with probability 0.5
  (independently). Unstated attributes are still drawn at random.
* Two-object scenes: both small, colours different, shapes independent, relation uniform over
  the four; for left/right a random row and two different columns, for above/below a random
  column and two different rows; the background is random and never stated.
* ``"train"``: no object is ever a held-out colour-shape pair (rejection sampling, so the 36
  remaining pairs are uniform).
* ``"eval"``: a one-object scene is, with probability 0.5, a held-out pair (uniform over the
  four), otherwise a uniform pair out of all 40 (of which 4 are held out), so about 55% of
  one-object eval scenes are held out. A two-object eval scene has, with probability 0.5, one
  object (the first or the second, equally likely) forced to a held-out pair; otherwise both
  pairs are drawn from all 40.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "RELATIONS",
    "HELD_OUT",
    "SPLITS",
    "ATTRIBUTES",
    "Obj",
    "Scene",
    "ParsedObject",
    "ParsedCaption",
    "scene",
    "render",
    "example",
    "examples",
    "caption_of",
    "parse_caption",
    "format_caption",
    "caption_variants",
    "swap_colours",
    "reverse_relation",
    "is_held_out",
]

# --------------------------------------------------------------------------------------------
# Constants of the contract.

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 80, 230),
    "yellow": (245, 215, 30),
    "purple": (145, 40, 190),
    "orange": (250, 130, 20),
    "cyan": (20, 200, 210),
    "pink": (245, 120, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
SIZES: dict[str, float] = {"small": 0.22, "large": 0.42}
SIZE_JITTER = 0.05  # size = base * uniform[1 - SIZE_JITTER, 1 + SIZE_JITTER]
POSITION_JITTER = 0.04  # centre = cell centre + uniform[-0.04, 0.04] per axis
# Phrase -> (row, col) of the 3x3 grid, row 0 at the top.
POSITIONS: dict[str, tuple[int, int]] = {
    "in the top left": (0, 0),
    "at the top": (0, 1),
    "in the top right": (0, 2),
    "on the left": (1, 0),
    "in the center": (1, 1),
    "on the right": (1, 2),
    "in the bottom left": (2, 0),
    "at the bottom": (2, 1),
    "in the bottom right": (2, 2),
}
CELL_TO_POSITION: dict[tuple[int, int], str] = {v: k for k, v in POSITIONS.items()}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
# Held-out colour-shape pairs, in the contract's order.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "star"),
    ("yellow", "square"),
    ("purple", "circle"),
)
HELD_OUT: frozenset[tuple[str, str]] = frozenset(HELD_OUT_PAIRS)
SPLITS: dict[str, int] = {"train": 0, "eval": 1}
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background")

# Scene mix (see the module docstring).
P_TWO_OBJECTS = 0.3
P_STATE_SIZE = 0.7
P_STATE_POSITION = 0.7
P_STATE_BACKGROUND = 0.5
P_EVAL_HELD_OUT = 0.5

_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_SIZE_NAMES = tuple(SIZES)
_POSITION_NAMES = tuple(POSITIONS)

# --------------------------------------------------------------------------------------------
# Geometry. Trigonometric constants are written with square roots (correctly rounded in IEEE
# arithmetic) instead of sin/cos so that rasterisation is bit-identical on every machine.

_SQRT3 = math.sqrt(3.0)
_SQRT5 = math.sqrt(5.0)
_COS36 = (1.0 + _SQRT5) / 4.0
_COS72 = (_SQRT5 - 1.0) / 4.0
_SIN36 = math.sqrt(10.0 - 2.0 * _SQRT5) / 4.0
_SIN72 = math.sqrt(10.0 + 2.0 * _SQRT5) / 4.0
STAR_INNER = 0.45  # inner radius / outer radius

# Bounding-box height / width.
HEIGHT_RATIO: dict[str, float] = {
    "circle": 1.0,
    "square": 1.0,
    "diamond": 1.0,
    "triangle": _SQRT3 / 2.0,
    "star": (1.0 + _COS36) / (2.0 * _SIN72),
}
# Area / width**2.
AREA_RATIO: dict[str, float] = {
    "circle": math.pi / 4.0,
    "square": 1.0,
    "diamond": 0.5,
    "triangle": _SQRT3 / 4.0,
    # 10 triangles (centre, inner vertex, tip) of area R * r * sin(36 deg) / 2, R = w / (2 sin 72).
    "star": 5.0 * STAR_INNER * _SIN36 / (4.0 * _SIN72 * _SIN72),
}
# (centroid y - bounding-box centre y) / width, y pointing down.
CENTROID_OFFSET: dict[str, float] = {
    "circle": 0.0,
    "square": 0.0,
    "diamond": 0.0,
    "triangle": HEIGHT_RATIO["triangle"] / 6.0,
    "star": (1.0 - _COS36) / 2.0 / (2.0 * _SIN72),
}

# Star vertices on the unit circle (x right, y UP), outer tips at 90 + 72k degrees and inner
# vertices at 126 + 72k degrees (the inner ones are later scaled by STAR_INNER).
_STAR_TIPS = (
    (0.0, 1.0),  # 90
    (-_SIN72, _COS72),  # 162
    (-_SIN36, -_COS36),  # 234
    (_SIN36, -_COS36),  # 306
    (_SIN72, _COS72),  # 18
)
_STAR_INNERS = (
    (-_SIN36, _COS36),  # 126, between tips 0 and 1
    (-_SIN72, -_COS72),  # 198, between tips 1 and 2
    (0.0, -1.0),  # 270, between tips 2 and 3
    (_SIN72, -_COS72),  # 342, between tips 3 and 4
    (_SIN36, _COS36),  # 54, between tips 4 and 0
)


def bbox_size(shape: str, width: float) -> tuple[float, float]:
    """(width, height) of a shape's bounding box."""
    return width, width * HEIGHT_RATIO[shape]


def _half_plane(x, y, ax, ay, bx, by):
    """(b - a) x (p - a): >= 0 on the left of a->b in a y-down frame drawn counter-clockwise."""
    return (bx - ax) * (y - ay) - (by - ay) * (x - ax)


def inside(shape: str, x, y, cx: float, cy: float, w: float) -> np.ndarray:
    """Inside-test for a shape of bounding-box width ``w`` whose bounding box is centred on
    ``(cx, cy)``; ``x`` and ``y`` broadcast against each other (y points down). Boundary points
    count as inside. Works in any unit as long as all arguments share it."""
    dx = x - cx
    dy = y - cy
    half = w / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "triangle":
        h = w * HEIGHT_RATIO["triangle"]
        top = cy - h / 2.0
        bottom = cy + h / 2.0
        return (y <= bottom) & (_SQRT3 * np.abs(dx) <= y - top)
    if shape == "star":
        return _inside_star(x, y, cx, cy, w)
    raise ValueError(f"unknown shape {shape!r}")


def _inside_star(x, y, cx, cy, w):
    # The star is the union of five convex kites (centre, inner k-1, tip k, inner k).
    r_out = w / (2.0 * _SIN72)
    r_in = STAR_INNER * r_out
    h = r_out * (1.0 + _COS36)
    ccy = cy - h / 2.0 + r_out  # circumcentre (y down)
    tips = [(cx + r_out * ux, ccy - r_out * uy) for ux, uy in _STAR_TIPS]
    inners = [(cx + r_in * ux, ccy - r_in * uy) for ux, uy in _STAR_INNERS]
    # Spokes centre -> inner k. In the y-down frame the vertex order tip0, inner0, tip1, ...
    # runs counter-clockwise on screen, i.e. the interior is where _half_plane <= 0 ... to
    # avoid sign bookkeeping, orient each line by a point known to be inside.
    spokes = []
    for ix, iy in inners:
        s = _half_plane(x, y, cx, ccy, ix, iy)
        spokes.append(s)
    result = None
    for k in range(5):
        tx, ty = tips[k]
        a = inners[k - 1]
        b = inners[k]
        # Kite k lies between spoke k-1 and spoke k, on the centre side of the edges a->tip and
        # tip->b. Signs are fixed by the tip (for spokes) and by the centre (for edges).
        s_prev = spokes[k - 1] * _sign(_half_plane(tx, ty, cx, ccy, a[0], a[1]))
        s_next = spokes[k] * _sign(_half_plane(tx, ty, cx, ccy, b[0], b[1]))
        e1 = _half_plane(x, y, a[0], a[1], tx, ty) * _sign(_half_plane(cx, ccy, a[0], a[1], tx, ty))
        e2 = _half_plane(x, y, tx, ty, b[0], b[1]) * _sign(_half_plane(cx, ccy, tx, ty, b[0], b[1]))
        kite = (s_prev >= 0) & (s_next >= 0) & (e1 >= 0) & (e2 >= 0)
        result = kite if result is None else (result | kite)
    return result


def _sign(v: float) -> float:
    return 1.0 if v >= 0 else -1.0


# --------------------------------------------------------------------------------------------
# Scenes.


@dataclass(frozen=True)
class Obj:
    """One object. ``size_frac`` is the bounding-box width and ``(cx, cy)`` the bounding-box
    centre, as fractions of the canvas (after jitter and the inward move); ``row``/``col`` is
    the grid cell it was placed in."""

    colour: str
    shape: str
    size_name: str
    size_frac: float
    row: int
    col: int
    cx: float
    cy: float

    @property
    def position(self) -> str:
        return CELL_TO_POSITION[(self.row, self.col)]

    @property
    def height_frac(self) -> float:
        return self.size_frac * HEIGHT_RATIO[self.shape]

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions of the canvas."""
        hw = self.size_frac / 2.0
        hh = self.height_frac / 2.0
        return (self.cx - hw, self.cy - hh, self.cx + hw, self.cy + hh)


@dataclass(frozen=True)
class Scene:
    """A structured scene: the background, the objects, the caption, the relation (two-object
    scenes) and ``stated``, the attributes the caption states (always ``colour`` and
    ``shape``; ``relation`` for two objects; for one object any of ``size``, ``position``,
    ``background``)."""

    background: str
    objects: tuple[Obj, ...]
    caption: str
    relation: str | None
    stated: frozenset[str]


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT


def _make_obj(rng: np.random.Generator, colour: str, shape: str, size_name: str, row: int, col: int) -> Obj:
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    factor = rng.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER)
    w = SIZES[size_name] * float(factor)
    h = w * HEIGHT_RATIO[shape]
    cx = (2 * col + 1) / 6.0 + float(jx)
    cy = (2 * row + 1) / 6.0 + float(jy)
    return Obj(colour, shape, size_name, w, row, col, _inward(cx, w), _inward(cy, h))


def _inward(centre: float, extent: float) -> float:
    """A centre moved inward just enough for the box of that extent to lie inside [0, 1]."""
    return min(max(centre, extent / 2.0), 1.0 - extent / 2.0)


def _draw_pair(rng: np.random.Generator, allow_held_out: bool) -> tuple[str, str]:
    while True:
        colour = _COLOUR_NAMES[int(rng.integers(len(_COLOUR_NAMES)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if allow_held_out or (colour, shape) not in HELD_OUT:
            return colour, shape


def _draw_pair_excluding_colour(rng, allow_held_out: bool, exclude: str) -> tuple[str, str]:
    while True:
        colour, shape = _draw_pair(rng, allow_held_out)
        if colour != exclude:
            return colour, shape


def _rng(index: int, split: str, seed: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    index = int(index)
    seed = int(seed)
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))


def scene(index: int, split: str = "train", seed: int = 0) -> Scene:
    """The scene of example ``index`` of ``split`` under ``seed`` (a pure function)."""
    rng = _rng(index, split, seed)
    evaluation = split == "eval"
    background = _BACKGROUND_NAMES[int(rng.integers(len(_BACKGROUND_NAMES)))]
    two = bool(rng.random() < P_TWO_OBJECTS)
    if not two:
        if evaluation and rng.random() < P_EVAL_HELD_OUT:
            colour, shape = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
        else:
            colour, shape = _draw_pair(rng, allow_held_out=evaluation)
        size_name = _SIZE_NAMES[int(rng.integers(len(_SIZE_NAMES)))]
        row, col = POSITIONS[_POSITION_NAMES[int(rng.integers(len(_POSITION_NAMES)))]]
        obj = _make_obj(rng, colour, shape, size_name, row, col)
        stated = {"colour", "shape"}
        flags = rng.random(3)
        if flags[0] < P_STATE_SIZE:
            stated.add("size")
        if flags[1] < P_STATE_POSITION:
            stated.add("position")
        if flags[2] < P_STATE_BACKGROUND:
            stated.add("background")
        sc = Scene(background, (obj,), "", None, frozenset(stated))
    else:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        if evaluation and rng.random() < P_EVAL_HELD_OUT:
            forced = int(rng.integers(2))
            held = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
            other = _draw_pair_excluding_colour(rng, True, held[0])
            pairs = (held, other) if forced == 0 else (other, held)
        else:
            first = _draw_pair(rng, allow_held_out=evaluation)
            second = _draw_pair_excluding_colour(rng, evaluation, first[0])
            pairs = (first, second)
        fixed = int(rng.integers(3))  # the shared row or column
        a, b = (int(v) for v in rng.choice(3, size=2, replace=False))
        lo, hi = min(a, b), max(a, b)
        if relation == "to the left of":
            cells = ((fixed, lo), (fixed, hi))
        elif relation == "to the right of":
            cells = ((fixed, hi), (fixed, lo))
        elif relation == "above":
            cells = ((lo, fixed), (hi, fixed))
        else:  # below
            cells = ((hi, fixed), (lo, fixed))
        objs = tuple(
            _make_obj(rng, colour, shape, "small", row, col)
            for (colour, shape), (row, col) in zip(pairs, cells)
        )
        assert not _overlap(objs[0], objs[1]), "two-object scene with overlapping objects"
        sc = Scene(background, objs, "", relation, frozenset({"colour", "shape", "relation"}))
    return Scene(sc.background, sc.objects, caption_of(sc), sc.relation, sc.stated)


def counterfactual(sc: Scene, rng: np.random.Generator, allow_held_out: bool = False) -> Scene:
    """The scene changed in one stated attribute that is hard to read, everything else (the
    background, sizes, the other object, the jitter) kept: the minimal pair of a contrastive
    batch. One object: another shape. Two objects: another shape for one of them, the colours
    exchanged between them, or their places exchanged (the relation reversed), equally likely.
    Without `allow_held_out` no object becomes a held-out colour-shape pair; a change that
    would is replaced by another, and a scene with none left comes back unchanged."""
    def reshaped(o: Obj, shape: str) -> Obj:
        return dataclasses.replace(o, shape=shape,
                                   cy=_inward(o.cy, o.size_frac * HEIGHT_RATIO[shape]))

    def moved(o: Obj, to: Obj) -> Obj:
        return dataclasses.replace(o, row=to.row, col=to.col, cx=to.cx,
                                   cy=_inward(to.cy, o.height_frac))

    objs, relation = sc.objects, sc.relation
    candidates = []  # (objects, relation)
    for i, o in enumerate(objs):
        for shape in SHAPES:
            if shape != o.shape:
                candidates.append((objs[:i] + (reshaped(o, shape),) + objs[i + 1:], relation))
    if len(objs) == 2:
        a, b = objs
        swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
        reversed_ = (moved(a, b), moved(b, a))
        kinds = [(swapped, relation), (reversed_, _REVERSE[relation])]
    else:
        kinds = []
    ok = lambda c: allow_held_out or not any(is_held_out(o.colour, o.shape) for o in c[0])
    groups = [[c for c in candidates if ok(c)]] + [[k] for k in kinds if ok(k)]
    groups = [g for g in groups if g]
    if not groups:
        return sc
    group = groups[int(rng.integers(len(groups)))]
    new_objs, new_relation = group[int(rng.integers(len(group)))]
    out = Scene(sc.background, tuple(new_objs), "", new_relation, sc.stated)
    return dataclasses.replace(out, caption=caption_of(out))


def _overlap(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


# --------------------------------------------------------------------------------------------
# Rendering.

SUPERSAMPLE = 4


def render(sc: Scene, size: int = 64) -> np.ndarray:
    """Rasterise a scene: the inside-test at each 4x sub-pixel centre, then Pillow's BOX filter
    down to ``size`` x ``size``. Returns uint8 [size, size, 3].

    For speed only the regions around the objects are drawn at 4x: the BOX filter at an integer
    factor of 4 averages exactly the 4x4 block under each output pixel, so resizing a crop
    aligned to that block grid gives the same bytes as resizing the whole 4x canvas."""
    size = int(size)
    if size < 1:
        raise ValueError("size must be positive")
    s4 = SUPERSAMPLE * size
    bg = np.array(BACKGROUNDS[sc.background], dtype=np.uint8)
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[...] = bg
    # Each object's region on the 4x canvas, in output pixels (aligned to 4x4 blocks).
    geoms = []
    for obj in sc.objects:
        w = obj.size_frac * s4
        h = obj.height_frac * s4
        cx = obj.cx * s4
        cy = obj.cy * s4
        x0 = max(int(math.floor((cx - w / 2.0) / SUPERSAMPLE)) - 1, 0)
        x1 = min(int(math.ceil((cx + w / 2.0) / SUPERSAMPLE)) + 1, size)
        y0 = max(int(math.floor((cy - h / 2.0) / SUPERSAMPLE)) - 1, 0)
        y1 = min(int(math.ceil((cy + h / 2.0) / SUPERSAMPLE)) + 1, size)
        geoms.append((obj, cx, cy, w, (y0, y1, x0, x1)))
    for _, _, _, _, (y0, y1, x0, x1) in geoms:
        if y1 <= y0 or x1 <= x0:
            continue
        crop = np.empty(((y1 - y0) * SUPERSAMPLE, (x1 - x0) * SUPERSAMPLE, 3), dtype=np.uint8)
        crop[...] = bg
        xs = np.arange(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE, dtype=np.float64)[None, :] + 0.5
        ys = np.arange(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE, dtype=np.float64)[:, None] + 0.5
        for obj, cx, cy, w, (oy0, oy1, ox0, ox1) in geoms:
            if oy0 >= y1 or y0 >= oy1 or ox0 >= x1 or x0 >= ox1:
                continue  # this object's region does not meet the crop
            mask = inside(obj.shape, xs, ys, cx, cy, w)
            crop[mask] = COLOURS[obj.colour]
        small = Image.fromarray(crop).resize((x1 - x0, y1 - y0), Image.BOX)
        out[y0:y1, x0:x1] = np.asarray(small, dtype=np.uint8)
    return out


def render_full(sc: Scene, size: int = 64) -> np.ndarray:
    """Reference rasteriser: the whole 4x canvas, then Pillow's BOX filter. Same bytes as
    :func:`render`, only slower (kept for tests)."""
    s4 = SUPERSAMPLE * size
    canvas = np.empty((s4, s4, 3), dtype=np.uint8)
    canvas[...] = np.array(BACKGROUNDS[sc.background], dtype=np.uint8)
    xs = np.arange(s4, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(s4, dtype=np.float64)[:, None] + 0.5
    for obj in sc.objects:
        mask = inside(obj.shape, xs, ys, obj.cx * s4, obj.cy * s4, obj.size_frac * s4)
        canvas[mask] = COLOURS[obj.colour]
    image = Image.fromarray(canvas).resize((size, size), Image.BOX)
    return np.asarray(image, dtype=np.uint8)


def example(index: int, split: str = "train", seed: int = 0, size: int = 64) -> tuple[np.ndarray, str]:
    """The public entry point: (uint8 [size, size, 3] image, caption)."""
    sc = scene(index, split, seed)
    return render(sc, size), sc.caption


def examples(
    indices: Iterable[int], split: str = "train", seed: int = 0, size: int = 64
) -> tuple[np.ndarray, list[str]]:
    """A batch: (uint8 [N, size, size, 3], captions)."""
    indices = list(indices)
    images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    captions = []
    for n, i in enumerate(indices):
        images[n], caption = example(i, split, seed, size)
        captions.append(caption)
    return images, captions


# --------------------------------------------------------------------------------------------
# Captions.


@dataclass(frozen=True)
class ParsedObject:
    colour: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """A caption read back: one or two objects, the background phrase (one object) and the
    relation (two objects); unstated attributes are None."""

    objects: tuple[ParsedObject, ...]
    background: str | None = None
    relation: str | None = None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def format_caption(parsed: ParsedCaption) -> str:
    """The canonical caption text of a :class:`ParsedCaption`."""
    if len(parsed.objects) == 1:
        o = parsed.objects[0]
        words = ([o.size] if o.size else []) + [o.colour, o.shape]
        text = _with_article(" ".join(words))
        if o.position:
            text += " " + o.position
        if parsed.background:
            text += f" on {_with_article(parsed.background)} background"
        return text
    if len(parsed.objects) == 2 and parsed.relation:
        a, b = parsed.objects
        return f"{_with_article(a.colour + ' ' + a.shape)} {parsed.relation} {_with_article(b.colour + ' ' + b.shape)}"
    raise ValueError("a caption has one object, or two objects and a relation")


def parsed_of(sc: Scene) -> ParsedCaption:
    """The :class:`ParsedCaption` a scene's caption states."""
    if len(sc.objects) == 1:
        o = sc.objects[0]
        return ParsedCaption(
            (
                ParsedObject(
                    o.colour,
                    o.shape,
                    o.size_name if "size" in sc.stated else None,
                    o.position if "position" in sc.stated else None,
                ),
            ),
            sc.background if "background" in sc.stated else None,
            None,
        )
    return ParsedCaption(tuple(ParsedObject(o.colour, o.shape) for o in sc.objects), None, sc.relation)


def caption_of(sc: Scene) -> str:
    """The caption of a scene (what it states follows ``sc.stated``)."""
    return format_caption(parsed_of(sc))


def _alt(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_ONE_RE = re.compile(
    rf"(?:a|an) (?:(?P<size>{_alt(SIZES)}) )?(?P<colour>{_alt(COLOURS)}) (?P<shape>{_alt(SHAPES)})"
    rf"(?: (?P<position>{_alt(POSITIONS)}))?(?: on (?:a|an) (?P<background>{_alt(BACKGROUNDS)}) background)?"
)
_TWO_RE = re.compile(
    rf"(?:a|an) (?P<c1>{_alt(COLOURS)}) (?P<s1>{_alt(SHAPES)}) (?P<relation>{_alt(RELATIONS)}) "
    rf"(?:a|an) (?P<c2>{_alt(COLOURS)}) (?P<s2>{_alt(SHAPES)})"
)


def parse_caption(caption: str) -> ParsedCaption | None:
    """Read a shapes caption back; None for anything that is not one. Never raises.

    Lenient about case, surrounding/repeated white space, a trailing period and "a"/"an"."""
    try:
        if not isinstance(caption, str):
            return None
        text = " ".join(caption.lower().split())
        if text.endswith("."):
            text = text[:-1].rstrip()
        m = _ONE_RE.fullmatch(text)
        if m:
            obj = ParsedObject(m["colour"], m["shape"], m["size"], m["position"])
            return ParsedCaption((obj,), m["background"], None)
        m = _TWO_RE.fullmatch(text)
        if m:
            objs = (ParsedObject(m["c1"], m["s1"]), ParsedObject(m["c2"], m["s2"]))
            return ParsedCaption(objs, None, m["relation"])
        return None
    except Exception:  # pragma: no cover - defensive: parsing must never raise
        return None


def _parse_or_raise(caption: str) -> ParsedCaption:
    parsed = parse_caption(caption)
    if parsed is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return parsed


_ATTRIBUTE_VALUES: dict[str, Sequence[str]] = {
    "colour": _COLOUR_NAMES,
    "shape": SHAPES,
    "size": _SIZE_NAMES,
    "position": _POSITION_NAMES,
    "background": _BACKGROUND_NAMES,
}


def caption_variants(caption: str, attribute: str) -> list[str]:
    """The caption (canonicalised) first, then the same caption with ``attribute`` replaced by
    every other allowed value, in the contract's order of values.

    For a two-object caption, "colour" and "shape" vary the first object only (colours stay
    different from the second object's). An attribute the caption does not state (e.g. the
    size of "a red circle", or the background of any two-object caption) has no variants: the
    result is just ``[caption]``. Raises ValueError for an unknown attribute or a caption that
    does not parse."""
    if attribute not in _ATTRIBUTE_VALUES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    parsed = _parse_or_raise(caption)
    out = [format_caption(parsed)]
    first = parsed.objects[0]
    two = len(parsed.objects) == 2
    if attribute in ("colour", "shape"):
        current = getattr(first, attribute)
        for value in _ATTRIBUTE_VALUES[attribute]:
            if value == current:
                continue
            if two and attribute == "colour" and value == parsed.objects[1].colour:
                continue
            new_first = ParsedObject(**{**first.__dict__, attribute: value})
            out.append(format_caption(ParsedCaption((new_first,) + parsed.objects[1:], parsed.background, parsed.relation)))
    elif attribute in ("size", "position") and not two:
        current = getattr(first, attribute)
        if current is not None:
            for value in _ATTRIBUTE_VALUES[attribute]:
                if value != current:
                    new_first = ParsedObject(**{**first.__dict__, attribute: value})
                    out.append(format_caption(ParsedCaption((new_first,), parsed.background, None)))
    elif attribute == "background" and not two and parsed.background is not None:
        for value in _BACKGROUND_NAMES:
            if value != parsed.background:
                out.append(format_caption(ParsedCaption(parsed.objects, value, None)))
    return out


def _two_object(caption: str) -> ParsedCaption:
    parsed = _parse_or_raise(caption)
    if len(parsed.objects) != 2:
        raise ValueError(f"not a two-object caption: {caption!r}")
    return parsed


def swap_colours(caption: str) -> list[str]:
    """``[caption, caption with the two objects' colours exchanged]`` for a two-object caption
    ("a red circle above a blue star" -> "a blue circle above a red star")."""
    parsed = _two_object(caption)
    a, b = parsed.objects
    swapped = (ParsedObject(b.colour, a.shape), ParsedObject(a.colour, b.shape))
    return [format_caption(parsed), format_caption(ParsedCaption(swapped, None, parsed.relation))]


_REVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def reverse_relation(caption: str) -> list[str]:
    """``[caption, caption with the relation reversed]`` for a two-object caption
    ("to the left of" <-> "to the right of", "above" <-> "below")."""
    parsed = _two_object(caption)
    return [
        format_caption(parsed),
        format_caption(ParsedCaption(parsed.objects, None, _REVERSE[parsed.relation])),
    ]
