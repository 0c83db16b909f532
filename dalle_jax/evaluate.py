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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a model file; default: the shipped model")
    parser.add_argument("--num", type=int, default=600, help="eval captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truncation", type=float, default=1.0)
    parser.add_argument("--out", default="report.json")
    args = parser.parse_args(argv)
    from dalle_jax import bundle
    from dalle_jax.pipeline import Pipeline
    try:
        pipe = Pipeline.load(args.checkpoint, batch_size=64)
    except bundle.BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report, grid = run(pipe, args.num, args.seed, args.truncation)
    try:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        images_lib.save_png(args.out.rsplit(".", 1)[0] + ".png", grid,
                            {"caption": "eval: real | generated"}, scale=3)
    except (OSError, images_lib.ImageError) as e:
        print(f"error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
