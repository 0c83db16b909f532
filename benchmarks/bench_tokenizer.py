"""Throughput of batch tokenization: dalle_jax.tokenizer.Tokenizer vs OpenAI CLIP's.

    python benchmarks/bench_tokenizer.py [--n 20000] [--batch 256] [--repeats 3]

The reference is ``clip/simple_tokenizer.py`` from ``clip-anytorch==2.6.0``
(``pip install --no-deps clip-anytorch==2.6.0``), loaded by file path so that
torch is not needed. Its batch is what ``clip.tokenize`` does: a loop of
``encode`` and padding into a preallocated array (numpy here instead of torch).

Scenarios, each timed on the same captions for both tokenizers:

* cold: a fresh tokenizer instance (empty caches) tokenizes every caption once.
* warm: the same instance tokenizes the same captions again (for ours every
  caption is then in the per-text cache; the reference only caches words).
* unique: natural sentences that are all different, on a fresh instance after
  a warm-up pass on other sentences (word caches warm, text cache useless).

Output ends with markdown table rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dalle_jax.tokenizer import Tokenizer  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
SHAPES = ["circle", "square", "triangle", "diamond", "star"]
SIZES = ["small", "large"]
POSITIONS = [
    "in the top left", "at the top", "in the top right", "on the left", "in the center",
    "on the right", "in the bottom left", "at the bottom", "in the bottom right",
]
BACKGROUNDS = ["black", "white", "gray"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]

SUBJECTS = [
    "A golden retriever", "Two children", "An old fisherman", "A red double-decker bus",
    "The city skyline", "A bowl of ramen", "A hot-air balloon", "Several cyclists",
    "A tabby cat", "A wooden rowing boat", "An astronaut", "A street musician",
    "A snow-covered cabin", "Freshly baked croissants", "A vintage typewriter",
]
VERBS = [
    "resting", "waiting", "photographed", "standing", "floating", "glowing",
    "parked", "sleeping", "drifting", "painted in watercolour",
]
PLACES = [
    "beside a quiet lake at sunset", "on a crowded market street in Marrakech",
    "under heavy rain, with reflections on the pavement", "in front of a brick wall covered in ivy",
    "on a kitchen table next to a cup of coffee", "above the clouds at dawn",
    "in a misty pine forest", "near the harbour, early in the morning",
    "on the 3rd floor of a glass office building", "at a café in Montréal",
]
STYLES = [
    "", ", 35mm film photograph", ", highly detailed, 4k", ", in the style of a 1920s poster",
    ". Shot on an iPhone.", ", oil painting, trending on artstation", " (black & white)",
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shapes_caption(rng: random.Random) -> str:
    if rng.random() < 0.3:
        (c1, c2), s1, s2 = rng.sample(COLOURS, 2), rng.choice(SHAPES), rng.choice(SHAPES)
        return f"{article(c1)} {c1} {s1} {rng.choice(RELATIONS)} {article(c2)} {c2} {s2}"
    parts = []
    if rng.random() < 0.7:
        parts.append(rng.choice(SIZES))
    parts += [rng.choice(COLOURS), rng.choice(SHAPES)]
    text = f"{article(parts[0])} {' '.join(parts)}"
    if rng.random() < 0.7:
        text += " " + rng.choice(POSITIONS)
    if rng.random() < 0.5:
        text += f" on a {rng.choice(BACKGROUNDS)} background"
    return text


def natural_caption(rng: random.Random) -> str:
    n = rng.randint(1, 999)
    return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}"
            f"{rng.choice(STYLES)} #{n}")


def make_captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [natural_caption(rng) if rng.random() < 0.2 else shapes_caption(rng) for _ in range(n)]


def load_reference():
    try:
        dist = importlib.metadata.distribution("clip-anytorch")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("reference missing: pip install --no-deps clip-anytorch==2.6.0")
    path = dist.locate_file("clip/simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer


def reference_batch(tok, texts, context_length=77, sot=49406, eot=49407):
    """clip.tokenize's rule with numpy: [sot] + ids[:L-2] + [eot], zeros after."""
    out = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [sot] + tok.encode(text)[: context_length - 2] + [eot]
        out[row, : len(ids)] = ids
    return out


def run(fn, captions, batch):
    start = time.perf_counter()
    outs = [fn(captions[i : i + batch]) for i in range(0, len(captions), batch)]
    elapsed = time.perf_counter() - start
    return len(captions) / elapsed, np.concatenate(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()

    Reference = load_reference()
    captions = make_captions(args.n, seed=0)
    rng = random.Random(1)
    unique = list(dict.fromkeys(natural_caption(rng) + f" v{i}" for i in range(args.n)))
    warmup = [natural_caption(random.Random(2)) for _ in range(200)]

    t = time.perf_counter()
    Tokenizer()
    load_s = time.perf_counter() - t
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"{args.n} captions ({len(set(captions))} distinct), batch {args.batch}, "
          f"best of {args.repeats}; vocabulary load {load_s * 1e3:.0f} ms (once per process)")

    results = {}
    for name, make, batch_fn in [
        ("ours", Tokenizer, lambda tok: (lambda b: tok(b, context_length=77))),
        ("reference", Reference, lambda tok: (lambda b: reference_batch(tok, b))),
    ]:
        best = {"cold": 0.0, "warm": 0.0, "unique": 0.0}
        for _ in range(args.repeats):
            tok = make()
            fn = batch_fn(tok)
            cold, a = run(fn, captions, args.batch)
            warm, b = run(fn, captions, args.batch)
            tok2 = make()
            fn2 = batch_fn(tok2)
            fn2(warmup)
            uniq, c = run(fn2, unique, args.batch)
            assert np.array_equal(a, b)
            best = {k: max(best[k], v) for k, v in zip(best, (cold, warm, uniq))}
        results[name] = (best, a, c)

    assert np.array_equal(results["ours"][1], results["reference"][1]), "outputs differ"
    assert np.array_equal(results["ours"][2], results["reference"][2]), "outputs differ"
    print("outputs identical: yes\n")

    print("| tokenizer | scenario | captions/s | speed-up vs reference |")
    print("|---|---|---:|---:|")
    for scenario, label in [
        ("cold", "cold caches, shapes + natural mix"),
        ("warm", "warm caches, same captions again"),
        ("unique", "all-distinct natural sentences"),
    ]:
        ours = results["ours"][0][scenario]
        ref = results["reference"][0][scenario]
        print(f"| dalle_jax.tokenizer | {label} | {ours:,.0f} | {ours / ref:.1f}x |")
        print(f"| CLIP simple_tokenizer | {label} | {ref:,.0f} | 1.0x |")


if __name__ == "__main__":
    main()
