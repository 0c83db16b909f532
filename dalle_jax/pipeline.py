"""Text to image in a few lines, and what DALL-E 2 does with the shared CLIP space.

    from dalle_jax.pipeline import Pipeline
    pipe = Pipeline.load()                       # the model shipped in the package
    images = pipe.generate(["a large red circle in the top left"], num_per_prompt=4)

Every method returns uint8 [N, H, W, 3] numpy arrays. Work is done in fixed-size batches
(`batch_size`), so each function compiles once per batch size whatever N is. Each picture's
random key is folded from (seed, prompt index, sample index) and the model draws its noise
from that key alone, so a picture does not depend on the batch it was drawn in.

The GAN generator (unCLIP's factorisation, Ramesh et al. 2022): the CLIP text tower encodes the
prompt, the prior samples a CLIP image vector for it, and the GAN decoder draws the picture
for that vector. Variations, interpolations and edits work on image vectors directly.
"""

from __future__ import annotations

import functools
import importlib.resources
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import bundle
from dalle_jax.data import pipeline as data_pipeline
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import flow_prior
from dalle_jax.models import gan as gan_lib
from dalle_jax.tokenizer import Tokenizer

SHIPPED = {"gan": "shapes_gan.npz"}
TRUNCATION_SAMPLES = 64  # z draws that estimate a condition's mean style vector


class PromptError(ValueError):
    """A prompt the model cannot use. Its message is one line, for the user."""


def shipped_path(generator: str = "gan") -> str:
    if generator not in SHIPPED:
        raise bundle.BundleError(f"no shipped model for generator {generator!r}; "
                                 f"shipped: {', '.join(SHIPPED)}")
    return str(importlib.resources.files("dalle_jax") / "assets" / SHIPPED[generator])


def slerp(a, b, t):
    """Spherical interpolation between unit vectors a and b (rows), t in [0, 1]."""
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    cos = jnp.clip(jnp.sum(a * b, -1, keepdims=True), -1.0, 1.0)
    theta = jnp.arccos(cos)
    sin = jnp.sin(theta)
    t = jnp.asarray(t)[..., None] if jnp.ndim(t) else t
    safe = sin > 1e-5
    wa = jnp.where(safe, jnp.sin((1 - t) * theta) / jnp.where(safe, sin, 1.0), 1 - t)
    wb = jnp.where(safe, jnp.sin(t * theta) / jnp.where(safe, sin, 1.0), t)
    out = wa * a + wb * b
    return out / jnp.linalg.norm(out, axis=-1, keepdims=True)


def picture_keys(seed: int, rows: list[tuple[int, int]]) -> np.ndarray:
    """One key per (prompt index, sample index): fold_in(fold_in(key(seed), i), j)."""
    base = jax.random.PRNGKey(seed)
    fold = jax.jit(jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j)))
    if not rows:
        return np.zeros((0, 2), np.uint32)
    i, j = np.asarray(rows, np.int32).T
    return np.asarray(fold(i, j))


