"""Judge a trained pipeline on the shapes eval split with the analytic adherence scorer.

    python -m dalle_jax.evaluate [--checkpoint workdir/model.npz] [--num 600] [--out report.json]

Reports (JSON, and a short table on stdout):
  adherence    one picture per eval caption, every stated attribute right, by group: one-object
               with a seen colour-shape pair, one-object with a held-out pair, two objects;
               again without the prior (the text vector decoded as if it were an image's);
  diversity    for one-object prompts that leave the position (or the background) open, how
               many distinct positions (backgrounds) 8 seeds produce, and the mean pixel
               distance between pictures of one prompt;
  variations   variations of ground-truth pictures that keep the source's colour and shape;
  edits        edits from the true caption to the caption with another colour word: the new
               colour is drawn and the shape and position are kept, at several amounts;
plus a grid PNG beside the report. Without --checkpoint the shipped model is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from dalle_jax import images as images_lib
from dalle_jax.data import shapes
from dalle_jax.metrics import adherence


def _read(image):
    found = adherence.analyse(image)
    obj = found["objects"][0] if found["objects"] else None
    return found["background"], obj


def adherence_report(pipe, captions, seed=0, truncation=1.0, use_prior=True):
    pictures = pipe.generate(captions, 1, seed, truncation, use_prior=use_prior)
    results = adherence.score_batch(pictures, captions)
    report = adherence.summary(results, captions)
    # Which stated attributes fail, over one-object captions: where to look first.
    checks: dict[str, list[bool]] = {}
    for result, caption in zip(results, captions):
        if len(shapes.parse_caption(caption).objects) == 1:
            for name, ok in result.checks.items():
                checks.setdefault(name, []).append(ok)
    report["one_object_checks"] = {k: float(np.mean(v)) for k, v in sorted(checks.items())}
    return report, pictures


def diversity_report(pipe, captions, samples=8, seed=0):
    open_position, open_background, distances = [], [], []
    prompts = [c for c in captions if (p := shapes.parse_caption(c)) and len(p.objects) == 1
               and (p.objects[0].position is None or p.background is None)][:40]
    if not prompts:
        return {}
    pictures = pipe.generate(prompts, samples, seed).reshape(len(prompts), samples,
                                                               *(pipe.image_size,) * 2, 3)
    for caption, group in zip(prompts, pictures):
        parsed = shapes.parse_caption(caption)
        reads = [_read(p) for p in group]
        if parsed.objects[0].position is None:
            open_position.append(len({o["position"] for _, o in reads if o}))
        if parsed.background is None:
            open_background.append(len({b for b, _ in reads if b}))
        g = group.reshape(samples, -1).astype(np.float32)
        distances.append(np.mean([np.abs(g[i] - g[j]).mean() for i in range(samples)
                                  for j in range(i + 1, samples)]))
    return {"prompts": len(prompts), "samples_per_prompt": samples,
            "distinct_positions_when_open": float(np.mean(open_position)) if open_position else None,
            "distinct_backgrounds_when_open":
                float(np.mean(open_background)) if open_background else None,
            "mean_abs_pixel_distance_between_seeds": float(np.mean(distances))}


def _one_object(images, captions, limit):
    keep = [i for i, c in enumerate(captions) if len(shapes.parse_caption(c).objects) == 1]
    keep = keep[:limit]
    return images[keep], [captions[i] for i in keep]


def variation_report(pipe, images, captions, num=4, seed=0, limit=100):
    images, captions = _one_object(images, captions, limit)
    out = pipe.variations(images, num, seed)
    kept = []
    for i, caption in enumerate(captions):
        obj = shapes.parse_caption(caption).objects[0]
        for picture in out[i * num:(i + 1) * num]:
            _, found = _read(picture)
            kept.append(bool(found) and found["colour"] == obj.colour and found["shape"] == obj.shape)
    return {"sources": len(captions), "per_source": num,
            "keep_colour_and_shape": float(np.mean(kept))}


def edit_report(pipe, images, captions, amounts=(0.3, 0.5, 0.7), seed=0, limit=100):
    images, captions = _one_object(images, captions, limit)
    rng = np.random.default_rng(seed)
    targets = [rng.choice(shapes.caption_variants(c, "colour")[1:]) for c in captions]
    out = {}
    for amount in amounts:
        ok = []
        for image, caption, target in zip(images, captions, targets):
            edited = pipe.edit(image, caption, target, amount, seed)[0]
            src = shapes.parse_caption(caption).objects[0]
            want = shapes.parse_caption(target).objects[0]
            _, before = _read(image)
            _, after = _read(edited)
            ok.append(bool(after) and bool(before) and after["colour"] == want.colour
                      and after["shape"] == src.shape and after["position"] == before["position"])
        out[f"amount_{amount}"] = float(np.mean(ok))
    return {"sources": len(captions), "colour_changed_shape_and_position_kept": out}


def run(pipe, num: int = 600, seed: int = 0, truncation: float = 1.0) -> tuple[dict, np.ndarray]:
    images, captions = shapes.examples(range(num), split="eval", seed=0, size=pipe.image_size)
    t = time.perf_counter()
    report = {"model": pipe.path, "eval_captions": num, "seed": seed, "truncation": truncation}
    report["adherence"], pictures = adherence_report(pipe, captions, seed, truncation)
    report["adherence_without_prior"], _ = adherence_report(pipe, captions, seed, truncation,
                                                            use_prior=False)
    report["diversity"] = diversity_report(pipe, captions, seed=seed)
    report["variations"] = variation_report(pipe, images, captions, seed=seed)
    report["edits"] = edit_report(pipe, images, captions, seed=seed)
    report["seconds"] = time.perf_counter() - t
    return report, images_lib.grid(np.stack([images[:48], pictures[:48]], 1).reshape(
        -1, *images.shape[1:]), cols=16)


def output_paths(out: str) -> tuple[str, str]:
    """(report JSON, grid PNG beside it): report.json -> report.png; a report named *.png
    gets its grid as *.grid.png, never the same file."""
    root, ext = os.path.splitext(out)
    return out, (root + ".png" if ext.lower() != ".png" else root + ".grid.png")


def _write(out: str, report: dict, grid: np.ndarray):
    """Both files or neither: the JSON goes to a temporary file first, the grid is written
    atomically, and only then does the JSON take its name."""
    report_path, grid_path = output_paths(out)
    tmp = os.path.join(os.path.dirname(os.path.abspath(report_path)),
                       f".{os.path.basename(report_path)}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        images_lib.save_png(grid_path, grid, {"caption": "eval: real | generated"}, scale=3)
        os.replace(tmp, report_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a model file (or the workdir holding "
                        "model.npz); default: the shipped model")
    parser.add_argument("--num", type=int, default=600, help="eval captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truncation", type=float, default=1.0)
    parser.add_argument("--out", default="report.json",
                        help="the JSON report; its grid PNG is written beside it")
    args = parser.parse_args(argv)
    from dalle_jax import bundle
    from dalle_jax.cli import one_line, output_problem
    from dalle_jax.pipeline import Pipeline
    if not 1 <= args.num <= 100_000:
        return _error(f"--num must be between 1 and 100000, not {args.num}")
    if not 0.0 <= args.truncation <= 2.0:
        return _error(f"--truncation must be between 0 and 2, not {args.truncation}")
    for path in output_paths(args.out):  # before the model runs for minutes
        problem = output_problem(path)
        if problem:
            return _error(one_line(problem))
    try:
        pipe = Pipeline.load(args.checkpoint, batch_size=64)
    except bundle.BundleError as e:
        return _error(one_line(str(e)))
    report, grid = run(pipe, args.num, args.seed, args.truncation)
    try:
        _write(args.out, report, grid)
    except (OSError, images_lib.ImageError) as e:
        return _error(one_line(f"cannot write the report {args.out}: "
                               f"{getattr(e, 'strerror', None) or e}"))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
