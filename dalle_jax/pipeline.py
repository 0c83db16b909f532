"""Text to image in a few lines, and what DALL-E 2 does with the shared CLIP space.

    from dalle_jax.pipeline import Pipeline
    pipe = Pipeline.load()                       # the model shipped in the package
    images = pipe.generate(["a large red circle in the top left"], num_per_prompt=4)

Every method returns uint8 [N, H, W, 3] numpy arrays. Work is done in fixed-size batches
(`batch_size`), so each function compiles once per batch size whatever N is. Each picture's
random key is folded from (seed, prompt index, sample index) and the model draws its noise
from that key alone, so a picture does not depend on the batch it was drawn in.

Two generators stand behind the same interface, both in unCLIP's factorisation (Ramesh et al.
2022): the CLIP text tower encodes the prompt, a prior samples a CLIP image vector for it, and a
decoder draws the picture for that vector. `Pipeline.load(generator="gan")` (the primary path:
a prior, then a StyleGAN2-style decoder, one forward pass per picture) or `generator="unclip"`
(diffusion prior and diffusion U-Net decoder with classifier-free guidance, DDIM steps). The
GAN's prior slot holds either prior a model file was trained with: the flow-matching one or
unCLIP's diffusion prior. Variations, interpolations and edits work on image vectors directly.
Each generator takes its own sampling options as keywords (`OPTIONS`): `truncation` for the GAN,
with `prior_temperature` for a flow prior or `prior_steps`, `prior_guidance_scale` for a
diffusion prior; `steps`, `guidance_scale`, `eta`, `prior_steps`, `prior_guidance_scale` for
unCLIP.
"""

from __future__ import annotations

import functools
import importlib.resources
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import bundle
from dalle_jax import images as images_lib
from dalle_jax.data import pipeline as data_pipeline
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import flow_prior
from dalle_jax.models import gan as gan_lib
from dalle_jax.models import layout as layout_lib
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import clip as clip_family
from dalle_jax.train import layout as layout_family

# Each generator's sampling options and their defaults (`variations` overrides some: a
# variation is drawn with fresh noise, so DDIM runs with eta 1 there, as unCLIP's paper does).
# The decoder samples with eta 1 (ancestral) by default too: on the shipped shapes model's
# first 48 eval captions at 50 steps, eta 1 drew the asked colour 73% of the time against 47%
# at eta 0, the position 33% against 4% (eta 0 leaves more of the start's noise in the picture).
# The GAN's flow prior starts from noise at half scale: on 1,047 one-object eval captions of the
# shipped model, whole prompts right 32.6% of the time against 29.2% at temperature 1 (35.1% at
# 0.3), while 8 seeds of a prompt still spread over 4.4 of the 9 places and 2.8 of the 3
# backgrounds it leaves open (4.7 and 2.8 at 1; 3.7 and 2.5 at 0.3; benchmarks/RESULTS.md).
# The GAN's options are those of both its priors; a model takes the ones of the prior it holds
# (`GANGenerator.option_names`). Its diffusion prior runs 10 DDIM steps and draws one candidate
# (`GAN_PRIOR_CANDIDATES`), where unCLIP's runs 25 and keeps the better of two: on session 26's
# GAN model's 1,000 eval captions one-object prompts came out right 76.9 / 79.4% of the time (seen
# / held-out pairs) so, 75.6 / 78.1% at 25 steps and two candidates (71.0 / 71.2% at 5 steps
# and two), and the pipeline drew about 5x the pictures per second (benchmarks/RESULTS.md,
# session 26). A model with a layout stage also takes `layout_temperature` (0: each cell's
# likeliest class), and one whose layout model was trained with its caption sometimes dropped
# `layout_guidance` (classifier-free guidance on the caption; 1: none).
OPTIONS = {
    "gan": {"truncation": 1.0, "prior_temperature": 0.5, "prior_steps": 10,
            "prior_guidance_scale": 1.0, "layout_temperature": 1.0, "layout_guidance": 1.0},
    "unclip": {"steps": 50, "guidance_scale": 3.0, "eta": 1.0, "prior_steps": 25,
               "prior_guidance_scale": 1.0},
}
VARIATION_OPTIONS = {"gan": {}, "unclip": {"eta": 1.0}}