class Pipeline:
    """A trained text-to-image pipeline (CLIP + prior + GAN decoder)."""

    def __init__(self, meta: dict, params: dict, path: str = "", batch_size: int = 16):
        configs = meta["configs"]
        self.meta, self.params, self.path = meta, params, path
        self.generator_name = configs.get("generator", "gan")
        self.batch_size = batch_size
        c = configs["clip"]
        self.image_size = c["data"]["image_size"]
        self.context_length = c["data"]["context_length"]
        self.clip = clip_lib.CLIP(variant=c["model"]["variant"], image_size=self.image_size,
                                  context_length=self.context_length)
        p = configs["prior"]["model"]
        cc = self.clip.config
        self.prior = flow_prior.FlowPrior(flow_prior.PriorConfig(
            embed_dim=cc.embed_dim, token_dim=cc.text_width, width=p["width"], depth=p["depth"],
            sample_steps=p["sample_steps"]))
        g = configs["decoder"]["model"]
        self.gan_config = gan_lib.GANConfig(
            resolution=self.image_size, cond_dim=cc.embed_dim, z_dim=g["z_dim"],
            w_dim=g["w_dim"], mapping_layers=g["mapping_layers"],
            mapping_lr_mul=g.get("mapping_lr_mul", 0.01),
            input_from_w=g.get("input_from_w", False),
            channels=tuple(g["channels"]),
            d_channels=tuple(g["d_channels"]), noise=g["noise"],
            cross_attention_res=tuple(g["cross_attention_res"]), token_dim=cc.text_width)
        self.condition = g.get("condition", "image")
        self.generator = gan_lib.Generator(self.gan_config)
        self.tokenizer = Tokenizer()
        self.known_tokens = bundle.known_tokens(meta, "clip/text/token_embedding/embedding")
        self.params = jax.device_put(params)

    @classmethod
    def load(cls, path: str | None = None, generator: str = "gan", **kwargs) -> "Pipeline":
        """The model file at `path` (a `model.npz` written by training), or the shipped one."""
        path = path or shipped_path(generator)
        meta, params = bundle.load(path)
        if meta["configs"].get("generator", "gan") != generator:
            raise bundle.BundleError(f"{path} holds a {meta['configs'].get('generator')} "
                                     f"model, not {generator}")
        return cls(meta, params, path, **kwargs)

    # ---- text and images in -------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids [N, L]; one clear error for an unusable prompt, warnings for the doubtful."""
        if isinstance(prompts, str):
            raise PromptError("prompts must be a list of strings, not one string")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise PromptError(f"prompt {i} is a {type(prompt).__name__}, not a string")
            if not prompt.strip() or not self.tokenizer.encode(prompt):
                raise PromptError(f"prompt {i} is empty: the GAN pipeline has no unconditional "
                                  "mode, so say what to draw")
        tokens = self.tokenizer(prompts, context_length=self.context_length)
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt)
            if len(ids) > self.context_length - 2:
                warnings.warn(f"prompt cut to the model's {self.context_length - 2} tokens: "
                              f"{prompt[:60]!r}...", stacklevel=3)
            if self.known_tokens is not None:
                unknown = sorted({self.tokenizer.decode([t]).strip() for t in ids
                                  if t not in self.known_tokens})
                if unknown:
                    warnings.warn(f"words this model never saw in training: {', '.join(unknown)}",
                                  stacklevel=3)
        return tokens

    def _as_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, {s}, {s}, 3] (use "
                             f"dalle_jax.images.load_image(path, {s})); got "
                             f"{images.dtype} {list(images.shape)}")
        return images

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """Unit-norm CLIP text vectors [N, E]."""
        return self._chunked(self._text_fn, self.tokenize(prompts))[0]

    def encode_images(self, images) -> np.ndarray:
        """Unit-norm CLIP image vectors [N, E] of uint8 pictures."""
        return self._chunked(self._image_fn,
                             data_pipeline.to_float_images(self._as_images(images)))[0]

    # ---- pictures out -------------------------------------------------------------------

    def generate(self, prompts: list[str], num_per_prompt: int = 1, seed: int = 0,
                 truncation: float = 1.0, use_prior: bool = True) -> np.ndarray:
        """num_per_prompt pictures per prompt, prompt-major: [len(prompts) * num, H, W, 3].

        `use_prior=False` decodes the text vector itself as if it were an image vector (no
        prior), the baseline the prior is measured against."""
        tokens = self.tokenize(prompts)
        rows = [(i, j) for i in range(len(prompts)) for j in range(num_per_prompt)]
        keys = picture_keys(seed, rows)
        idx = np.asarray([i for i, _ in rows], np.int64)
        fn = self._generate_fn if use_prior else self._generate_without_prior_fn
        return self._chunked(fn, tokens[idx], keys,
                             np.full((len(rows),), truncation, np.float32))[0]

    def variations(self, images, num: int = 4, seed: int = 0,
                   truncation: float = 1.0) -> np.ndarray:
        """Each picture re-drawn `num` times from its own CLIP image vector: [N * num, ...]."""
        embed = self.encode_images(images)
        rows = [(i, j) for i in range(len(embed)) for j in range(num)]
        return self.decode(embed[[i for i, _ in rows]], picture_keys(seed, rows), truncation)

    def interpolate(self, image_a, image_b, steps: int = 8, seed: int = 0,
                    truncation: float = 1.0) -> np.ndarray:
        """`steps` pictures along the slerp from a's image vector to b's (same noise)."""
        a, b = self.encode_images(np.stack([self._as_images(image_a)[0],
                                            self._as_images(image_b)[0]]))
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
        embed = np.asarray(slerp(np.repeat(a[None], steps, 0), np.repeat(b[None], steps, 0), t))
        keys = picture_keys(seed, [(0, 0)] * steps)
        return self.decode(embed, keys, truncation)

    def edit(self, image, from_text: str, to_text: str, amount: float = 0.5, seed: int = 0,
             truncation: float = 1.0) -> np.ndarray:
        """unCLIP's text diff: slerp the image vector toward normalise(v(to) - v(from)) by
        `amount` (0 keeps the picture, 1 is the direction itself); [1, H, W, 3]."""
        embed = self.encode_images(image)[:1]
        v_from, v_to = self.encode_text([from_text, to_text])
        diff = v_to - v_from
        if np.linalg.norm(diff) < 1e-6:
            raise PromptError("the edit's two texts mean the same to the model; nothing to do")
        target = np.asarray(slerp(embed, (diff / np.linalg.norm(diff))[None], amount))
        return self.decode(target, picture_keys(seed, [(0, 0)]), truncation)

    def decode(self, image_embed: np.ndarray, keys: np.ndarray, truncation: float = 1.0):
        """The GAN decoder on image vectors [N, E], one key per picture."""
        image_embed = np.asarray(image_embed, np.float32)
        return self._chunked(self._decode_fn, image_embed, keys,
                             np.full((len(image_embed),), truncation, np.float32))[0]

    # ---- compiled pieces ----------------------------------------------------------------

    def _chunked(self, fn, *arrays):
        """Runs `fn(params, *chunk)` over fixed-size chunks (the last padded); concatenates."""
        n, b = len(arrays[0]), self.batch_size
        outs = []
        for start in range(0, n, b):
            part = [a[start:start + b] for a in arrays]
            m = len(part[0])
            if m < b:
                part = [np.concatenate([a, np.repeat(a[-1:], b - m, 0)]) for a in part]
            out = fn(self.params, *part)
            outs.append([np.asarray(o)[:m] for o in (out if isinstance(out, tuple) else (out,))])
        if not outs:
            return [np.zeros((0, self.image_size, self.image_size, 3), np.uint8)]
        return [np.concatenate(parts) for parts in zip(*outs)]

    @functools.cached_property
    def _text_fn(self):
        return jax.jit(lambda p, t: self._encode_text(p, t)[:1])

    @functools.cached_property
    def _image_fn(self):
        return jax.jit(lambda p, x: self.clip.apply({"params": p["clip"]}, x,
                                                    method=self.clip.encode_image)[0])

    @functools.cached_property
    def _generate_fn(self):
        return self._make_generate(use_prior=True)

    @functools.cached_property
    def _generate_without_prior_fn(self):
        return self._make_generate(use_prior=False)

    def _make_generate(self, use_prior: bool):
        def fn(p, tokens, keys, truncation):
            text_embed, features, mask = self._encode_text(p, tokens)
            prior_keys, decoder_keys = jax.vmap(lambda k: jax.random.split(k))(keys).swapaxes(0, 1)
            if self.condition == "text" or not use_prior:
                cond = text_embed
            else:
                cond = flow_prior.sample(self.prior, p["prior"], text_embed, features, mask,
                                         prior_keys)
            return self._render(p, cond, decoder_keys, truncation)
        return jax.jit(fn)

    @functools.cached_property
    def _decode_fn(self):
        def fn(p, embed, keys, truncation):
            decoder_keys = jax.vmap(lambda k: jax.random.split(k))(keys)[:, 1]
            return self._render(p, embed, decoder_keys, truncation)
        return jax.jit(fn)

    def _encode_text(self, p, tokens):
        embed, features = self.clip.apply({"params": p["clip"]}, tokens,
                                          method=self.clip.encode_text)
        return embed, features, tokens != 0

    def _render(self, p, cond, keys, truncation):
        """uint8 pictures for conditions [B, E]; per-picture z and noise from `keys`.

        Truncation pulls w toward the condition's own mean style (the conditional truncation
        of StyleGAN-T), estimated from a fixed set of z draws."""
        g = self.generator
        gp = {"params": p["generator"]}
        mapping = lambda z, c: g.apply(gp, z, c, method=lambda m, z, c: m.mapping(z, c))
        z_fixed = jax.random.normal(jax.random.PRNGKey(0), (TRUNCATION_SAMPLES, g.config.z_dim))

        def one(key, c, psi):
            kz, kn = jax.random.split(key)
            w = mapping(jax.random.normal(kz, (1, g.config.z_dim)), c[None])
            w_mean = mapping(z_fixed, jnp.repeat(c[None], TRUNCATION_SAMPLES, 0)).mean(0)
            w = w_mean + psi * (w - w_mean)
            return g.apply(gp, w, kn, method=lambda m, w, k: m.synthesis(w, k))[0]

        images = jax.vmap(one)(keys, cond, truncation)
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
