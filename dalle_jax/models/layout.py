"""A text-to-layout stage for captioned shapes: where each named object goes, as a coarse map.

The frozen CLIP's image vector does not say which of two objects stands where (the contrastive
loss never needed the relation: benchmarks/RESULTS.md, session 31), and a decoder that reads
the caption beside it did not learn to place two objects (session 31). A decoder-only
Transformer that reads the caption's words and then writes a coarse map one cell at a time, in
raster order, does (session 32, `benchmarks/layout_probe.py`): the autoregressive
factorisation of DALL-E (Ramesh et al. 2021) over a `RES` x `RES` map of cell classes, as in
layout-first text-to-image work (Hong et al. 2018, "Inferring Semantic Layout for Hierarchical
Text-to-Image Synthesis"; Make-A-Scene, Gafni et al. 2022, conditions on a segmentation map).

A cell's class is the background colour or the (colour, shape) of the object covering it, so
the map binds each colour to its shape as the caption does, and the GAN decoder
(`models/gan.py`, `layout_classes`) draws from the map and the image vector together.

`targets` reads a training picture's map from the picture and its caption's tokens (each pixel
to the nearest of the colours the caption names and the three backgrounds; the object whose
pixels cover a quarter of a cell or more takes the cell; the object's shape is the word after
its colour), in JAX, inside the training step.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.data import shapes
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import layers

RES = 8  # cells per side
BACKGROUNDS = tuple(shapes.BACKGROUNDS)
COLOURS = tuple(shapes.COLOURS)
SHAPES = tuple(shapes.SHAPES)
# Classes: the backgrounds, then (colour, shape) colour-major.
CLASSES = BACKGROUNDS + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
NUM_CLASSES = len(CLASSES)
# Each class as its two factors: its colour (the object colours, then the backgrounds) and its
# shape (the shapes, then "none" for a background). Models read and write classes through
# them, so that a (colour, shape) pair never seen together (the held-out pairs) is as
# reachable as its colour and its shape are.
CLASS_COLOUR = np.asarray([len(COLOURS) + i for i in range(len(BACKGROUNDS))]
                          + [c for c in range(len(COLOURS)) for _ in SHAPES], np.int32)
CLASS_SHAPE = np.asarray([len(SHAPES)] * len(BACKGROUNDS)
                         + [s for _ in COLOURS for s in range(len(SHAPES))], np.int32)
NUM_COLOURS, NUM_SHAPES = len(COLOURS) + len(BACKGROUNDS), len(SHAPES) + 1
NUM_FACTORS = NUM_COLOURS + NUM_SHAPES
# The share of a cell an object must cover to take it.
COVER = 0.25


def object_class(colour: str, shape: str) -> int:
    return len(BACKGROUNDS) + COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


@functools.cache
def _word_ids() -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """The tokenizer's ids of each colour word and each shape word."""
    from dalle_jax.tokenizer import Tokenizer
    t = Tokenizer()
    return tuple(tuple(t.encode(c)) for c in COLOURS), tuple(tuple(t.encode(s)) for s in SHAPES)


def _ends_with(tokens, ids):
    """[B, L] bool: the token sequence `ids` ends at each position."""
    hit = jnp.ones(tokens.shape, bool)
    for back, i in enumerate(reversed(ids)):
        earlier = jnp.pad(tokens, ((0, 0), (back, 0)), constant_values=-1)[:, :tokens.shape[1]]
        hit = hit & (earlier == i)
    return hit