SHIPPED = {"gan": "shapes_gan.npz", "unclip": "shapes_unclip.npz"}
GAN_PRIOR_CANDIDATES = 1
TRUNCATION_SAMPLES = 64  # z draws that estimate a condition's mean style vector


class PromptError(ValueError):
    """A prompt the model cannot use. Its message is one line, for the user."""


def shipped_path(generator: str = "gan") -> str:
    if generator not in SHIPPED:
        raise bundle.BundleError(f"no shipped model for generator {generator!r}; "
                                 f"shipped: {', '.join(SHIPPED)}")
    return str(importlib.resources.files("dalle_jax") / "assets" / SHIPPED[generator])


def model_file(source: str) -> str:
    """A model file named as a config names one: `shipped:gan` (or `shipped:unclip`) is the
    package's own; anything else is a path."""
    return shipped_path(source.split(":", 1)[1]) if source.startswith("shipped:") else source


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


# Jitted once at import: a jit made inside the functions below would be a new function on each
# call, traced and compiled again every time (0.4 s a call, most of a 64-picture `generate`).
_fold_rows = jax.jit(jax.vmap(
    lambda base, i, j: jax.random.fold_in(jax.random.fold_in(base, i), j), (None, 0, 0)))
_fold_candidates = jax.jit(jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None)))


def picture_keys(seed: int, rows: list[tuple[int, int]]) -> np.ndarray:
    """One key per (prompt index, sample index): fold_in(fold_in(key(seed), i), j)."""
    if not rows:
        return np.zeros((0, 2), np.uint32)
    i, j = np.asarray(rows, np.int32).T
    return np.asarray(_fold_rows(jax.random.PRNGKey(seed), i, j))


def candidate_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """[N * k] keys, row-major: each key itself, then fold_in(key, 1), ..., fold_in(key, k-1)."""
    if k == 1 or not len(keys):
        return np.repeat(keys, k, axis=0)
    out = np.array(_fold_candidates(keys, np.arange(k, dtype=np.int32)))
    out[:, 0] = keys
    return out.reshape(-1, keys.shape[-1])


def _check_diffusion_prior(options: dict):
    """A diffusion prior's options, where given (unCLIP's, or a GAN's that holds one)."""
    steps = options.get("prior_steps", 1)
    if not (isinstance(steps, int) and 1 <= steps <= 1000):
        raise ValueError(f"prior_steps must be an integer from 1 to 1000, not {steps!r}")
    scale = options.get("prior_guidance_scale", 1.0)
    if not 0.0 <= scale <= 20.0:
        raise ValueError(f"prior_guidance_scale must be between 0 and 20, not {scale}")


