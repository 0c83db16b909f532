"""What a squared-error decoder can draw at best when it cannot know an object's jitter.

    python benchmarks/shape_ceiling.py [--num 400] [--draws 48] [--size 32]

A shapes scene's object sits at its cell's centre plus a uniform jitter of up to 0.04 of the
canvas per axis (1.3 px at 32 px), its size times a factor in [0.95, 1.05] (`../shared/SHAPES.md`).
A decoder fed an image vector that does not hold the jitter, trained by squared error, is best
off drawing the mean of the pictures the vector stands for. This script renders that mean for
each of the first `--num` one-object eval scenes (`--draws` renderings, the jitter and size
factor redrawn, everything else kept) and reports, by kind, how often the adherence scorer reads
the right shape in it:

  fixed    the scene itself (the scorer's own check; 100% expected)
  jitter   the mean over redrawn jitter and size: the optimum of a plain squared error
  aligned  the same, each rendering first moved by the whole-pixel shift (at most 1 px per axis)
           that brings it nearest the scene: the optimum of the squared error taken at the
           best of the real picture's shifts by up to 1 px (`decoder.loss.reconstruction_shift=1`)

Pure NumPy on one core; about 10 s at the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

try:
    import dalle_jax  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle_jax.data import shapes as S  # noqa: E402
from dalle_jax.metrics import adherence as A  # noqa: E402

MODES = ("fixed", "jitter", "aligned")


def mean_picture(sc: S.Scene, rng: np.random.Generator, mode: str, draws: int,
                 size: int) -> np.ndarray:
    """The mean of `draws` renderings of a one-object scene, its jitter redrawn per `mode`."""
    (o,) = sc.objects
    if mode == "fixed":
        return S.render(sc, size)
    total = np.zeros((size, size, 3))
    for _ in range(draws):
        # The generator's own draw of jitter and size for this object's kind and cell.
        moved = S._make_obj(rng, o.colour, o.shape, o.size_name, o.row, o.col)
        if mode == "aligned":  # the whole-pixel shift nearest the scene's own centre, |s| <= 1
            moved = dataclasses.replace(
                moved, cx=moved.cx - np.clip(np.round((moved.cx - o.cx) * size), -1, 1) / size,
                cy=moved.cy - np.clip(np.round((moved.cy - o.cy) * size), -1, 1) / size)
        total += S.render(dataclasses.replace(sc, objects=(moved,)), size)
    return np.clip(np.round(total / draws), 0, 255).astype(np.uint8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=400, help="one-object eval scenes")
    parser.add_argument("--draws", type=int, default=48, help="renderings per mean picture")
    parser.add_argument("--size", type=int, default=32, help="canvas size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    right: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    index = found = 0
    while found < args.num:
        sc = S.scene(index, "eval")
        index += 1
        if len(sc.objects) != 1:
            continue
        found += 1
        o = sc.objects[0]
        for mode in MODES:
            objects = A.analyse(mean_picture(sc, rng, mode, args.draws, args.size))["objects"]
            right[f"{o.size_name} {o.shape}"][mode].append(
                bool(objects) and objects[0]["shape"] == o.shape)

    print(f"shape read right in the mean picture, {args.num} one-object eval scenes, "
          f"{args.size} px, {args.draws} draws")
    print(f"{'kind':16s} {'n':>4s} " + " ".join(f"{m:>8s}" for m in MODES))
    for kind in sorted(right):
        row = right[kind]
        print(f"{kind:16s} {len(row['fixed']):4d} "
              + " ".join(f"{100 * np.mean(row[m]):7.0f}%" for m in MODES))


if __name__ == "__main__":
    main()
