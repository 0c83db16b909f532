"""Probe (issue 3): can a model trained on the caption's words alone place two objects?

    PYTHONPATH=. python benchmarks/layout_probe.py STEPS WIDTH LAYERS   # session 32: 3000 96 3

The layout of a shapes picture is its 8x8 box-averaged thumbnail (32 px picture), each pixel
quantised to the nearest of 11 palette colours (the 8 object colours, the 3 backgrounds). A
decoder-only Transformer reads the caption's words (both ways) and predicts the 64 pixel tokens
in raster order; it is sampled at temperature 1, one pixel at a time. Score, on 300 two-object
eval captions: for each named colour the sampled pixel nearest to it, and the two pixels' order
along the caption's axis (same row or column within one pixel); the same samples scored against
the relation-reversed captions give the chance level. Prints the score every 1,000 steps;
benchmarks/RESULTS.md (session 32) has the figures. A probe, not part of the package: words are
ids of the captions' own vocabulary, not the tokenizer's.
"""

from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_jax.data import shapes
from dalle_jax.data.pipeline import to_float_images
from dalle_jax.images import box_downsample

RES = 8                 # layout side, pixels
WORDS = 16              # caption tokens
TRAIN_SCENES = 40_000
BATCH = 64
TWO_OBJECT_SHARE = 0.6  # of each batch drawn from two-object scenes
LR = 1e-3
NEAR = 1.3              # how near (in [-1, 1] RGB units) a named colour's pixel must be
RGB = {name: np.array(v, np.float32) / 127.5 - 1 for name, v in shapes.COLOURS.items()}
PALETTE = np.array(list(RGB.values()) + [[-1, -1, -1], [1, 1, 1], [0.0039, 0.0039, 0.0039]],
                   np.float32)
START = len(PALETTE)    # the token before the first pixel


def layouts(images):
    """uint8 [N, S, S, 3] -> palette indices [N, RES * RES] of the box-averaged thumbnails."""
    thumbs = box_downsample(to_float_images(images), RES)
    return np.argmin(np.linalg.norm(thumbs[..., None, :] - PALETTE, axis=-1), -1).reshape(
        len(images), -1)


def rgb(layout):
    return PALETTE[layout].reshape(layout.shape[0], RES, RES, 3)


def layout_right(layout, captions) -> float:
    """Share of layouts whose two named colours stand in the caption's relation."""
    ok = []
    for x, caption in zip(rgb(layout), captions):
        parsed = shapes.parse_caption(caption)
        places = []
        for obj in parsed.objects:
            d = np.linalg.norm(x - RGB[obj.colour], axis=-1)
            k = np.argmin(d)
            places.append((k // RES, k % RES, d.flat[k]))
        (y1, x1, d1), (y2, x2, d2) = places
        good = d1 < NEAR and d2 < NEAR
        good &= {"to the left of": x1 < x2 and abs(y1 - y2) <= 1,
                 "to the right of": x1 > x2 and abs(y1 - y2) <= 1,
                 "above": y1 < y2 and abs(x1 - x2) <= 1,
                 "below": y1 > y2 and abs(x1 - x2) <= 1}[parsed.relation]
        ok.append(bool(good))
    return float(np.mean(ok))


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h, mask):
        a = nn.LayerNorm()(h)
        h = h + nn.MultiHeadDotProductAttention(4, qkv_features=self.width)(a, a, mask=mask)
        a = nn.LayerNorm()(h)
        return h + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(a)))


class LayoutModel(nn.Module):
    """Words (read both ways), then pixel tokens, each pixel predicted from those before it."""

    vocab: int
    width: int
    layers: int

    @nn.compact
    def __call__(self, words, pixels):  # pixels: the layout shifted right by START
        n = WORDS + RES * RES
        h = jnp.concatenate([nn.Embed(self.vocab, self.width)(words),
                             nn.Embed(len(PALETTE) + 1, self.width)(pixels)], 1)
        h = h + self.param("pos", nn.initializers.normal(0.02), (n, self.width))
        causal = jnp.tril(jnp.ones((n, n), bool)).at[:WORDS, :WORDS].set(True)
        keep = jnp.concatenate([words > 0, jnp.ones(pixels.shape, bool)], 1)
        mask = causal[None, None] & keep[:, None, None, :]
        for _ in range(self.layers):
            h = Block(self.width)(h, mask)
        return nn.Dense(len(PALETTE))(nn.LayerNorm()(h[:, WORDS:]))


def shifted(layout):
    return jnp.concatenate([jnp.full((layout.shape[0], 1), START), layout[:, :-1]], 1)


def main(argv) -> int:
    steps, width, layers = (int(a) for a in argv[:3])
    images, captions = shapes.examples(range(TRAIN_SCENES), "train", 0, 32)
    train = layouts(images)
    eval_index = [i for i in range(3000) if len(shapes.scene(i, "eval", 0).objects) == 2][:300]
    eval_images, eval_captions = shapes.examples(eval_index, "eval", 0, 32)
    reversed_captions = [shapes.reverse_relation(c)[1] for c in eval_captions]
    words = sorted({w for c in captions + eval_captions for w in c.split()})
    vocab = {w: i + 1 for i, w in enumerate(words)}

    def tokens(texts):
        out = np.zeros((len(texts), WORDS), np.int32)
        for k, text in enumerate(texts):
            ids = [vocab[w] for w in text.split()][:WORDS]
            out[k, :len(ids)] = ids
        return out

    train_tokens, eval_tokens = tokens(captions), tokens(eval_captions)
    two = np.array([k for k, c in enumerate(captions)
                    if len(shapes.parse_caption(c).objects) == 2])
    real = layouts(eval_images)
    print(f"quantised real layouts: {layout_right(real, eval_captions):.3f}, relation reversed "
          f"{layout_right(real, reversed_captions):.3f}", flush=True)

    model = LayoutModel(len(vocab) + 1, width, layers)
    params = model.init(jax.random.key(0), train_tokens[:2], shifted(train[:2]))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, LR, min(200, steps // 2), steps),
                     weight_decay=0.01)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, words, layout):
        def loss_fn(p):
            logits = model.apply(p, words, shifted(layout))
            return optax.softmax_cross_entropy_with_integer_labels(logits, layout).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def sample(params, words, key):
        def body(i, carry):
            layout, key = carry
            key, k = jax.random.split(key)
            logits = model.apply(params, words, shifted(layout))[:, i]
            return layout.at[:, i].set(jax.random.categorical(k, logits)), key
        empty = jnp.zeros((words.shape[0], RES * RES), jnp.int32)
        return jax.lax.fori_loop(0, RES * RES, body, (empty, key))[0]

    rng = np.random.default_rng(0)
    start, loss = time.time(), float("nan")
    for step in range(steps + 1):
        if step % 1000 == 0 or step == steps:
            drawn = np.asarray(sample(params, eval_tokens, jax.random.key(1)))
            print(f"step {step} {time.time() - start:.0f}s loss {float(loss):.4f} layout right "
                  f"{layout_right(drawn, eval_captions):.3f}, relation reversed "
                  f"{layout_right(drawn, reversed_captions):.3f}", flush=True)
        if step == steps:
            break
        i = np.where(rng.random(BATCH) < TWO_OBJECT_SHARE, rng.choice(two, BATCH),
                     rng.integers(0, TRAIN_SCENES, BATCH))
        params, opt_state, loss = train_step(params, opt_state, train_tokens[i], train[i])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