class GANGenerator:
    """The GAN path: a prior (diffusion or flow matching), StyleGAN2-style generator (one forward
    pass)."""

    name = "gan"

    def __init__(self, configs: dict, clip_config: clip_lib.CLIPConfig, image_size: int):
        # The prior slot: the flow-matching prior (family "prior") or unCLIP's diffusion prior.
        self.diffusion_prior = configs["prior"].get("family") == "diffusion_prior"
        if self.diffusion_prior:
            from dalle_jax.train import unclip
            self._unclip = unclip
            self.prior = unclip.build_prior(configs["prior"], clip_config)
            self.option_names = ("truncation", "prior_steps", "prior_guidance_scale")
        else:
            p = configs["prior"]["model"]
            self.prior = flow_prior.FlowPrior(flow_prior.PriorConfig(
                embed_dim=clip_config.embed_dim, token_dim=clip_config.text_width,
                width=p["width"], depth=p["depth"], sample_steps=p["sample_steps"]))
            self.option_names = ("truncation", "prior_temperature")
        # The refine stage's model where there is one: it may add layers that read the caption.
        g = configs.get("refine", configs["decoder"])["model"]
        self.gan_config = gan_lib.config_from(g, image_size, clip_config.embed_dim,
                                              clip_config.text_width)
        self.condition = g.get("condition", "image")
        self.generator = gan_lib.Generator(self.gan_config)
        # The layout stage (`models/layout.py`): where the decoder reads a layout, the prompt's
        # is sampled by the file's layout model.
        self.layout_model = None
        self.layout_from_vector_alone = False
        if self.gan_config.layout_classes:
            if "layout" not in configs:
                raise bundle.BundleError("the model's decoder reads a layout, but the file "
                                         "holds no layout model")
            self.layout_model = layout_family.build_model(configs["layout"], clip_config)
            self.layout_from_vector_alone = bool(
                self.layout_model.config.vector_dim
                and configs["layout"]["model"].get("text_drop_prob"))
            self.option_names += ("layout_temperature",)
            if self.layout_from_vector_alone:
                self.option_names += ("layout_guidance",)

    @staticmethod
    def check(options: dict):
        for key in ("truncation", "prior_temperature", "layout_temperature"):
            if key in options and not 0.0 <= options[key] <= 2.0:
                raise ValueError(f"{key} must be between 0 and 2, not {options[key]}")
        if "layout_guidance" in options and not 0.0 <= options["layout_guidance"] <= 20.0:
            raise ValueError(f"layout_guidance must be between 0 and 20, not "
                             f"{options['layout_guidance']}")
        _check_diffusion_prior(options)

    def sample_prior(self, p, text_embed, features, mask, keys, options):
        if self.condition == "text":  # the StyleGAN-T way: the decoder reads the text vector
            return text_embed
        if self.diffusion_prior:
            return self._unclip.sample_prior(
                self.prior, p["prior"], text_embed, features, mask, keys, options["prior_steps"],
                options["prior_guidance_scale"], num_candidates=GAN_PRIOR_CANDIDATES)
        return flow_prior.sample(self.prior, p["prior"], text_embed, features, mask, keys,
                                 temperature=options["prior_temperature"])

    def sample_layout(self, p, tokens, keys, options, embed=None):
        """The layouts [B, cells] the decoder reads where it reads one (temperature 0: each
        cell's likeliest class), else None; `tokens` [B, L] (all padding: a decode from image
        vectors alone), `embed` [B, E] the image vectors the decoder draws from.

        A layout model that reads the image vector (`layout.model.vector`) draws every
        picture's layout given that vector, so that the two agree; one trained with its
        caption sometimes dropped (`text_drop_prob`) also draws one for a decode from a vector
        alone (variations, interpolation, edits: `layout_from_vector_alone`), the others leave
        those without one.

        A layout model that reads the caption alone draws one only for a prompt that names two
        objects or more (the others get a row of -1, no layout, as in training): a lone
        object's colour and shape are in the image vector, and a layout sampled apart from
        that vector disagrees with it where the caption leaves the place, size or background
        open (one-object prompts fell from 90.6 / 82.8% to 77.2 / 63.8% through one:
        benchmarks/RESULTS.md, session 33)."""
        if self.layout_model is None:
            return None
        if self.layout_model.config.vector_dim:
            words, mask = layout_family.words_of(p["clip"], tokens)
            return layout_lib.sample(self.layout_model, p["layout"], words, mask, keys,
                                     options["layout_temperature"], vector=embed,
                                     guidance=options.get("layout_guidance", 1.0))
        several = layout_lib.named_objects(tokens)[0].sum(-1) >= 2

        def draw(_):
            words, mask = layout_family.words_of(p["clip"], tokens)
            layout = layout_lib.sample(self.layout_model, p["layout"], words, mask, keys,
                                       options["layout_temperature"])
            return jnp.where(several[:, None], layout, -1)
        none = jnp.full((tokens.shape[0], self.gan_config.layout_res ** 2), -1, jnp.int32)
        # A batch without such a prompt skips the sampler (64 steps, one per cell).
        return jax.lax.cond(several.any(), draw, lambda _: none, None)

    def caption_features(self, p, tokens, features):
        """What the decoder's caption layers read: the CLIP's final token `features`, or its
        token embeddings where the generator has a text reader (as in training)."""
        if self.gan_config.has_text_reader:
            return clip_lib.token_embeddings(p["clip"], tokens)
        return features

    def decode(self, p, embed, features, mask, keys, options, layout=None):
        """Pictures in [-1, 1] for image vectors [B, E]; per-picture z and noise from `keys`;
        a decoder that reads layouts reads `layout` [B, cells] (None: none, as for a decode
        from an image vector alone).

        Truncation pulls w toward the condition's own mean style (the conditional truncation
        of StyleGAN-T), estimated from a fixed set of z draws. A decoder with cross-attention
        reads the caption's token features [B, L, T] where `mask` [B, L] holds any token (a
        prompt), as does the mapping network with `caption_to_w`; an all-false row (a decode
        from an image vector alone) leaves them out."""
        g = self.generator
        gp = {"params": p["generator"]}
        mapping = lambda z, c, t: g.apply(gp, z, c, t, method=lambda m, *a: m.mapping(*a))
        z_fixed = jax.random.normal(jax.random.PRNGKey(0), (TRUNCATION_SAMPLES, g.config.z_dim))
        psi = options["truncation"]

        if layout is None:
            layout = jnp.full((embed.shape[0], g.config.layout_res ** 2), -1, jnp.int32)

        def one(key, c, f, m, lay):
            kz, kn = jax.random.split(key)
            f, t = g.apply(gp, f[None], m[None], method=lambda mod, f, m: mod.read(f, m))
            w = mapping(jax.random.normal(kz, (1, g.config.z_dim)), c[None], t)
            if psi != 1.0:
                repeat = lambda x: None if x is None else jnp.repeat(x, TRUNCATION_SAMPLES, 0)
                w_mean = mapping(z_fixed, repeat(c[None]), repeat(t)).mean(0)
                w = w_mean + psi * (w - w_mean)
            return g.apply(gp, w, kn, f, m[None], lay[None],
                           method=lambda mod, w, k, f, m, lay: mod.synthesis(w, k, f, m, lay))[0]

        return jax.vmap(one)(keys, embed, features, mask, layout)


