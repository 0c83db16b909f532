"""Analytic prompt-adherence scorer for the captioned-shapes dataset (``docs/SHAPES.md``).

No learned model: the image is read back with a little image analysis and compared with what
the caption states.

1. Background: the per-channel median of a 2-pixel border ring, snapped to the nearest of the
   three backgrounds (it must lie within ``BACKGROUND_TOLERANCE`` of one).
2. Colour and coverage per pixel: every palette colour C defines the segment B -> C of the
   blends an antialiased edge can produce. Each pixel is projected onto every segment; the
   colour with the smallest residual wins and the projection is the pixel's coverage alpha.
   Pixels with alpha >= 0.5 are foreground.
3. Objects: 8-connected components of the foreground (run-length union-find in numpy and
   Python; no scipy). A component holding two colours with sizeable mass each (two objects a
   fraction of a pixel apart) is split by colour; the object's colour is the majority.
4. Shape, size and position: in a window around the object the coverage map for its colour is
   compared with the antialiased template (4x supersampled, as the generator draws) of each of
   the five shapes, placed from the map's moments: the width from the mass (area = k_shape *
   width**2) and the bounding-box centre from the centroid (shifted for the triangle and the
   star). The shape with the least squared error wins, the fitted width is the size
   (small/large split at 0.32 of the canvas) and the fitted bounding-box centre's third of the
   canvas is the grid cell. A fit whose error is large (not one of the five shapes) is not a
   valid object.

``score(image, caption)`` returns an :class:`AdherenceResult`. One-object captions: the largest
object must match every stated attribute and be the only sizeable object. Two-object captions:
an object matching each (colour, shape) must exist, the pair must stand in the stated relation
(left/right: x1 < x2 - 0.1 and |y1 - y2| < 1/6 of the canvas; above/below alike on the other
axis) and there must be exactly two sizeable objects. In both cases the background must be one
of the three (and the stated one, if any). An unparseable caption or malformed image gives
``ok=False``; ``score`` never raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dalle_jax.data import shapes as S

__all__ = ["AdherenceResult", "score", "score_batch", "accuracy", "analyse", "check"]

BACKGROUND_TOLERANCE = 48.0  # RGB distance of the border median to the nearest background
FOREGROUND_ALPHA = 0.5
SIZE_THRESHOLD = 0.32  # bounding-box width / canvas: small below, large above
VALID_WIDTH = (0.10, 0.60)  # plausible object widths
MAX_FIT_ERROR = 0.25  # squared template error / object mass
MIN_MASS_FRACTION = 0.004  # sizeable object: core mass >= this * H * W
MAX_OBJECTS_FITTED = 3  # captions need at most 2; the rest only count
MAX_FOREGROUND = 0.5  # fraction of the canvas; a contract scene covers at most ~0.2
MAX_EXTENT = 0.8  # an object's core spanning more of the canvas is not fitted (not valid)
RELATION_MARGIN = 0.10
SUPERSAMPLE_BUDGET = 96  # template sub-samples per window side (at most 4 per pixel)
RELATION_ALIGN = 1.0 / 6.0

_COLOUR_NAMES = tuple(S.COLOURS)
_PALETTE = np.array([S.COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_BG_NAMES = tuple(S.BACKGROUNDS)
_BG_RGB = np.array([S.BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)


@dataclass
class AdherenceResult:
    """``ok``: every stated attribute is right. ``checks``: one bool per check. ``found``: what
    was read back (background, objects), for debugging."""

    ok: bool
    checks: dict[str, bool] = field(default_factory=dict)
    found: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Connected components.


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean [H, W] mask: (labels with -1 off the mask, count)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    ys, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; same row-major order as the starts
    n = len(starts)
    labels = np.full((h, w), -1, dtype=np.int32)
    if n == 0:
        return labels, 0
    row_ptr = np.searchsorted(ys, np.arange(h + 1)).tolist()
    s = starts.tolist()
    e = ends.tolist()
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, h):
        i, i_end = row_ptr[y - 1], row_ptr[y]
        j, j_end = row_ptr[y], row_ptr[y + 1]
        while i < i_end and j < j_end:
            if s[j] <= e[i] and s[i] <= e[j]:  # columns within one of each other
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if e[i] < e[j]:
                i += 1
            else:
                j += 1
    roots = [find(i) for i in range(n)]
    compact: dict[int, int] = {}
    run_label = [compact.setdefault(r, len(compact)) for r in roots]
    ys_l = ys.tolist()
    for k in range(n):
        labels[ys_l[k], s[k] : e[k]] = run_label[k]
    return labels, len(compact)


# --------------------------------------------------------------------------------------------
# Image analysis.


def _background(img: np.ndarray) -> tuple[np.ndarray, str, float]:
    h, w, _ = img.shape
    k = max(1, min(2, h // 8, w // 8))
    ring = np.concatenate(
        [img[:k].reshape(-1, 3), img[-k:].reshape(-1, 3), img[k:-k, :k].reshape(-1, 3), img[k:-k, -k:].reshape(-1, 3)]
    )
    rgb = np.median(ring, axis=0).astype(np.float32)
    dist = np.sqrt(((_BG_RGB - rgb) ** 2).sum(axis=1))
    best = int(np.argmin(dist))
    return rgb, _BG_NAMES[best], float(dist[best])


def _coverage(shape: str, x0: int, y0: int, wn: int, hn: int, cx: float, cy: float, w: float, ss: int) -> np.ndarray:
    """Antialiased coverage [hn, wn] of a shape on pixels x0.., y0.. (ss x ss sub-samples)."""
    xs = x0 + (np.arange(wn * ss, dtype=np.float64)[None, :] + 0.5) / ss
    ys = y0 + (np.arange(hn * ss, dtype=np.float64)[:, None] + 0.5) / ss
    m = S.inside(shape, xs, ys, cx, cy, w)
    return m.reshape(hn, ss, wn, ss).mean(axis=(1, 3))


def _fit(alpha: np.ndarray, weight: np.ndarray, x0: int, y0: int) -> dict[str, Any] | None:
    """Fit the five shapes to a coverage window; the best one with its placement."""
    wa = weight * alpha
    mass = float(wa.sum())
    if mass <= 1e-6:
        return None
    hn, wn = alpha.shape
    xs = x0 + np.arange(wn, dtype=np.float64) + 0.5
    ys = y0 + np.arange(hn, dtype=np.float64) + 0.5
    mx = float((wa.sum(axis=0) * xs).sum() / mass)
    my = float((wa.sum(axis=1) * ys).sum() / mass)
    ss = SUPERSAMPLE_BUDGET // max(hn, wn, 1)
    ss = min(max(ss, 1), 4)
    errors = {}
    placements = {}
    for shape in S.SHAPES:
        width = math.sqrt(mass / S.AREA_RATIO[shape])
        cy = my - S.CENTROID_OFFSET[shape] * width
        t = _coverage(shape, x0, y0, wn, hn, mx, cy, width, ss)
        errors[shape] = float((weight * (alpha - t) ** 2).sum())
        placements[shape] = (mx, cy, width)
    best = min(errors, key=errors.__getitem__)
    cx, cy, width = placements[best]
    return {
        "shape": best,
        "cx_px": cx,
        "cy_px": cy,
        "width_px": width,
        "mass": mass,
        "fit_error": errors[best] / mass,
        "errors": {k: v / mass for k, v in errors.items()},
    }


def analyse(image: np.ndarray) -> dict[str, Any]:
    """Read an image back (any [H, W, 3] image; raises ValueError for other shapes).

    Returns {"background" (name or None), "background_rgb", "background_distance",
    "background_valid", "foreground_fraction", "n_components", "n_sizeable", "objects"}.
    ``objects`` holds the (at most ``MAX_OBJECTS_FITTED``) largest sizeable objects, largest
    first, each with colour, shape, size, width, position, cx, cy (fractions of the canvas; the
    bounding-box centre), mass (pixels), fit_error, shape_errors and valid. An image more than
    ``MAX_FOREGROUND`` foreground (noise, a flat non-background colour) is not segmented:
    ``objects`` is empty and ``n_sizeable`` None."""
    img = _as_image(image)
    if img is None:
        raise ValueError(f"expected an [H, W, 3] image, got shape {np.shape(image)}")
    h, w, _ = img.shape
    imgf = img.astype(np.float32)
    bg_rgb, bg_name, bg_dist = _background(imgf)
    found: dict[str, Any] = {
        "background": bg_name if bg_dist <= BACKGROUND_TOLERANCE else None,
        "background_rgb": tuple(float(v) for v in bg_rgb),
        "background_distance": bg_dist,
        "background_valid": bg_dist <= BACKGROUND_TOLERANCE,
        "objects": [],
    }
    # Per pixel and palette colour: coverage along the segment background -> colour, residual.
    # Only pixels that differ from the background at all are classified.
    p_all = imgf - bg_rgb  # [h, w, 3]
    norm2 = (p_all * p_all).sum(axis=2)
    idx = np.flatnonzero(norm2 > 2.0)
    p = p_all.reshape(-1, 3)[idx]  # [m, 3]
    d = _PALETTE - bg_rgb  # [8, 3]
    dd = (d * d).sum(axis=1)  # [8]
    usable = dd > 1.0
    dd_safe = np.where(usable, dd, 1.0)
    # p @ d.T without BLAS (tiny inner dimension; avoids thread start-up and contention).
    pd = p[:, 0:1] * d[:, 0] + p[:, 1:2] * d[:, 1] + p[:, 2:3] * d[:, 2]  # [m, 8]
    am = pd / dd_safe
    np.clip(am, 0.0, 1.0, out=am)
    resid = norm2.reshape(-1)[idx][:, None] - 2.0 * am * pd + am * am * dd_safe
    resid = np.where(usable, resid, np.inf)
    best_m = np.argmin(resid, axis=1) if len(idx) else np.zeros(0, dtype=np.int64)
    alpha_m = am[np.arange(len(idx)), best_m] * usable[best_m]
    n_colours = len(_COLOUR_NAMES)
    a = np.zeros((h * w, n_colours), dtype=np.float32)  # coverage per colour
    a[idx] = am
    a = a.reshape(h, w, n_colours)
    best = np.zeros(h * w, dtype=np.int64)
    best[idx] = best_m
    best = best.reshape(h, w)
    alpha = np.zeros(h * w, dtype=np.float32)
    alpha[idx] = alpha_m
    alpha = alpha.reshape(h, w)
    fg = alpha >= FOREGROUND_ALPHA
    found["foreground_fraction"] = float(fg.mean())
    if found["foreground_fraction"] > MAX_FOREGROUND:
        # Clutter (noise, a flat non-background colour): no scene of the contract covers more
        # than a fifth of the canvas. Not worth segmenting; no caption can be satisfied.
        found["n_sizeable"] = None
        return found
    labels, n = _label(fg)
    if n == 0:
        return found
    min_mass = MIN_MASS_FRACTION * h * w
    flat_labels = labels.ravel()
    on = flat_labels >= 0
    # Alpha mass per (component, colour).
    hist = np.bincount(
        flat_labels[on] * n_colours + best.ravel()[on], weights=alpha.ravel()[on], minlength=n * n_colours
    ).reshape(n, n_colours)
    # Objects: (component, colour or None for "whole component").
    objects = []
    for comp in np.flatnonzero(hist.sum(axis=1) >= min_mass).tolist():  # smaller ones never count
        row = hist[comp]
        sizeable = np.nonzero(row >= min_mass)[0]
        if len(sizeable) >= 2:
            for c in sizeable:
                objects.append((comp, int(c), float(row[c])))
        else:
            objects.append((comp, None, float(row.sum())))
    objects.sort(key=lambda t: -t[2])
    n_sizeable = sum(1 for o in objects if o[2] >= min_mass)
    found["n_components"] = n
    found["n_sizeable"] = n_sizeable
    # Object id map (core pixels), for the masking of neighbours in the fit windows.
    obj_map = np.full((h, w), -1, dtype=np.int32)
    for k, (comp, colour, mass) in enumerate(objects[:MAX_OBJECTS_FITTED]):
        if mass < min_mass:
            break
        sel = labels == comp
        if colour is not None:
            sel &= best == colour
        obj_map[sel] = k
    for k, (comp, colour, mass) in enumerate(objects):
        if mass < min_mass or k >= MAX_OBJECTS_FITTED:
            break
        sel = obj_map == k
        if colour is None:
            colour = int(np.argmax(hist[comp]))
        rows = np.nonzero(sel.any(axis=1))[0]
        cols = np.nonzero(sel.any(axis=0))[0]
        y0, y1 = max(int(rows[0]) - 2, 0), min(int(rows[-1]) + 3, h)
        x0, x1 = max(int(cols[0]) - 2, 0), min(int(cols[-1]) + 3, w)
        win_alpha = a[y0:y1, x0:x1, colour]
        win_map = obj_map[y0:y1, x0:x1]
        win_best = best[y0:y1, x0:x1]
        win_bestalpha = alpha[y0:y1, x0:x1]
        other = ((win_map >= 0) & (win_map != k)) | ((win_map < 0) & (win_best != colour) & (win_bestalpha >= 0.25))
        weight = np.where(other, 0.0, 1.0)
        too_big = (rows[-1] + 1 - rows[0]) > MAX_EXTENT * h or (cols[-1] + 1 - cols[0]) > MAX_EXTENT * w
        fit = None if too_big else _fit(win_alpha, weight, x0, y0)
        obj: dict[str, Any] = {"colour": _COLOUR_NAMES[colour], "mass": mass, "sizeable": True}
        if fit is None:
            obj.update(shape=None, valid=False)
        else:
            width = fit["width_px"] / w
            cx = fit["cx_px"] / w
            cy = fit["cy_px"] / h
            row_i = min(max(int(cy * 3), 0), 2)
            col_i = min(max(int(cx * 3), 0), 2)
            valid = VALID_WIDTH[0] <= width <= VALID_WIDTH[1] and fit["fit_error"] <= MAX_FIT_ERROR
            obj.update(
                shape=fit["shape"],
                width=width,
                size="small" if width < SIZE_THRESHOLD else "large",
                cx=cx,
                cy=cy,
                position=S.CELL_TO_POSITION[(row_i, col_i)],
                fit_error=fit["fit_error"],
                shape_errors=fit["errors"],
                valid=bool(valid),
            )
        found["objects"].append(obj)
    return found


# --------------------------------------------------------------------------------------------
# Scoring.


def _relation_holds(o1: dict, o2: dict, relation: str) -> bool:
    dx = o2["cx"] - o1["cx"]
    dy = o2["cy"] - o1["cy"]
    if relation == "to the left of":
        return dx > RELATION_MARGIN and abs(dy) < RELATION_ALIGN
    if relation == "to the right of":
        return -dx > RELATION_MARGIN and abs(dy) < RELATION_ALIGN
    if relation == "above":
        return dy > RELATION_MARGIN and abs(dx) < RELATION_ALIGN
    if relation == "below":
        return -dy > RELATION_MARGIN and abs(dx) < RELATION_ALIGN
    return False


def _as_image(image: Any) -> np.ndarray | None:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3 or img.shape[0] < 4 or img.shape[1] < 4:
        return None
    img = img[..., :3]
    if img.dtype != np.uint8:
        f = np.nan_to_num(img.astype(np.float64))
        if np.issubdtype(img.dtype, np.floating) and f.size and f.max() <= 1.0:
            f = f * 255.0
        img = np.clip(np.round(f), 0, 255).astype(np.uint8)
    return img


def score(image: np.ndarray, caption: str) -> AdherenceResult:
    """Score one uint8 [H, W, 3] image against a shapes caption. Never raises."""
    try:
        return _score(image, caption)
    except Exception as exc:  # pragma: no cover - a scorer must not take a training run down
        return AdherenceResult(False, {}, {"error": f"{type(exc).__name__}: {exc}"})


def _score(image: Any, caption: str) -> AdherenceResult:
    if S.parse_caption(caption) is None:
        return AdherenceResult(False, {"caption": False}, {"error": "not a shapes caption"})
    img = _as_image(image)
    if img is None:
        return AdherenceResult(False, {"image": False}, {"error": "not an [H, W, 3] image"})
    return check(analyse(img), caption)


def check(found: dict[str, Any], caption: str) -> AdherenceResult:
    """Score an :func:`analyse` result against a caption: scoring many captions against one
    image (zero-shot ranking, rejection tests) analyses the image once. Never raises."""
    try:
        return _check(found, caption)
    except Exception as exc:  # pragma: no cover
        return AdherenceResult(False, {}, {"error": f"{type(exc).__name__}: {exc}"})


def _check(found: dict[str, Any], caption: str) -> AdherenceResult:
    parsed = S.parse_caption(caption)
    if parsed is None:
        return AdherenceResult(False, {"caption": False}, {"error": "not a shapes caption", **found})
    objects = [o for o in found["objects"] if o.get("valid")]
    n_sizeable = found.get("n_sizeable", 0)
    checks: dict[str, bool] = {}
    if len(parsed.objects) == 1:
        want = parsed.objects[0]
        top = found["objects"][0] if found["objects"] else None
        good = top is not None and bool(top.get("valid"))
        checks["colour"] = good and top["colour"] == want.colour
        checks["shape"] = good and top["shape"] == want.shape
        if want.size is not None:
            checks["size"] = good and top["size"] == want.size
        if want.position is not None:
            checks["position"] = good and top["position"] == want.position
        checks["count"] = n_sizeable == 1
    else:
        a, b = parsed.objects
        c1 = [o for o in objects if o["colour"] == a.colour and o["shape"] == a.shape]
        c2 = [o for o in objects if o["colour"] == b.colour and o["shape"] == b.shape]
        checks["object1"] = bool(c1)
        checks["object2"] = bool(c2)
        checks["relation"] = any(
            o1 is not o2 and _relation_holds(o1, o2, parsed.relation) for o1 in c1 for o2 in c2
        )
        checks["count"] = n_sizeable == 2
    # The background must be one of the three, and the stated one if the caption names it.
    checks["background"] = found["background"] is not None and (
        parsed.background is None or found["background"] == parsed.background
    )
    return AdherenceResult(all(checks.values()), checks, found)


def score_batch(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> list[AdherenceResult]:
    """Score images [N, H, W, 3] against N captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return [score(img, cap) for img, cap in zip(images, captions)]