def named_objects(tokens):
    """([B, colours] bool, [B, colours] int): which colours the caption names with a shape
    word right after, and that shape's index (a two-object caption's colours differ)."""
    colour_ids, shape_ids = _word_ids()
    colour_end = jnp.stack([_ends_with(tokens, ids) for ids in colour_ids], -1)   # [B, L, C]
    # a shape word starting at the next position
    nxt = jnp.pad(tokens, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
    starts = [nxt == ids[0] for ids in shape_ids]  # shape words are single tokens here
    shape_next = jnp.stack(starts, -1)                                               # [B, L, S]
    pairs = jnp.einsum("blc,bls->bcs", colour_end.astype(jnp.int32),
                       shape_next.astype(jnp.int32))
    return pairs.sum(-1) > 0, jnp.argmax(pairs, -1)


def palette():
    """[colours + backgrounds, 3] in [-1, 1]: the object colours, then the backgrounds."""
    rgb = [shapes.COLOURS[c] for c in COLOURS] + [shapes.BACKGROUNDS[b] for b in BACKGROUNDS]
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


def targets(images, tokens, res: int = RES):
    """The layout of training pictures [B, S, S, 3] in [-1, 1] with their captions' token ids
    [B, L]: int32 [B, res * res] classes (see the module's docstring). S must be a multiple of
    res."""
    b, s = images.shape[0], images.shape[1]
    if s % res:
        raise ValueError(f"a {s} px picture does not split into {res} x {res} cells")
    named, shape_of = named_objects(tokens)
    pal = jnp.asarray(palette())
    n_colours = len(COLOURS)
    d = jnp.sum(jnp.square(images[..., None, :] - pal), -1)                  # [B, S, S, P]
    allowed = jnp.concatenate([named, jnp.ones((b, len(BACKGROUNDS)), bool)], -1)
    nearest = jnp.argmin(jnp.where(allowed[:, None, None, :], d, jnp.inf), -1)
    k = s // res
    counts = jax.nn.one_hot(nearest, len(pal)).reshape(b, res, k, res, k, -1).sum((2, 4))
    counts = counts.reshape(b, res * res, -1) / (k * k)                       # cover shares
    obj, bg = counts[..., :n_colours], counts[..., n_colours:]
    colour = jnp.argmax(obj, -1)
    shape = jnp.take_along_axis(shape_of, colour, axis=1)
    is_object = jnp.max(obj, -1) >= COVER
    return jnp.where(is_object, len(BACKGROUNDS) + colour * len(SHAPES) + shape,
                     jnp.argmax(bg, -1)).astype(jnp.int32)


def factors(layout):
    """int classes [...] (-1: none) -> float [..., NUM_FACTORS]: the one-hot colour beside the
    one-hot shape (zeros for -1)."""
    known = (layout >= 0)[..., None]
    k = jnp.maximum(layout, 0)
    return jnp.where(known, jnp.concatenate(
        [jax.nn.one_hot(jnp.asarray(CLASS_COLOUR)[k], NUM_COLOURS),
         jax.nn.one_hot(jnp.asarray(CLASS_SHAPE)[k], NUM_SHAPES)], -1), 0.0)


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    token_dim: int = 128      # the CLIP token embeddings' width
    context_length: int = 16
    width: int = 96
    layers: int = 3
    num_heads: int = 4
    res: int = RES
    # > 0: the layout is also drawn given a CLIP image vector of this width (read as one more
    # word before the caption's), so that it agrees with the picture the decoder draws from
    # that vector (the prior's sample in the pipeline).
    vector_dim: int = 0


def prefix_mask(config: LayoutConfig, word_mask):
    """The mask of what the cells read before them: the image vector (where the model reads
    one, always there) and the caption's words."""
    if not config.vector_dim:
        return word_mask
    return jnp.concatenate([jnp.ones((word_mask.shape[0], 1), bool), word_mask], 1)


class SelfAttention(nn.Module):
    """Multi-head attention with the parameters of flax's `MultiHeadDotProductAttention`
    (query, key, value [width, heads, width / heads], out [heads, width / heads, width]), its
    projections and its attention apart, so that a sampler can keep the keys and values of the
    positions already seen."""

    width: int
    num_heads: int

    def setup(self):
        per_head = (self.num_heads, self.width // self.num_heads)
        self.query = nn.DenseGeneral(per_head)
        self.key = nn.DenseGeneral(per_head)
        self.value = nn.DenseGeneral(per_head)
        self.out = nn.DenseGeneral(self.width, axis=(-2, -1))

    def qkv(self, x):
        return self.query(x), self.key(x), self.value(x)

    def __call__(self, q, k, v, mask):
        return self.out(layers.attention(q, k, v, mask=mask))


class LayoutModel(nn.Module):
    """(CLIP token embeddings [B, L, T], mask [B, L], layout [B, N]) -> logits [B, N, classes]
    for each cell given the caption and the cells before it (N = res * res, raster order);
    with `vector_dim`, also given a CLIP image vector [B, vector_dim] (normalised here), read
    as one more word before the caption's.

    The words attend to each other both ways (a caption is read whole), the cells to every word
    and to the cells before them (pre-LN Transformer blocks, learned positions). A cell is read
    as its colour's embedding plus its shape's, and a class's logit is its colour's logit plus
    its shape's (`CLASS_COLOUR`, `CLASS_SHAPE`): a product of a colour and a shape distribution
    over the valid pairs, so a pair the training pictures never hold (a held-out pair) is drawn
    where the caption names it.

    Since no word attends to a cell, the words' keys and values are computed once
    (`encode_words`) and a sampler adds one cell at a time (`decode_cell`), each cell's keys
    and values kept: 64 steps of one position each instead of 64 passes over all 80."""

    config: LayoutConfig

    def setup(self):
        c = self.config
        self.embed_words = nn.Dense(c.width)
        if c.vector_dim:
            self.embed_vector = nn.Dense(c.width)
        self.embed_colours = nn.Embed(NUM_COLOURS + 1, c.width)  # + the start token's
        self.embed_shapes = nn.Embed(NUM_SHAPES + 1, c.width)
        self.positions = self.param("positions", nn.initializers.normal(0.02),
                                    (bool(c.vector_dim) + c.context_length + c.res * c.res,
                                     c.width))
        for i in range(c.layers):
            setattr(self, f"block{i}_ln_1", nn.LayerNorm())
            setattr(self, f"block{i}_attn", SelfAttention(c.width, c.num_heads))
            setattr(self, f"block{i}_ln_2", nn.LayerNorm())
            setattr(self, f"block{i}_fc", nn.Dense(4 * c.width))
            setattr(self, f"block{i}_proj", nn.Dense(c.width))
        self.ln_final = nn.LayerNorm()
        self.head_colour = nn.Dense(NUM_COLOURS)
        self.head_shape = nn.Dense(NUM_SHAPES)

    def _prefix(self, words, word_mask, vector):
        """(embeddings [B, P, width] with their positions, mask [B, P]) of what the cells read
        before them (`prefix_mask`)."""
        h = self.embed_words(words)
        if self.config.vector_dim:
            if vector is None:
                raise ValueError("this layout model reads an image vector: pass `vector`")
            v = self.embed_vector(clip_lib.l2_normalize(vector.astype(jnp.float32)))
            h = jnp.concatenate([v[:, None].astype(h.dtype), h], 1)
        return h + self.positions[:h.shape[1]], prefix_mask(self.config, word_mask)

    def _block(self, i, h, mask, extend=lambda k, v: (k, v)):
        """Block i on h. Its attention reads the keys and values `extend` makes of h's own (by
        default those alone; the sampler's adds the words' and the cells' kept so far).
        Returns (h, the (keys, values) attended to)."""
        q, k, v = getattr(self, f"block{i}_attn").qkv(getattr(self, f"block{i}_ln_1")(h))
        k, v = extend(k, v)
        h = h + getattr(self, f"block{i}_attn")(q, k, v, mask)
        a = getattr(self, f"block{i}_ln_2")(h)
        return h + getattr(self, f"block{i}_proj")(nn.gelu(getattr(self, f"block{i}_fc")(a))), (k, v)

    def _cells(self, previous):
        """The embedding of each cell's predecessor class (-1: the start token)."""
        start = previous < 0
        k = jnp.maximum(previous, 0)
        colour = jnp.where(start, NUM_COLOURS, jnp.asarray(CLASS_COLOUR)[k])
        shape = jnp.where(start, NUM_SHAPES, jnp.asarray(CLASS_SHAPE)[k])
        return self.embed_colours(colour) + self.embed_shapes(shape)

    def _logits(self, h):
        h = self.ln_final(h)
        return (self.head_colour(h)[..., CLASS_COLOUR]
                + self.head_shape(h)[..., CLASS_SHAPE])

    def __call__(self, words, word_mask, layout, vector=None):
        n = layout.shape[1]
        previous = jnp.concatenate([jnp.full((layout.shape[0], 1), -1, layout.dtype),
                                    layout[:, :-1]], 1)  # each cell sees those before it
        h, word_mask = self._prefix(words, word_mask, vector)
        length = h.shape[1]
        h = jnp.concatenate([h, self._cells(previous) + self.positions[length:length + n]], 1)
        causal = jnp.tril(jnp.ones((length + n, length + n), bool)).at[:length, :length].set(True)
        keep = jnp.concatenate([word_mask, jnp.ones(layout.shape, bool)], 1)
        mask = causal[None, None] & keep[:, None, None, :]
        for i in range(self.config.layers):
            h, _ = self._block(i, h, mask)
        return self._logits(h[:, length:])

    def encode_words(self, words, word_mask, vector=None):
        """Each block's (keys, values) of the words (after the image vector where the model
        reads one) [B, P, heads, head width]."""
        h, word_mask = self._prefix(words, word_mask, vector)
        kv = []
        for i in range(self.config.layers):
            h, keys = self._block(i, h, word_mask[:, None, None, :])
            kv.append(keys)
        return kv

    def decode_cell(self, i, previous, word_kv, word_mask, cache):
        """Cell i's logits [B, classes] from its predecessor's class [B] (-1 for cell 0), the
        words' (keys, values) and `cache`, each block's (keys, values) [B, N, heads, head
        width] of the cells so far (cell i's are written at row i); returns (logits, cache).
        `word_mask` is `prefix_mask`'s, the image vector's included."""
        length, n = word_mask.shape[1], cache[0][0].shape[1]
        h = self._cells(previous)[:, None] + jax.lax.dynamic_slice_in_dim(
            self.positions, length + i, 1)[None]
        mask = jnp.concatenate([word_mask, jnp.broadcast_to(jnp.arange(n) <= i,
                                                            (word_mask.shape[0], n))], 1)
        new_cache = []
        for b in range(self.config.layers):
            def extend(k, v, b=b):  # the words', then the cells' with cell i's written in
                kept = [jax.lax.dynamic_update_slice_in_dim(c, x, i, 1)
                        for c, x in zip(cache[b], (k, v))]
                return tuple(jnp.concatenate([w, c], 1) for w, c in zip(word_kv[b], kept))
            h, (keys, values) = self._block(b, h, mask[:, None, None, :], extend)
            new_cache.append((keys[:, length:], values[:, length:]))
        return self._logits(h[:, 0]), new_cache


def loss(model, params, words, word_mask, layout, vector=None):
    """Mean cross-entropy of each cell's class given the cells before it (teacher forcing)."""
    logits = model.apply({"params": params}, words, word_mask, layout, vector)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, layout[..., None], -1))