class UnCLIPGenerator:
    """The DALL-E 2 path: diffusion prior, diffusion U-Net decoder, classifier-free guidance."""

    name = "unclip"

    def __init__(self, configs: dict, clip_config: clip_lib.CLIPConfig, image_size: int):
        from dalle_jax.train import unclip
        self.prior = unclip.build_prior(configs["prior"], clip_config)
        self.decoder = unclip.build_decoder(configs["decoder"], clip_config)
        self._unclip = unclip

    option_names = tuple(OPTIONS["unclip"])

    @staticmethod
    def check(options: dict):
        _check_diffusion_prior(options)
        if not (isinstance(options["steps"], int) and 1 <= options["steps"] <= 1000):
            raise ValueError(f"steps must be an integer from 1 to 1000, not {options['steps']!r}")
        if not 0.0 <= options["guidance_scale"] <= 20.0:
            raise ValueError(f"guidance_scale must be between 0 and 20, not "
                             f"{options['guidance_scale']}")
        if not 0.0 <= options["eta"] <= 1.0:
            raise ValueError(f"eta must be between 0 and 1, not {options['eta']}")

    def sample_prior(self, p, text_embed, features, mask, keys, options):
        return self._unclip.sample_prior(self.prior, p["prior"], text_embed, features, mask,
                                         keys, options["prior_steps"],
                                         options["prior_guidance_scale"])

    def caption_features(self, p, tokens, features):
        return features

    layout_from_vector_alone = False

    def sample_layout(self, p, tokens, keys, options, embed=None):
        return None

    def decode(self, p, embed, features, mask, keys, options, layout=None):
        return self._unclip.sample_decoder(self.decoder, p["decoder"], embed, features, mask,
                                           keys, options["steps"], options["guidance_scale"],
                                           options["eta"])


GENERATORS = {"gan": GANGenerator, "unclip": UnCLIPGenerator}