def accuracy(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> float:
    """Fraction of images whose caption is fully satisfied (0.0 for an empty batch)."""
    results = score_batch(images, captions)
    return sum(r.ok for r in results) / len(results) if results else 0.0


def summary(results: Sequence[AdherenceResult], captions: Sequence[str]) -> dict[str, float]:
    """Accuracy by the groups the generators are judged on: one-object captions with a seen
    colour-shape pair, one-object with a held-out pair, two-object captions; each with its
    count (`n_...`)."""
    groups: dict[str, list[bool]] = {"one_object_seen": [], "one_object_held_out": [],
                                     "two_object": []}
    for result, caption in zip(results, captions):
        parsed = S.parse_caption(caption)
        if parsed is None:
            continue
        if len(parsed.objects) == 2:
            groups["two_object"].append(result.ok)
        elif (parsed.objects[0].colour, parsed.objects[0].shape) in S.HELD_OUT:
            groups["one_object_held_out"].append(result.ok)
        else:
            groups["one_object_seen"].append(result.ok)
    out = {}
    for name, oks in groups.items():
        out[name] = float(np.mean(oks)) if oks else float("nan")
        out[f"n_{name}"] = float(len(oks))
    return out


def check_rates(results: Sequence[AdherenceResult], captions: Sequence[str],
                num_objects: int = 1) -> dict[str, float]:
    """How often each check passes over the captions that name `num_objects` objects: which
    check fails, where `summary` only says that one did. One object: colour, shape, size,
    position, count, background. Two: object1 and object2 (each drawn in its colour and shape),
    relation, count, background."""
    checks: dict[str, list[bool]] = {}
    for result, caption in zip(results, captions):
        parsed = S.parse_caption(caption)
        if parsed is not None and len(parsed.objects) == num_objects:
            for name, ok in result.checks.items():
                checks.setdefault(name, []).append(ok)
    return {k: float(np.mean(v)) for k, v in sorted(checks.items())}


def one_object_check_rates(results: Sequence[AdherenceResult],
                           captions: Sequence[str]) -> dict[str, float]:
    return check_rates(results, captions, 1)


def one_object_shape_rates(results: Sequence[AdherenceResult],
                           captions: Sequence[str]) -> dict[str, float]:
    """How often the shape check passes for each stated shape, over one-object captions, and
    for each stated shape and size ("star, small"): which shapes a generator cannot draw."""
    checks: dict[str, list[bool]] = {}
    for result, caption in zip(results, captions):
        parsed = S.parse_caption(caption)
        if parsed is None or len(parsed.objects) != 1 or "shape" not in result.checks:
            continue
        obj = parsed.objects[0]
        keys = [obj.shape] + ([f"{obj.shape}, {obj.size}"] if obj.size else [])
        for key in keys:
            checks.setdefault(key, []).append(result.checks["shape"])
    return {k: float(np.mean(v)) for k, v in sorted(checks.items())}