def sample(model, params, words, word_mask, keys, temperature: float = 1.0, vector=None,
           guidance: float = 1.0):
    """int32 [B, res * res] layouts, one cell at a time; row b's cells drawn from keys[b] alone
    (folded with the cell's index), so a layout does not depend on its batch. `temperature`
    (a Python number) divides the logits; 0 takes each cell's likeliest class. `vector`: the
    image vectors [B, D] a model with `vector_dim` reads.

    `guidance` (a Python number; 1: none) is classifier-free guidance on the caption, for a
    model trained with it sometimes dropped (`text_drop_prob`): each cell's logits are the
    captionless ones plus `guidance` times the caption's difference to them (Ho and Salimans
    2022; for autoregressive token models as in Make-A-Scene, Gafni et al. 2022), so that the
    caption's relation outweighs where the image vector alone would put the objects."""
    c = model.config
    n, b = c.res * c.res, words.shape[0]
    guided = guidance != 1.0
    if guided:  # the captionless rows after the caption's, one batch through the model
        words = jnp.concatenate([words, words])
        word_mask = jnp.concatenate([word_mask, jnp.zeros_like(word_mask)])
        vector = None if vector is None else jnp.concatenate([vector, vector])
    apply = functools.partial(model.apply, {"params": params})
    word_kv = apply(words, word_mask, vector, method=LayoutModel.encode_words)
    word_mask = prefix_mask(c, word_mask)
    empty = jnp.zeros((words.shape[0], n, c.num_heads, c.width // c.num_heads), words.dtype)
    cache = [(empty, empty) for _ in range(c.layers)]

    def cell(i, carry):
        layout, cache = carry
        previous = jnp.where(i == 0, -1, layout[:, jnp.maximum(i - 1, 0)])
        if guided:
            previous = jnp.concatenate([previous, previous])
        logits, cache = apply(i, previous, word_kv, word_mask, cache,
                              method=LayoutModel.decode_cell)
        if guided:
            with_caption, without = logits[:b], logits[b:]
            logits = without + guidance * (with_caption - without)
        if temperature == 0:
            draw = jnp.argmax(logits, -1)
        else:
            draw = jax.vmap(lambda k, l: jax.random.categorical(
                jax.random.fold_in(k, i), l / temperature))(keys, logits)
        return layout.at[:, i].set(draw.astype(jnp.int32)), cache

    return jax.lax.fori_loop(0, n, cell, (jnp.zeros((b, n), jnp.int32), cache))[0]


def relation_right(layouts: np.ndarray, captions, res: int = RES) -> np.ndarray:
    """[N] bool, for two-object captions: both named (colour, shape) classes in the map and
    their cells' centres in the caption's relation (the first's centre left of / right of /
    above / below the second's by at least one cell, within one cell on the other axis)."""
    ok = []
    for layout, caption in zip(np.asarray(layouts).reshape(-1, res, res), captions):
        parsed = shapes.parse_caption(caption)
        if parsed is None or len(parsed.objects) != 2:
            ok.append(False)
            continue
        centres = []
        for o in parsed.objects:
            ys, xs = np.nonzero(layout == object_class(o.colour, o.shape))
            centres.append((ys.mean(), xs.mean()) if len(ys) else None)
        if None in centres:
            ok.append(False)
            continue
        (y1, x1), (y2, x2) = centres
        ok.append({"to the left of": x2 - x1 >= 1 and abs(y1 - y2) <= 1,
                   "to the right of": x1 - x2 >= 1 and abs(y1 - y2) <= 1,
                   "above": y2 - y1 >= 1 and abs(x1 - x2) <= 1,
                   "below": y1 - y2 >= 1 and abs(x1 - x2) <= 1}[parsed.relation])
    return np.asarray(ok, bool)
