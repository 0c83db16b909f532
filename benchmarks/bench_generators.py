"""The GAN and unCLIP generators side by side, on the same CPU in one run: what each costs to
train and to sample, and how well each follows shapes prompts.

    python benchmarks/bench_generators.py [--part speed|adherence|all] [--num 300]
        [--gan MODEL.npz] [--unclip MODEL.npz] [--steps 5]  # --num 400 by default
        [--generators gan unclip] [--unclip-steps 25 50] [--rerank 1 8]
        [--prior-temperature 1 0.5]

speed      training throughput of each stage of both pipelines (the shipped configs,
           configs/shapes_gan.py and configs/shapes_unclip.py, random weights: speed does not
           depend on them), and Pipeline.generate images/s, prompt to uint8 picture, for the
           GAN and for unCLIP at 25, 50 and 250 decoder steps (prior at its default 25).
           Needs an otherwise idle machine.
adherence  the analytic scorer on the first `--num` eval captions, one picture each, seed 0:
           the GAN, and unCLIP at 25 and 50 decoder steps (guidance 3, the defaults), by group
           (one object seen / held-out pair, two objects) with Wilson 95% intervals; with
           `--rerank K`, also each picture as the best of K candidates by the model's CLIP.
           Times do not matter here, so it may share the machine.
Without --gan / --unclip the shipped models are used.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_clip import matmul_peak_gflops  # noqa: E402
from bench_gan import ROOT, bench_stage  # noqa: E402
from dalle_jax import host  # noqa: E402
from dalle_jax.data import shapes  # noqa: E402
from dalle_jax.metrics import adherence  # noqa: E402
from dalle_jax.pipeline import Pipeline  # noqa: E402

CONFIGS = {"gan": os.path.join(ROOT, "configs", "shapes_gan.py"),
           "unclip": os.path.join(ROOT, "configs", "shapes_unclip.py")}
GROUPS = ("one_object_seen", "one_object_held_out", "two_object")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927), 95% by default."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def adherence_by_group(pictures, captions) -> dict[str, tuple[int, int]]:
    """{group: (right, n)}: every stated attribute right, per group of summary()."""
    counts = {g: [0, 0] for g in GROUPS}
    for result, caption in zip(adherence.score_batch(pictures, captions), captions):
        parsed = shapes.parse_caption(caption)
        if len(parsed.objects) == 2:
            group = "two_object"
        elif (parsed.objects[0].colour, parsed.objects[0].shape) in shapes.HELD_OUT:
            group = "one_object_held_out"
        else:
            group = "one_object_seen"
        counts[group][0] += int(result.ok)
        counts[group][1] += 1
    return {g: tuple(c) for g, c in counts.items()}


def _cell(right: int, n: int) -> str:
    lo, hi = wilson(right, n)
    return f"{right / n:.1%} [{lo:.1%}, {hi:.1%}] (n={n})" if n else "-"


def part_adherence(args):
    _, captions = shapes.examples(range(args.num), split="eval", seed=0, size=32)
    rows = []
    runs = []
    for k in args.rerank:
        best = f", best of {k} by CLIP" if k > 1 else ""
        if "gan" in args.generators:
            for tau in args.prior_temperature or [None]:
                temp = {} if tau is None else {"prior_temperature": tau}
                label = "GAN" + ("" if tau is None else f", prior temperature {tau:g}")
                runs.append((f"{label}{best}", "gan", args.gan, {"rerank": k, **temp}))
        if "unclip" in args.generators:
            runs += [(f"unCLIP, {s} decoder steps{best}", "unclip", args.unclip,
                      {"steps": s, "rerank": k}) for s in args.unclip_steps]
    print(f"\n| adherence, {args.num} eval captions, seed 0 | "
          + " | ".join(g.replace("_", " ") for g in GROUPS) + " | seconds |")
    print("|---|" + "---:|" * (len(GROUPS) + 1))
    for label, generator, path, options in runs:
        pipe = Pipeline.load(path, generator=generator, batch_size=64)
        t = time.perf_counter()
        pictures = pipe.generate(captions, 1, seed=0, **options)
        seconds = time.perf_counter() - t
        counts = adherence_by_group(pictures, captions)
        rows.append((label, counts))
        print(f"| {label} | " + " | ".join(_cell(*counts[g]) for g in GROUPS)
              + f" | {seconds:.0f} |", flush=True)
    return rows


def bench_generate(pipe, batch: int, reps: int, **options) -> float:
    prompts = ["a large red circle in the top left"] * batch
    pipe.generate(prompts, seed=0, **options)  # compile
    times = []
    for r in range(reps):
        t = time.perf_counter()
        pipe.generate(prompts, seed=r + 1, **options)
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def part_speed(args):
    peak = matmul_peak_gflops()
    print(f"float32 matmul peak (2048^3, best of 5): {peak:.1f} GFLOP/s\n")
    print("| training stage | batch | trained params | step (s) | images/s | GFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for generator, config in CONFIGS.items():
        for stage in ("prior", "decoder"):
            overrides = ("clip.import_from=",) if generator == "unclip" else ()
            r = bench_stage(stage, args.steps, overrides, config=config)
            print(f"| {generator} {stage} ({r['family']}) | {r['batch']} | "
                  f"{r['params'] / 1e6:.2f}M | {r['step_s']:.3f} | {r['images_per_s']:.1f} | "
                  f"{r['gflops_per_s']:.1f} | {r['gflops_per_s'] / peak:.0%} |", flush=True)
    print("\n| sampling, prompt -> uint8 picture | batch | images/s | vs unCLIP at 50 steps |")
    print("|---|---:|---:|---:|")
    gan = Pipeline.load(args.gan, generator="gan", batch_size=64)
    unclip = Pipeline.load(args.unclip, generator="unclip", batch_size=args.batch)
    rows = [("GAN", 64, bench_generate(gan, 64, args.reps))]
    for steps in (25, 50, 250):
        reps = args.reps if steps < 250 else 1
        rows.append((f"unCLIP, {steps} decoder steps", args.batch,
                     bench_generate(unclip, args.batch, reps, steps=steps)))
    reference = rows[2][2]
    for label, batch, rate in rows:
        print(f"| {label} | {batch} | {rate:.2f} | {rate / reference:.1f}x |", flush=True)


def main(argv=None):
    host.from_environment()  # DALLE_JAX_MALLOC=keep: dalle_jax/host.py
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "adherence", "all"), default="all")
    parser.add_argument("--num", type=int, default=400, help="eval captions for adherence "
                        "(400 hold about 265 one-object captions)")
    parser.add_argument("--gan", help="GAN model file (default: shipped)")
    parser.add_argument("--unclip", help="unCLIP model file (default: shipped)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--reps", type=int, default=3, help="timed sampling calls")
    parser.add_argument("--batch", type=int, default=16, help="unCLIP sampling batch")
    parser.add_argument("--generators", nargs="+", choices=("gan", "unclip"),
                        default=["gan", "unclip"], help="adherence: which generators")
    parser.add_argument("--unclip-steps", nargs="+", type=int, default=[25, 50],
                        help="adherence: unCLIP decoder steps to score")
    parser.add_argument("--prior-temperature", nargs="+", type=float, metavar="T",
                        help="adherence: GAN rows at these prior temperatures, for a GAN "
                        "model with a flow prior (default: the Pipeline's)")
    parser.add_argument("--rerank", nargs="+", type=int, default=[1], metavar="K",
                        help="adherence: also score the best of K candidates by CLIP "
                        "(Pipeline.generate's rerank)")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    print(f"# GAN vs unCLIP, {time.strftime('%Y-%m-%d %H:%M')}, commit {commit}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    if args.part in ("speed", "all"):
        part_speed(args)
    if args.part in ("adherence", "all"):
        part_adherence(args)


if __name__ == "__main__":
    main()
