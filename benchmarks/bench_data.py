"""Throughput of the image-text input pipeline on JPEG tar shards (images/s per core).

    python benchmarks/bench_data.py [--n 512] [--size 64] [--sources 256 512] [--batch 128]

Writes `--n` synthetic photographs (smooth colour fields plus grain, so that JPEG sizes are
those of real photos: ~20-30 KB at 256 px) per source size as quality-95 JPEG shards, then
measures at `--size` px:
  decode+crop  `pipeline.example_of` on records already in memory, one thread: the per-core cost
               of decoding, converting and cropping one example (JPEG DCT scaling on);
  no draft     the same with a full-size decode, to show what DCT scaling saves;
  loader       the whole `ExampleBatches` iterator (tar reading, shuffle buffer, decoding in
               N threads, tokenizing, float conversion) producing batches of `--batch`.
Set the figures beside the training step's consumption (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

try:
    import dalle_jax  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dalle_jax import images  # noqa: E402
from dalle_jax.data import pipeline, shards  # noqa: E402


def photo(rng: np.random.Generator, side: int) -> bytes:
    """A photograph-like JPEG: a smooth random colour field, a few edges, sensor grain."""
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((side, side * 3 // 4), Image.BICUBIC),
                       np.float32)
    y = np.arange(field.shape[0])[:, None]
    field[(y > rng.integers(field.shape[0])) & (np.arange(side)[None] < side // 2)] *= 0.6
    field += rng.normal(0, 6, field.shape)
    out = io.BytesIO()
    Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_corpus(root: str, n: int, side: int) -> float:
    rng = np.random.default_rng(side)
    writer = shards.ShardWriter(root, per_shard=128)
    total = 0
    for i in range(n):
        data = photo(rng, side)
        total += len(data)
        writer.add(data, "jpg", f"a synthetic photograph number {i}")
    writer.close()
    return total / n


def rate(fn, items) -> float:
    fn(items[0])
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def loader_rate(root: str, size: int, batch: int, threads: int, batches: int) -> float:
    dataset = pipeline.ExampleBatches(shards.ShardSource(root), seed=0, image_size=size,
                                      context_length=77, local_batch=batch, shuffle_buffer=256,
                                      caption_dropout=0.1, random_crop=True,
                                      num_threads=threads)
    it = iter(dataset)
    next(it)  # fills the shuffle buffer
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    it.close()
    return batches * batch / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="images per source size")
    parser.add_argument("--size", type=int, default=64, help="training resolution")
    parser.add_argument("--sources", type=int, nargs="+", default=[256, 512],
                        help="source JPEG widths")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8, help="timed loader batches")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sources:
            root = os.path.join(tmp, str(side))
            mean_bytes = write_corpus(root, args.n, side)
            records = [r for p in shards.list_shards(root) for r in shards.read_shard(p)]
            row = {"source_px": f"{side}x{side * 3 // 4}", "jpeg_kb": round(mean_bytes / 1024, 1),
                   "decode_crop_per_core": rate(
                       lambda r: pipeline.example_of(r, args.size, 0.3), records),
                   "no_draft_per_core": rate(
                       lambda r: images.square_crop(
                           images.open_rgb(io.BytesIO(r.members["jpg"])), args.size, 0.3),
                       records)}
            for threads in args.threads:
                row[f"loader_{threads}_threads"] = loader_rate(root, args.size, args.batch,
                                                               threads, args.batches)
            results.append(row)
            print(json.dumps({k: round(v) if isinstance(v, float) else v
                              for k, v in row.items()}))
    print(f"\nimages/s at {args.size} px (batch {args.batch}):\n")
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in results:
        print("| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v)
                                for v in row.values()) + " |")


if __name__ == "__main__":
    main()