class Pipeline:
    """A trained text-to-image pipeline: CLIP + prior + decoder (GAN or unCLIP)."""

    def __init__(self, meta: dict, params: dict, path: str = "", batch_size: int = 16):
        configs = meta["configs"]
        self.meta, self.params, self.path = meta, params, path
        self.generator_name = configs.get("generator", "gan")
        if self.generator_name not in GENERATORS:
            raise bundle.BundleError(f"{path or 'model'} holds an unknown generator "
                                     f"{self.generator_name!r}; known: {', '.join(GENERATORS)}")
        self.batch_size = batch_size
        c = configs["clip"]
        # The CLIP reads clip_size px; the decoder draws image_size px, the same or a whole
        # multiple (pictures in are at image_size and box-downsampled for the CLIP).
        self.clip_size = c["data"]["image_size"]
        self.image_size = configs.get("decoder", {}).get("data", {}).get("image_size",
                                                                         self.clip_size)
        self.context_length = c["data"]["context_length"]
        self.clip = clip_lib.CLIP(variant=c["model"]["variant"], image_size=self.clip_size,
                                  context_length=self.context_length)
        self.generator = GENERATORS[self.generator_name](configs, self.clip.config,
                                                         self.image_size)
        self.tokenizer = Tokenizer()
        self.known_tokens = bundle.known_tokens(meta, "clip/text/token_embedding/embedding")
        self.params = jax.device_put(params)
        self._compiled = {}

    @classmethod
    def load(cls, path: str | None = None, generator: str = "gan", **kwargs) -> "Pipeline":
        """The model file at `path` (a `model.npz` written by training), or the shipped one of
        `generator`."""
        path = path or shipped_path(generator)
        meta, params = bundle.load(path)
        held = meta["configs"].get("generator", "gan")
        if held != generator:
            raise bundle.BundleError(f"{path} holds a {held} model, not {generator}")
        return cls(meta, params, path, **kwargs)

    def options(self, overrides: dict | None = None, variation: bool = False) -> dict:
        """This generator's sampling options: defaults, then `overrides` (checked)."""
        name, names = self.generator_name, self.generator.option_names
        options = {k: v for k, v in OPTIONS[name].items() if k in names}
        if variation:
            options.update(VARIATION_OPTIONS[name])
        for key, value in (overrides or {}).items():
            if key == "decoder_steps" and "steps" in options:
                key = "steps"  # the spelling `interpolate` needs: its `steps` counts frames
            if key not in options:
                held = (f" with {'a diffusion' if self.generator.diffusion_prior else 'a flow'}"
                        " prior" if name == "gan" else "")
                raise ValueError(f"{key!r} is not an option of the {name} generator{held}; "
                                 f"its options: {', '.join(names)}")
            options[key] = type(options[key])(value) if isinstance(value, (int, float)) \
                and not isinstance(value, bool) else value
        self.generator.check(options)
        return options

    # ---- text and images in -------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids [N, L]; one clear error for an unusable prompt, warnings for the doubtful."""
        if isinstance(prompts, str):
            raise PromptError("prompts must be a list of strings, not one string")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise PromptError(f"prompt {i} is a {type(prompt).__name__}, not a string")
            if not prompt.strip() or not self.tokenizer.encode(prompt):
                kind = "GAN" if self.generator_name == "gan" else "unCLIP"
                raise PromptError(f"prompt {i} is empty: the {kind} pipeline has no "
                                  "unconditional mode, so say what to draw (or vary a picture)")
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
                 truncation: float | None = None, use_prior: bool = True, progress=None,
                 rerank: int = 1, **options) -> np.ndarray:
        """num_per_prompt pictures per prompt, prompt-major: [len(prompts) * num, H, W, 3].

        `rerank=K > 1` draws K candidates for each picture and keeps the one whose CLIP image
        vector is closest to its prompt's text vector (the model's own CLIP, as DALL-E
        reranked its samples; Ramesh et al. 2021): K times the sampling work. Candidate 0 is
        the picture `rerank=1` draws, candidate k > 0 is keyed by fold_in(picture key, k).
        `use_prior=False` decodes the text vector itself as if it were an image vector (no
        prior), the baseline the prior is measured against. `progress` (a tqdm bar, or any
        object with `update(n)`) is told of each batch drawn. Other keywords are the
        generator's sampling options (`OPTIONS`)."""
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise ValueError(f"rerank must be a whole number of candidates >= 1, not {rerank!r}")
        options = self.options(_with_truncation(options, truncation))
        tokens = self.tokenize(prompts)
        rows = [(i, j) for i in range(len(prompts)) for j in range(num_per_prompt)]
        keys = candidate_keys(picture_keys(seed, rows), rerank)
        idx = np.repeat(np.asarray([i for i, _ in rows], np.int64), rerank)
        fn = self._compile("generate" if use_prior else "generate_without_prior", options)
        pictures = self._chunked(fn, tokens[idx], keys, progress=progress)[0]
        if rerank == 1:
            return pictures
        text = self._chunked(self._text_fn, tokens)[0][idx].reshape(len(rows), rerank, -1)
        image = self.encode_images(pictures).reshape(len(rows), rerank, -1)
        best = np.argmax(np.einsum("nke,nke->nk", image, text), axis=1)
        return pictures.reshape(len(rows), rerank, *pictures.shape[1:])[np.arange(len(rows)),
                                                                         best]

    def variations(self, images, num: int = 4, seed: int = 0, truncation: float | None = None,
                   **options) -> np.ndarray:
        """Each picture re-drawn `num` times from its own CLIP image vector: [N * num, ...]."""
        options = self.options(_with_truncation(options, truncation), variation=True)
        embed = self.encode_images(images)
        rows = [(i, j) for i in range(len(embed)) for j in range(num)]
        return self.decode(embed[[i for i, _ in rows]], picture_keys(seed, rows), **options)

    def interpolate(self, image_a, image_b, steps: int = 8, seed: int = 0,
                    truncation: float | None = None, **options) -> np.ndarray:
        """`steps` pictures along the slerp from a's image vector to b's (same noise). For
        unCLIP, `decoder_steps` sets the number of DDIM steps here."""
        options = self.options(_with_truncation(options, truncation))
        a, b = self.encode_images(np.stack([self._as_images(image_a)[0],
                                            self._as_images(image_b)[0]]))
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
        embed = np.asarray(slerp(np.repeat(a[None], steps, 0), np.repeat(b[None], steps, 0), t))
        keys = picture_keys(seed, [(0, 0)] * steps)
        return self.decode(embed, keys, **options)

    def edit(self, images, from_text, to_text, amount: float = 0.5, seed: int = 0,
             truncation: float | None = None, **options) -> np.ndarray:
        """unCLIP's text diff: slerp each picture's image vector toward normalise(v(to) -
        v(from)) by `amount` (0 keeps the picture, 1 is the direction itself).

        `images` is one picture [H, W, 3] or N of them [N, H, W, 3]; `from_text` and `to_text`
        are one text for all pictures or a list of one per picture. Returns [N, H, W, 3], all
        drawn in batches; picture i's key is folded from (seed, i, 0), so one picture edited
        alone gives the first row of a batch that starts with it."""
        options = self.options(_with_truncation(options, truncation))
        embed = self.encode_images(images)
        n = len(embed)
        texts = {}
        for name, text in (("from_text", from_text), ("to_text", to_text)):
            texts[name] = [text] * n if isinstance(text, str) else list(text)
            if len(texts[name]) != n:
                raise ValueError(f"{name} has {len(texts[name])} texts for {n} pictures; give "
                                 "one text, or one per picture")
        distinct = sorted(set(texts["from_text"] + texts["to_text"]))  # each encoded once
        vector = dict(zip(distinct, self.encode_text(distinct)))
        diff = (np.stack([vector[t] for t in texts["to_text"]])
                - np.stack([vector[t] for t in texts["from_text"]]))
        norm = np.linalg.norm(diff, axis=-1, keepdims=True)
        if np.any(norm < 1e-6):
            which = "" if n == 1 else f" (picture {int(np.argmin(norm[:, 0]))})"
            raise PromptError(f"the edit's two texts mean the same to the model{which}; "
                              "nothing to do")
        target = np.asarray(slerp(embed, diff / norm, amount))
        return self.decode(target, picture_keys(seed, [(i, 0) for i in range(n)]), **options)

    def decode(self, image_embed: np.ndarray, keys: np.ndarray, truncation: float | None = None,
               **options) -> np.ndarray:
        """The decoder on image vectors [N, E] alone (no caption), one key per picture."""
        options = self.options(_with_truncation(options, truncation))
        image_embed = np.asarray(image_embed, np.float32)
        return self._chunked(self._compile("decode", options), image_embed, keys)[0]

    # ---- compiled pieces ----------------------------------------------------------------

    def _chunked(self, fn, *arrays, progress=None):
        """`fn(params, *chunk)` over fixed-size chunks of `batch_size` (train.clip.batched);
        a list of the outputs."""
        if not len(arrays[0]):
            return [np.zeros((0, self.image_size, self.image_size, 3), np.uint8)]
        out = clip_family.batched(functools.partial(fn, self.params), *arrays,
                                  chunk=self.batch_size, progress=progress)
        return list(out) if isinstance(out, tuple) else [out]

    @functools.cached_property
    def _text_fn(self):
        return jax.jit(lambda p, t: self._encode_text(p, t)[:1])

    @functools.cached_property
    def _image_fn(self):
        return jax.jit(lambda p, x: self.clip.apply(
            {"params": p["clip"]}, images_lib.box_downsample(x, self.clip_size),
            method=self.clip.encode_image)[0])

    def _compile(self, kind: str, options: dict):
        """The jitted program for `kind` under these sampling options (compile-time constants),
        built once per (kind, options)."""
        cache_key = (kind, tuple(sorted(options.items())))
        if cache_key in self._compiled:
            return self._compiled[cache_key]
        gen = self.generator
        if kind == "decode":
            def fn(p, embed, keys):
                decoder_keys = jax.vmap(lambda k: jax.random.split(k))(keys)[:, 1]
                b, length = embed.shape[0], self.context_length
                features = jnp.zeros((b, length, self.clip.config.text_width), jnp.float32)
                mask = jnp.zeros((b, length), bool)  # no caption: the decoder sees none
                layout = None
                if gen.layout_from_vector_alone:  # keyed as a prompt's (below); no caption
                    layout = gen.sample_layout(  # to guide by
                        p, jnp.zeros((b, length), jnp.int32),
                        jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys),
                        {**options, "layout_guidance": 1.0}, embed)
                return _to_uint8(gen.decode(p, embed, features, mask, decoder_keys, options,
                                            layout))
        else:
            def fn(p, tokens, keys):
                text_embed, features, mask = self._encode_text(p, tokens)
                prior_keys, decoder_keys = jax.vmap(lambda k: jax.random.split(k))(
                    keys).swapaxes(0, 1)
                if kind == "generate":
                    embed = gen.sample_prior(p, text_embed, features, mask, prior_keys, options)
                else:
                    embed = text_embed
                features = gen.caption_features(p, tokens, features)
                # Keyed apart from the prior and the decoder (fold_in, not a third split, so
                # that their keys stay those of models without a layout stage).
                layout = gen.sample_layout(p, tokens, jax.vmap(
                    lambda k: jax.random.fold_in(k, 3))(keys), options, embed)
                return _to_uint8(gen.decode(p, embed, features, mask, decoder_keys, options,
                                            layout))
        self._compiled[cache_key] = jax.jit(fn)
        return self._compiled[cache_key]

    def _encode_text(self, p, tokens):
        embed, features = self.clip.apply({"params": p["clip"]}, tokens,
                                          method=self.clip.encode_text)
        return embed, features, tokens != 0


def _with_truncation(options: dict, truncation: float | None) -> dict:
    return options if truncation is None else {**options, "truncation": truncation}


def _to_uint8(images):
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
