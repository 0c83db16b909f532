"""Probe (issue 3): can a model trained on the caption's words alone place two objects?

    PYTHONPATH=. python benchmarks/layout_probe.py STEPS WIDTH LAYERS   # session 32: 3000 96 3

The layout of a shapes picture is its 8x8 box-averaged thumbnail, each pixel quantised to the
nearest of 11 palette colours (8 object colours, 3 backgrounds). A decoder-only Transformer reads
the caption's words (both ways) and predicts the 64 pixel tokens in raster order; it is sampled at
temperature 1. Score, on 300 two-object eval captions: for each named colour the sampled pixel
nearest to it, and the two pixels' order along the caption's axis (same row or column within one
pixel); the same samples scored against the relation-reversed captions give the chance level.
Prints the score every 1,000 steps; benchmarks/RESULTS.md (session 32) has the figures. A probe,
not part of the package: words are ids of the captions' own vocabulary, not the tokenizer's.
"""
import sys, time, numpy as np, jax, jax.numpy as jnp, optax, flax.linen as nn
from functools import partial
from dalle_jax.data import shapes
STEPS, D, L = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
B, RES, N, LR, TH = 64, 8, 40000, 1e-3, 1.3
def thumbs(imgs):
    x = imgs.astype(np.float32) / 127.5 - 1
    n = x.shape[0]; f = x.shape[1] // RES
    return x.reshape(n, RES, f, RES, f, 3).mean((2, 4))
PAL = np.array([np.array(v, np.float32) / 127.5 - 1 for v in shapes.COLOURS.values()]
               + [[-1, -1, -1], [1, 1, 1], [0.0039, 0.0039, 0.0039]], np.float32)
def quant(th):
    return np.argmin(np.linalg.norm(th[..., None, :] - PAL, axis=-1), -1).reshape(th.shape[0], -1)
imgs, caps = shapes.examples(range(N), "train", 0, 32)
X = quant(thumbs(imgs))
ev_idx = [i for i in range(3000) if len(shapes.scene(i, "eval", 0).objects) == 2][:300]
ev_imgs, ev_caps = shapes.examples(ev_idx, "eval", 0, 32)
EXq = quant(thumbs(ev_imgs))
words = sorted({w for c in caps + ev_caps for w in c.split()})
vocab = {w: i + 1 for i, w in enumerate(words)}
def tok(cs):
    out = np.zeros((len(cs), 16), np.int32)
    for k, c in enumerate(cs):
        ids = [vocab[w] for w in c.split()][:16]; out[k, :len(ids)] = ids
    return out
T = tok(caps); ET = tok(ev_caps)
TWO = np.array([k for k, c in enumerate(caps) if len(shapes.parse_caption(c).objects) == 2])
RGB = {k: np.array(v, np.float32) / 127.5 - 1 for k, v in shapes.COLOURS.items()}
def score(th, cs):
    ok = []
    for x, c in zip(th, cs):
        p = shapes.parse_caption(c); o1, o2 = p.objects
        pos = []
        for o in (o1, o2):
            d = np.linalg.norm(x - RGB[o.colour], axis=-1)
            k = np.argmin(d)
            pos.append((k // RES, k % RES, d.flat[k]))
        (y1, x1, d1), (y2, x2, d2) = pos
        good = d1 < TH and d2 < TH
        r = p.relation
        if r == "to the left of": good &= x1 < x2 and abs(y1 - y2) <= 1
        elif r == "to the right of": good &= x1 > x2 and abs(y1 - y2) <= 1
        elif r == "above": good &= y1 < y2 and abs(x1 - x2) <= 1
        elif r == "below": good &= y1 > y2 and abs(x1 - x2) <= 1
        ok.append(bool(good))
    return np.mean(ok)
render = lambda q: PAL[q].reshape(q.shape[0], RES, RES, 3)
rev = [shapes.reverse_relation(c)[1] for c in ev_caps]
print("quantised real thumbnails:", score(render(EXq), ev_caps), "reversed:",
      score(render(EXq), rev), flush=True)
class Block(nn.Module):
    d: int
    @nn.compact
    def __call__(self, h, mask):
        a = nn.LayerNorm()(h)
        h = h + nn.MultiHeadDotProductAttention(4, qkv_features=self.d)(a, a, mask=mask)
        a = nn.LayerNorm()(h)
        return h + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(a)))
class AR(nn.Module):
    d: int; layers: int
    @nn.compact
    def __call__(self, tokens, pix):  # pix: [B, 64] inputs (shifted: start token 11)
        b = tokens.shape[0]
        te = nn.Embed(len(vocab) + 1, self.d)(tokens)
        pe = nn.Embed(len(PAL) + 1, self.d)(pix)
        pos = self.param("pos", nn.initializers.normal(0.02), (16 + RES * RES, self.d))
        h = jnp.concatenate([te, pe], 1) + pos
        n = 16 + RES * RES
        causal = jnp.tril(jnp.ones((n, n), bool)).at[:16, :16].set(True)  # words read both ways
        keep = jnp.concatenate([tokens > 0, jnp.ones((b, RES * RES), bool)], 1)
        mask = causal[None, None] & keep[:, None, None, :]
        for _ in range(self.layers):
            h = Block(self.d)(h, mask)
        return nn.Dense(len(PAL))(nn.LayerNorm()(h[:, 16:]))
net = AR(D, L)
START = len(PAL)
shift = lambda q: np.concatenate([np.full((q.shape[0], 1), START), q[:, :-1]], 1)
params = net.init(jax.random.key(0), T[:2], shift(X[:2]))
opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, LR, min(200, STEPS // 2), STEPS),
                  weight_decay=0.01)
st = opt.init(params)
@jax.jit
def step(params, st, tk, q):
    def loss(p):
        logits = net.apply(p, tk, jnp.concatenate([jnp.full((q.shape[0], 1), START), q[:, :-1]], 1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, q).mean()
    l, g = jax.value_and_grad(loss)(params)
    u, st = opt.update(g, st, params)
    return optax.apply_updates(params, u), st, l
@jax.jit
def sample(params, tk, key):
    b = tk.shape[0]
    def body(i, carry):
        q, key = carry
        key, k = jax.random.split(key)
        inputs = jnp.concatenate([jnp.full((b, 1), START), q[:, :-1]], 1)
        logits = net.apply(params, tk, inputs)[:, i]
        return q.at[:, i].set(jax.random.categorical(k, logits)), key
    q, _ = jax.lax.fori_loop(0, RES * RES, body, (jnp.zeros((b, RES * RES), jnp.int32), key))
    return q
rng = np.random.default_rng(0); t0 = time.time(); l = 0.0
for k in range(STEPS + 1):
    if k == 20: t20 = time.time()
    if k == 60: print("s/step", (time.time() - t20) / 40, flush=True)
    if k % 1000 == 0 or k == STEPS:
        s = np.asarray(sample(params, ET, jax.random.key(1)))
        print(f"step {k} {time.time() - t0:.0f}s loss {float(l):.4f} layout right "
              f"{score(render(s), ev_caps):.3f} vs reversed {score(render(s), rev):.3f}",
              flush=True)
    if k == STEPS: break
    i = np.where(rng.random(B) < 0.6, rng.choice(TWO, B), rng.integers(0, N, B))
    params, st, l = step(params, st, T[i], X[i])
