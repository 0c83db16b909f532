"""Judge a trained pipeline on the shapes eval split: image quality and prompt adherence.

    python -m dalle_jax.evaluate [--checkpoint workdir/model.npz] [--num 600] [--out report.json]
        [--generator gan|unclip] [--fid-weights inception_fid.npz [--data DIR]]
        [--captions SHARDS_OR_FOLDER] [sampling options, as sample.py's: --steps 25 ...]

With --captions the model is judged on image-text data instead (the emoji corpus's eval/, say):
one picture per caption, CLIP score, and FID/KID against those captions' own pictures; the
shapes-only reports below are skipped.

Reports (JSON, and a short table on stdout):
  quality      over the pictures drawn for the eval captions (one each, with the prior): CLIP
               score against their captions by the model's own CLIP (labelled "in-house
               CLIP": not OpenAI's, so comparable only between models judged by one CLIP),
               and with --fid-weights (made by `python -m dalle_jax.metrics.fid convert`) FID
               and KID against real pictures: the eval split's at the model's resolution, or
               every picture in --data DIR; without weights FID is skipped and says so;
  adherence    one picture per eval caption, every stated attribute right, by group: one-object
               with a seen colour-shape pair, one-object with a held-out pair, two objects;
               again without the prior (the text vector decoded as if it were an image's);
  diversity    for one-object prompts that leave the position (or the background) open, how
               many distinct positions (backgrounds) 8 seeds produce, and the mean pixel
               distance between pictures of one prompt;
  variations   variations of ground-truth pictures that keep the source's colour and shape;
  edits        edits from the true caption to the caption with another colour word: the new
               colour is drawn and the shape and position are kept, at several amounts;
plus a grid PNG beside the report. Without --checkpoint the shipped model is judged. Every
picture is drawn with the generator's sampling options (its defaults, or the flags given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from dalle_jax import images as images_lib
from dalle_jax.cli import add_sampling_options, one_line, output_problem, sampling_options
from dalle_jax.data import pipeline, shapes
from dalle_jax.data.files import DataError
from dalle_jax.metrics import adherence, clip_score
from dalle_jax.metrics import fid as fid_lib

DIVERSITY_PROMPTS, DIVERSITY_SAMPLES = 40, 8
SOURCES, VARIATIONS, EDIT_AMOUNTS = 100, 4, (0.3, 0.5, 0.7)


class EvaluateError(ValueError):
    """Unusable evaluation input (a --data folder, too few pictures). One line, for the user."""


def _read(image):
    found = adherence.analyse(image)
    obj = found["objects"][0] if found["objects"] else None
    return found["background"], obj


def adherence_report(pipe, captions, seed=0, options=None, use_prior=True, progress=None):
    pictures = pipe.generate(captions, 1, seed, use_prior=use_prior, progress=progress,
                             **(options or {}))
    results = adherence.score_batch(pictures, captions)
    report = adherence.summary(results, captions)
    # Which stated attributes fail, over one-object captions: where to look first.
    report["one_object_checks"] = adherence.one_object_check_rates(results, captions)
    report["one_object_shape_by_kind"] = adherence.one_object_shape_rates(results, captions)
    report["two_object_checks"] = adherence.check_rates(results, captions, 2)
    return report, pictures


def _diversity_prompts(captions):
    return [c for c in captions if (p := shapes.parse_caption(c)) and len(p.objects) == 1
            and (p.objects[0].position is None or p.background is None)][:DIVERSITY_PROMPTS]


def diversity_report(pipe, captions, samples=DIVERSITY_SAMPLES, seed=0, options=None,
                     progress=None):
    open_position, open_background, distances = [], [], []
    prompts = _diversity_prompts(captions)
    if not prompts:
        return {}
    pictures = pipe.generate(prompts, samples, seed, progress=progress,
                             **(options or {})).reshape(
        len(prompts), samples, *(pipe.image_size,) * 2, 3)
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


def variation_report(pipe, images, captions, num=VARIATIONS, seed=0, limit=SOURCES,
                     options=None, progress=None):
    images, captions = _one_object(images, captions, limit)
    out = pipe.variations(images, num, seed, **(options or {}))
    if progress is not None:
        progress.update(len(out))
    kept = []
    for i, caption in enumerate(captions):
        obj = shapes.parse_caption(caption).objects[0]
        for picture in out[i * num:(i + 1) * num]:
            _, found = _read(picture)
            kept.append(bool(found) and found["colour"] == obj.colour and found["shape"] == obj.shape)
    return {"sources": len(captions), "per_source": num,
            "keep_colour_and_shape": float(np.mean(kept))}


def edit_report(pipe, images, captions, amounts=EDIT_AMOUNTS, seed=0, limit=SOURCES,
                options=None, progress=None):
    images, captions = _one_object(images, captions, limit)
    rng = np.random.default_rng(seed)
    targets = [rng.choice(shapes.caption_variants(c, "colour")[1:]) for c in captions]
    out = {}
    for amount in amounts:
        ok = []
        edits = pipe.edit(images, captions, targets, amount, seed,
                          **(options or {}))  # one batched call
        if progress is not None:
            progress.update(len(edits))
        for image, caption, target, edited in zip(images, captions, targets, edits):
            src = shapes.parse_caption(caption).objects[0]
            want = shapes.parse_caption(target).objects[0]
            _, before = _read(image)
            _, after = _read(edited)
            ok.append(bool(after) and bool(before) and after["colour"] == want.colour
                      and after["shape"] == src.shape and after["position"] == before["position"])
        out[f"amount_{amount}"] = float(np.mean(ok))
    return {"sources": len(captions), "colour_changed_shape_and_position_kept": out}


def picture_files(folder: str) -> list[str]:
    """The pictures under `folder` (recursively, sorted). Raises EvaluateError if none."""
    if not os.path.isdir(folder):
        raise EvaluateError(f"--data {folder} is not a folder of pictures")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(fid_lib.IMAGE_SUFFIXES))
    if not paths:
        raise EvaluateError(f"no pictures ({', '.join(fid_lib.IMAGE_SUFFIXES)}) under {folder}")
    return paths


def folder_batches(folder: str, size: int, batch_size: int = 64):
    """uint8 [B, size, size, 3] batches of every picture under `folder`, each read (square
    crop, resize) by images.load_image; a broken file is an ImageError naming it."""
    paths = picture_files(folder)
    for start in range(0, len(paths), batch_size):
        yield np.stack([images_lib.load_image(p, size) for p in paths[start:start + batch_size]])


def quality_report(pictures, captions, scorer: clip_score.CLIPScore, fid_net=None,
                   real_batches=(), fid_cache: str | None = None,
                   progress: bool = False) -> dict:
    """CLIP score of the pictures against their captions; with an FID network, FID and KID
    against the real pictures of `real_batches` (an iterable of uint8 batches, or a
    zero-argument callable returning one), whose features come from the cache folder
    `fid_cache` when these exact pictures were scored by this network before
    (`fid.cached_features`; the report's "real_features" says which)."""
    report = {"images": len(pictures), "clip": scorer.label,
              "clip_score": scorer.score(pictures, captions)["clip_score"]}
    if fid_net is None:
        return {**report, "fid": None, "kid_mean": None, "kid_std": None,
                "fid_skipped": "no --fid-weights given"}
    step = getattr(fid_net, "batch_size", 64)
    with tqdm(total=len(pictures), unit="img", desc="FID features, generated",
              disable=not progress, file=sys.stderr) as bar:
        fake = []
        for start in range(0, len(pictures), step):
            fake.append(fid_net.features(pictures[start:start + step]))
            bar.update(len(fake[-1]))
        fake = np.concatenate(fake)
    if not callable(real_batches):  # cached_features may read them twice
        kept = list(real_batches)
        real_batches = lambda: kept  # noqa: E731
    with tqdm(unit="img", desc="FID features, real", disable=not progress,
              file=sys.stderr) as bar:
        real, source = fid_lib.cached_features(fid_net, real_batches, fid_cache, bar)
    if min(len(fake), len(real)) < 2:
        raise EvaluateError(f"FID and KID need at least 2 pictures per set, not {len(fake)} "
                            f"generated and {len(real)} real")
    kid_mean, kid_std = fid_lib.kid(fake, real)
    return {**report, "real_images": len(real), "real_features": source,
            "fid": fid_lib.fid(fake, real),
            "kid_mean": kid_mean, "kid_std": kid_std,
            "kid_subset_size": min(1000, len(fake), len(real))}


def _pictures_to_draw(captions, num: int) -> int:
    one_object = sum(len(shapes.parse_caption(c).objects) == 1 for c in captions)
    sources = min(one_object, SOURCES)
    return (2 * num + len(_diversity_prompts(captions)) * DIVERSITY_SAMPLES
            + sources * (VARIATIONS + len(EDIT_AMOUNTS)))


def run(pipe, num: int = 600, seed: int = 0, options: dict | None = None,
        fid_net=None, data: str | None = None, scorer: clip_score.CLIPScore | None = None,
        progress: bool = True, fid_cache: str | None = None) -> tuple[dict, np.ndarray]:
    """The report and its grid. `options` are the generator's sampling options (`Pipeline`'s
    OPTIONS; the rest keep their defaults), used for every picture drawn. With `fid_net` (a
    metrics.fid.FID), FID/KID against the pictures under `data`, or the eval split's own
    pictures when `data` is None (their features cached in the folder `fid_cache`, when
    given)."""
    images, captions = shapes.examples(range(num), split="eval", seed=0, size=pipe.image_size)
    t = time.perf_counter()
    options = dict(options or {})
    report = {"model": pipe.path, "generator": pipe.generator_name, "eval_captions": num,
              "seed": seed, "options": pipe.options(options)}
    bar = tqdm(total=_pictures_to_draw(captions, num), unit="img", desc="sampling",
               disable=not progress, file=sys.stderr)
    kw = dict(seed=seed, options=options, progress=bar)
    with bar:
        report["adherence"], pictures = adherence_report(pipe, captions, **kw)
        report["adherence_without_prior"], _ = adherence_report(pipe, captions, use_prior=False,
                                                                **kw)
        report["diversity"] = diversity_report(pipe, captions, **kw)
        report["variations"] = variation_report(pipe, images, captions, **kw)
        report["edits"] = edit_report(pipe, images, captions, **kw)
    return _finish(report, pipe, images, pictures, captions, scorer, fid_net, data,
                   "shapes eval split", t, fid_cache, progress)


def run_captioned(pipe, path: str, num: int = 600, seed: int = 0,
                  options: dict | None = None, fid_net=None, data: str | None = None,
                  scorer: clip_score.CLIPScore | None = None, progress: bool = True,
                  fid_cache: str | None = None) -> tuple[dict, np.ndarray]:
    """The report and grid on image-text data instead of shapes: one picture for each caption
    of the first `num` usable pictures at `path` (shards or a folder with captions, e.g. the
    emoji corpus's held-out split), its CLIP score and, with `fid_net`, FID/KID against those
    same pictures (or every picture under `data`). Adherence needs shapes and is not run."""
    try:
        images, captions = pipeline.read_examples(path, pipe.image_size, num)
    except DataError as e:
        raise EvaluateError(f"--captions {path}: {e}") from e
    t = time.perf_counter()
    options = dict(options or {})
    report = {"model": pipe.path, "generator": pipe.generator_name, "captions_from": path,
              "eval_captions": len(captions), "seed": seed, "options": pipe.options(options)}
    with tqdm(total=len(captions), unit="img", desc="sampling", disable=not progress,
              file=sys.stderr) as bar:
        pictures = pipe.generate(captions, 1, seed, progress=bar, **options)
    return _finish(report, pipe, images, pictures, captions, scorer, fid_net, data, path, t,
                   fid_cache, progress)


def _finish(report, pipe, images, pictures, captions, scorer, fid_net, data, real_name, t,
            fid_cache=None, progress=False):
    """Both reports' end: quality (CLIP score; FID/KID against `images`, or every picture
    under `data`), timings, and the grid of real | generated pairs."""
    report["seconds_sampling"] = time.perf_counter() - t
    real = ((lambda: [images]) if data is None else
            (lambda: folder_batches(data, pipe.image_size)))
    quality = quality_report(pictures, captions,
                             scorer or clip_score.CLIPScore.from_pipeline(pipe), fid_net, real,
                             fid_cache, progress)
    for key in ("fid", "kid_mean", "kid_std", "clip_score"):
        report[key] = quality.pop(key)
    quality["real"] = None if fid_net is None else data or real_name
    report["quality"] = quality  # what the four numbers above were measured on
    report["seconds"] = time.perf_counter() - t
    return report, images_lib.grid(np.stack([images[:48], pictures[:48]], 1).reshape(
        -1, *images.shape[1:]), cols=16)


def output_paths(out: str) -> tuple[str, str]:
    """(report JSON, grid PNG beside it): report.json -> report.png; a report named *.png
    gets its grid as *.grid.png, never the same file; any other name keeps its whole name
    (trunc0.7 -> trunc0.7.png, so that trunc0.4's grid is not the same file)."""
    root, ext = os.path.splitext(out)
    if ext.lower() == ".json":
        return out, root + ".png"
    return out, (root + ".grid.png" if ext.lower() == ".png" else out + ".png")


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
    parser.add_argument("--generator", default="gan", choices=("gan", "unclip"),
                        help="the model's generator (gan or unclip)")
    add_sampling_options(parser)
    parser.add_argument("--fid-weights", metavar="NPZ", help="the FID Inception weights "
                        "(`python -m dalle_jax.metrics.fid convert inception_fid.npz`); "
                        "without them FID and KID are skipped")
    parser.add_argument("--data", metavar="DIR", help="real pictures FID/KID compare against "
                        "(default: the shapes eval split at the model's resolution, or the "
                        "--captions pictures)")
    parser.add_argument("--captions", metavar="PATH", help="judge on image-text data instead "
                        "of shapes: the captions (and real pictures) of these shards or this "
                        "folder, e.g. the emoji corpus's eval/; adherence is skipped")
    parser.add_argument("--fid-cache", metavar="DIR", default=fid_lib.default_cache_dir(),
                        help="where the real pictures' Inception features are kept, keyed by "
                        "the exact pictures and weights, so a rerun skips them (default: "
                        "%(default)s)")
    parser.add_argument("--no-fid-cache", action="store_true",
                        help="compute the real pictures' features every time")
    parser.add_argument("--out", default="report.json",
                        help="the JSON report; its grid PNG is written beside it")
    args = parser.parse_args(argv)
    from dalle_jax import host
    host.from_environment()
    from dalle_jax import bundle
    from dalle_jax.pipeline import Pipeline
    if not 1 <= args.num <= 100_000:
        return _error(f"--num must be between 1 and 100000, not {args.num}")
    try:
        options = sampling_options(args, args.generator)
    except ValueError as e:
        return _error(one_line(str(e)))
    if args.data and not args.fid_weights:
        return _error("--data sets the real pictures of FID/KID: give --fid-weights too")
    if args.fid_weights and args.num < 2:
        return _error(f"FID and KID need --num of at least 2, not {args.num}")
    fid_net = None
    try:  # the inputs are checked before the model runs for minutes
        if args.data:
            picture_files(args.data)
        if args.captions and not os.path.exists(args.captions.split("{")[0].split("*")[0]):
            raise EvaluateError(f"--captions {args.captions}: no such file or folder")
        if args.fid_weights:
            fid_net = fid_lib.FID.load(args.fid_weights)
    except (EvaluateError, fid_lib.FIDError) as e:
        return _error(one_line(str(e)))
    for path in output_paths(args.out):  # before the model runs for minutes
        problem = output_problem(path)
        if problem:
            return _error(one_line(problem))
    try:
        pipe = Pipeline.load(args.checkpoint, generator=args.generator, batch_size=64)
        pipe.options(options)  # what this model's prior takes (a GAN holds one of two)
    except (bundle.BundleError, ValueError) as e:
        return _error(one_line(str(e)))
    if fid_net is None:
        print("FID and KID skipped: no --fid-weights given", file=sys.stderr)
    cache = None if args.no_fid_cache else args.fid_cache
    try:
        if args.captions:
            report, grid = run_captioned(pipe, args.captions, args.num, args.seed,
                                         options, fid_net, args.data, fid_cache=cache)
        else:
            report, grid = run(pipe, args.num, args.seed, options, fid_net, args.data,
                               fid_cache=cache)
    except (EvaluateError, fid_lib.FIDError, images_lib.ImageError) as e:
        return _error(one_line(str(e)))
    try:
        _write(args.out, report, grid)
    except (OSError, images_lib.ImageError) as e:
        return _error(one_line(f"cannot write the report {args.out}: "
                               f"{getattr(e, 'strerror', None) or e}"))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
