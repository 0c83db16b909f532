"""GAN family: the decoder from a CLIP vector to pixels, trained against a conditional
discriminator on a frozen CLIP.

Losses (StyleGAN2 and its conditional descendants): non-saturating logistic for both players,
a lazy R1 penalty on real images every `r1_interval` steps (Mescheder et al. 2018; Karras et
al. 2020), the matching-aware term of GAN-INT-CLS (Reed et al. 2016: a real image under a
mismatched condition is a negative), optional CLIP guidance (1 - cosine between the frozen
CLIP's embedding of the generated picture and its condition) and optional differentiable
augmentation (Zhao et al. 2020: colour, translation, cutout) on every image the discriminator
sees, and an optional reconstruction term: the generator's picture for a real image's own CLIP
vector is pulled toward that image (squared error, or the pix2pix L1 of Isola et al. 2017,
optionally under the best of the small translations of the real image, or at the best of K
draws of z: implicit maximum likelihood, Li and Malik 2018), in
pixels and optionally in the frozen CLIP image tower's feature maps (a perceptual loss: Johnson
et al. 2016; each position's features unit-normalised over channels as in LPIPS, Zhang et al.
2018, without LPIPS's learned channel weights). The condition is
an image's complete description here, so the term gives the generator a dense signal from the
first step, while the adversarial terms keep the edges sharp and the matching-aware term keeps
the picture faithful to the vector. Both players are updated from the same batch in one
jitted step, which runs the discriminator's trunk once per batch of pictures: the fake batch's
forward serves both players' gradients, and the real batch's serves both the real and the
mismatched condition.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_jax import images as images_lib
from dalle_jax import once
from dalle_jax.data import pipeline
from dalle_jax.metrics import adherence
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import gan as gan_lib
from dalle_jax.models import layout as layout_lib
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import clip as clip_family


def gaussian_blur(images, sigma: float):
    """[B, H, W, C] images blurred by a Gaussian of ``sigma`` pixels (separable, truncated at
    3 sigma, edge pixels extended); sigma 0 returns them unchanged."""
    if not sigma:
        return images
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), images.dtype)
    x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(k[i] * x[:, i:i + h] for i in range(2 * r + 1))
    return sum(k[i] * x[:, :, i:i + w] for i in range(2 * r + 1))


def edge_weights(images, strength: float):
    """[B, H, W, 1] per-pixel weights of the reconstruction error, `1 + strength * e` scaled to
    mean 1 in each picture, where e is the picture's largest absolute step to a right or lower
    neighbour over its channels (values in [-1, 1]), spread over each pixel's 3x3
    neighbourhood (a max filter), so both sides of an edge gain weight and flat regions lose
    it. The weight of every picture stays the same; within it, the error is moved toward the
    edges, where a small star's points differ from a round blob (a star 7 px across is a few
    dozen of a 32 px picture's 1,024 pixels). An edge-weighted pixel loss in the manner of
    boundary-weighted losses in segmentation (Ronneberger et al. 2015); the weights are a
    function of the real picture alone and carry no gradient."""
    x = jax.lax.stop_gradient(images)
    dy = jnp.abs(jnp.diff(x, axis=1, append=x[:, -1:]))
    dx = jnp.abs(jnp.diff(x, axis=2, append=x[:, :, -1:]))
    e = jnp.maximum(dy, dx).max(axis=-1, keepdims=True)
    e = nn.max_pool(e, (3, 3), strides=(1, 1), padding="SAME")
    w = 1.0 + strength * e
    return w / w.mean(axis=(1, 2, 3), keepdims=True)


def reconstruction_error(fake, real, kind: str = "l2", max_shift: int = 0, blur: float = 0.0,
                         edge: float = 0.0):
    """Mean squared (``l2``) or absolute (``l1``) error between the drawn and the real pictures,
    each picture compared with the real one translated by whichever of the (2s+1)^2 shifts of
    at most ``max_shift`` = s pixels per axis fits it best (the real picture's edge pixels
    extended; s = 0 is the plain error).

    Why: the CLIP vector fixes where an object sits only roughly (captioned shapes jitter each
    object by up to 4% of the canvas, 1.3 px at 32 px), and the plain error's optimum under that
    doubt is the average over positions, a blob in which a small star, square or diamond
    often no longer reads as its shape (the mean over the jitter reads as a small star 35% of
    the time, a small square 71%, a small diamond 85%; `benchmarks/shape_ceiling.py`). Under the
    minimum over shifts a sharp object anywhere within s pixels costs nothing extra (the mean
    over what jitter is left after s = 1 reads right every time).

    ``blur`` = sigma > 0 compares the two pictures after a Gaussian blur of sigma pixels, so that
    the term holds the low frequencies (where an object is, how large, which colours) and leaves
    the edges, where a small star differs from a blob, to the adversarial and CLIP terms: a sharp
    object off by a pixel costs little once both are blurred, so the optimum under doubt need not
    be a blurred object (the low-frequency loss of GAN super-resolution and image-to-image
    work).

    ``edge`` = strength > 0 weights each pixel's error by `edge_weights` of the real picture
    (after any blur and shift)."""
    return picture_errors(fake, real, kind, max_shift, blur, edge).mean()


def picture_errors(fake, real, kind: str = "l2", max_shift: int = 0, blur: float = 0.0,
                   edge: float = 0.0):
    """`reconstruction_error` of each picture apart: [B]."""
    err = jnp.abs if kind == "l1" else jnp.square
    fake, real = gaussian_blur(fake, blur), gaussian_blur(real, blur)

    def error(target):
        e = err(fake - target)
        return (e * edge_weights(target, edge) if edge else e).mean(axis=(1, 2, 3))

    if not max_shift:
        return error(real)
    s = int(max_shift)
    h, w = real.shape[1:3]
    padded = jnp.pad(real, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
    per_shift = jnp.stack([error(padded[:, dy:dy + h, dx:dx + w])
                           for dy in range(2 * s + 1) for dx in range(2 * s + 1)])
    return per_shift.min(axis=0)


def diff_augment(images, rng, policy: str):
    """DiffAugment on [B, H, W, 3] images in [-1, 1]: the same ops for real and fake."""
    b, h, w, _ = images.shape
    keys = jax.random.split(rng, 6)
    x = images
    if "color" in policy:
        x = x + (jax.random.uniform(keys[0], (b, 1, 1, 1)) - 0.5)
        mean = x.mean(axis=-1, keepdims=True)
        x = (x - mean) * jax.random.uniform(keys[1], (b, 1, 1, 1), minval=0.0, maxval=2.0) + mean
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * jax.random.uniform(keys[2], (b, 1, 1, 1), minval=0.5, maxval=1.5) + mean
    if "translation" in policy:
        shift = jax.random.randint(keys[3], (b, 2), -(h // 8), h // 8 + 1)
        padded = jnp.pad(x, ((0, 0), (h // 8, h // 8), (w // 8, w // 8), (0, 0)))
        x = jax.vmap(lambda im, s: jax.lax.dynamic_slice(
            im, (h // 8 + s[0], w // 8 + s[1], 0), (h, w, 3)))(padded, shift)
    if "cutout" in policy:
        centre = jax.random.randint(keys[4], (b, 2), 0, h)
        ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
        inside = ((jnp.abs(ys - centre[:, 0, None, None]) < h // 4)
                  & (jnp.abs(xs - centre[:, 1, None, None]) < w // 4))
        x = jnp.where(inside[..., None], 0.0, x)
    return x


def clip_contrastive_loss(similarity, logit_scale):
    """GigaGAN's CLIP contrastive loss (Kang et al. 2023, sec. 3.4), here against the batch's
    condition vectors: `similarity[i, j]` is the cosine between drawn picture i's CLIP vector and
    condition j; each picture must match its own condition better than the others, at the frozen
    CLIP's temperature. With `data.minimal_pairs` the batch holds each scene's counterfactual
    (another shape: same colour, size and place), so the hardest negative is always there."""
    logits = logit_scale * similarity
    labels = jnp.arange(similarity.shape[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def leaves_by_path(tree) -> dict:
    """{"['a']['b']": leaf} for every leaf of a parameter tree."""
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def generator_from_model(source: str, expected) -> dict:
    """The generator weights of a pipeline model file (`shipped:gan`: the package's), to start
    a run from; `expected` is the generator's abstract parameter tree under this config, which
    the file's must match leaf for leaf. Raises BundleError (one line) otherwise."""
    from dalle_jax import bundle
    from dalle_jax.pipeline import model_file
    path = model_file(source)
    meta, params = bundle.load(path)
    if meta["configs"].get("generator") != "gan" or "generator" not in params:
        raise bundle.BundleError(f"decoder.init_from={source}: {path} holds a "
                                 f"{meta['configs'].get('generator')} model, not a GAN generator")
    have = {k: v.shape for k, v in leaves_by_path(params["generator"]).items()}
    want = {k: v.shape for k, v in leaves_by_path(expected).items()}
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise bundle.BundleError(
                f"decoder.init_from={source}: its generator does not fit decoder.model here "
                f"(parameter {key}: {have.get(key)} in the file, {want.get(key)} here); give "
                "the config the file was trained with")
    return params["generator"]


# What the names of the layers a fine-tune may add hold (`models/gan.py`).
ADDED_LAYERS = ("_xattn", "text_reader", "embed_caption", "_layout")


def with_added_layers(initial, fresh) -> dict:
    """The generator `initial` (a finished one's parameters) under this config, whose tree
    `fresh` may hold layers that `initial` lacks (a refine stage that adds cross-attention to
    the caption: `config.REFINE_MAY_ADD`). Those start fresh, every cross-attention's output
    projection and the mapping network's `embed_caption` at zero, so they add nothing yet and
    the fine-tune starts from the initial generator's pictures (as do the layout inputs,
    `models/gan.py` LayoutInput); every other weight must be in
    `initial` with its shape."""
    have, want = leaves_by_path(initial), leaves_by_path(fresh)
    for key in sorted(set(have) | set(want)):
        if key in have and (key not in want or have[key].shape != want[key].shape):
            raise ValueError(f"the initial generator does not fit this config (parameter "
                             f"{key}: {have[key].shape} there, "
                             f"{want[key].shape if key in want else 'none'} here)")
        if key not in have and not any(part in key for part in ADDED_LAYERS):
            raise ValueError(f"the initial generator lacks parameter {key}, which is not one "
                             "of the caption layers a fine-tune may add")

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        if key in have:
            return jnp.asarray(have[key])
        if (("_xattn" in key and "['out']" in key) or "embed_caption" in key
                or "_layout" in key):
            return jnp.zeros_like(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, fresh)


class GANTask:
    """What the shared loop needs: init, grads of both players, frozen CLIP, evaluation."""

    def __init__(self, config, clip_params, clip_config, initial_generator=None):
        """`initial_generator` (parameters) starts the generator, as `config.init_from` does
        from a file (the refine stage's start: `stages.run`)."""
        self.config = config
        self.clip_model = clip_family.build_model(clip_config)
        self.frozen = {"clip": clip_params}
        # The decoder may draw at a multiple of the CLIP's side (a 64 px decoder on a 32 px
        # CLIP): the CLIP then reads every picture, real or drawn, box-downsampled to its side.
        self.clip_size = self.clip_model.config.image_size
        if config.data.image_size % self.clip_size:
            raise ValueError(f"decoder data.image_size {config.data.image_size} must be a "
                             f"whole multiple of the CLIP's {self.clip_size} px")
        self.gan_config = gan_lib.config_from(
            config.model, config.data.image_size, self.clip_model.config.embed_dim,
            self.clip_model.config.text_width)
        if self.gan_config.layout_classes and config.data.name != "shapes":
            raise ValueError("model.layout reads the layout of captioned shapes (colour and "
                             f"shape words); data.name is {config.data.name!r}")
        self.generator = gan_lib.Generator(self.gan_config)
        self.discriminator = gan_lib.Discriminator(self.gan_config)
        # (Its values are the config schema's to check; this needs another field too.)
        self.counterfactual_negatives = config.loss.get("matching_negatives") == "counterfactual"
        if self.counterfactual_negatives and not config.data.get("minimal_pairs"):
            raise ValueError("loss.matching_negatives=counterfactual needs data.minimal_pairs="
                             "True (the batch must hold each scene's counterfactual)")
        self.initial_generator = initial_generator
        if config.get("init_from"):
            self.initial_generator = generator_from_model(
                config.init_from, jax.eval_shape(self._init_generator, jax.random.PRNGKey(0)))

    def _init_generator(self, rng):
        c, d = self.gan_config, self.config.data
        z = jnp.zeros((1, c.z_dim))
        cond = jnp.ones((1, c.cond_dim))
        tokens = jnp.zeros((1, d.context_length, c.token_dim))
        mask = jnp.ones((1, d.context_length), bool)
        layout = jnp.zeros((1, c.layout_res ** 2), jnp.int32) if c.layout_classes else None
        return self.generator.init(rng, z, cond, rng, tokens, mask, layout=layout)["params"]

    def init_params(self, rng):
        """Fresh players; with `init_from`, the generator is that model file's (fine-tuning),
        the discriminator fresh all the same (a model file holds none)."""
        c = self.gan_config
        kg, kd = jax.random.split(rng)
        images = jnp.zeros((1, c.disc_resolution, c.disc_resolution, 3))
        cond = jnp.ones((1, c.cond_dim))
        generator = once.jit(self._init_generator)(kg)
        if self.initial_generator is not None:
            generator = with_added_layers(self.initial_generator, generator)
        return {"generator": generator,
                "discriminator": once.jit(self.discriminator.init)(kd, images, cond)["params"]}

    def to_clip(self, images):
        """Pictures at the decoder's side -> at the CLIP's (box-downsampled; as they are when
        the two sides agree)."""
        return images_lib.box_downsample(images, self.clip_size)

    def conditions(self, clip_params, images, tokens):
        """(condition vector, token features, token mask) from the frozen CLIP; the token
        features are its token embeddings where the generator has a text reader."""
        apply = lambda x, method: self.clip_model.apply({"params": clip_params}, x, method=method)
        text_embed, token_features = apply(tokens, self.clip_model.encode_text)
        if self.config.model.condition == "text":
            cond = text_embed
        else:
            cond = apply(self.to_clip(images), self.clip_model.encode_image)[0]
        if self.gan_config.has_text_reader:  # the reader reads the words themselves
            token_features = clip_lib.token_embeddings(clip_params, tokens)
        stop = jax.lax.stop_gradient
        return stop(cond), stop(token_features), tokens != 0

    def layouts(self, images, tokens):
        """The real pictures' layouts (`models/layout.py` targets) where the generator reads
        one, else None."""
        if not self.gan_config.layout_classes:
            return None
        return layout_lib.targets(images, tokens, self.gan_config.layout_res)

    def feature_maps(self, clip_params, images):
        """The frozen CLIP image tower's feature maps for a perceptual distance: every
        GroupNorm's output (the convolutional tower's layers, a ViT's convolutional stem) and
        the tower's final grid of features (its pooled token dropped)."""
        (_, grid), state = self.clip_model.apply(
            {"params": clip_params}, self.to_clip(images), method=self.clip_model.encode_image,
            capture_intermediates=lambda module, _: isinstance(module, nn.GroupNorm),
            mutable=["intermediates"])
        maps = [m.reshape(m.shape[0], -1, m.shape[-1])
                for m in jax.tree.leaves(state.get("intermediates", {}))]
        return maps + [grid[:, 1:]]

    def perceptual_distance(self, clip_params, fake, real):
        """Mean over layers of the squared distance between unit-normalised feature vectors,
        averaged over positions: 0 for identical pictures, at most 4."""
        unit = lambda f: f * jax.lax.rsqrt(jnp.sum(jnp.square(f), -1, keepdims=True) + 1e-10)
        fake_maps = self.feature_maps(clip_params, fake)
        real_maps = jax.lax.stop_gradient(self.feature_maps(clip_params, real))
        return sum(jnp.mean(jnp.sum(jnp.square(unit(f) - unit(r)), -1))
                   for f, r in zip(fake_maps, real_maps)) / len(fake_maps)

    def grad_fn(self, params, batch, rng, frozen, step):
        lc = self.config.loss
        real, tokens = batch["image"], batch["tokens"]
        b = real.shape[0]
        # Six keys, two no longer used (a step once augmented each D pass apart), so that the
        # others keep the values earlier runs drew.
        k_z, k_noise, _, k_aug_f, k_aug_r, _ = jax.random.split(rng, 6)
        cond, token_features, mask = self.conditions(frozen["clip"], real, tokens)
        if self.gan_config.reads_caption and self.gan_config.text_drop_prob:
            # Folded in, not split off, so that runs without caption dropout keep their keys.
            drop = jax.random.bernoulli(jax.random.fold_in(rng, 7),
                                        self.gan_config.text_drop_prob, (b,))
            mask = mask & ~drop[:, None]
        layout = self.layouts(real, tokens)
        if layout is not None and self.gan_config.layout_drop_prob:
            drop = jax.random.bernoulli(jax.random.fold_in(rng, 8),
                                        self.gan_config.layout_drop_prob, (b,))
            layout = jnp.where(drop[:, None], -1, layout)
        z = jax.random.normal(k_z, (b, self.gan_config.z_dim))
        augment = (lambda x, k: diff_augment(x, k, lc.augment)) if lc.augment else (lambda x, k: x)
        d_side = self.gan_config.disc_resolution
        D = lambda dp, x, c: self.discriminator.apply(
            {"params": dp}, images_lib.box_downsample(x, d_side), c)

        samples = lc.get("reconstruction_samples", 1)
        search = samples > 1 and lc.get("reconstruction_search", False)
        if search:
            # Implicit maximum likelihood (Li and Malik 2018; conditional IMLE, Li et al.
            # 2020): K draws of z for each picture, made without gradients; the step then takes
            # every term at the draw nearest the real picture. Where the condition leaves the
            # picture open (an object's sub-pixel place), each draw can commit to one answer
            # sharply instead of all drawing the average; it costs K - 1 forward passes, not
            # K differentiated ones. The first candidate is the plain step's z.
            candidates = jnp.concatenate(
                [z[None], jax.random.normal(jax.random.fold_in(k_z, 1),
                                            (samples - 1, b, self.gan_config.z_dim))])
            z = self._nearest_draw(jax.lax.stop_gradient(params["generator"]), candidates,
                                   cond, token_features, mask, real, k_noise, layout)

        def generator_terms(gp):
            """The generator's picture and every term of its loss but the adversarial one."""
            draw = lambda z, k: self.generator.apply({"params": gp}, z, cond, k, token_features,
                                                     mask, layout=layout)
            fake = draw(z, k_noise)
            loss, metrics = jnp.zeros(()), {}
            if lc.get("reconstruction_weight", 0.0):
                # Squared error by default: where the decoder is unsure whether an object
                # covers a pixel, L1's optimum is the median, the background, so objects never
                # start to appear (seen on shapes: backgrounds only after 600 steps); the mean
                # draws a faint object that sharpens as the decoder learns.
                errors = lambda x: self._picture_errors(x, real)
                per_picture = errors(fake)
                if samples > 1 and not search:
                    # Best of K draws (multiple-choice learning: Guzman-Rivera et al. 2012;
                    # Bhattacharyya et al. 2018): each picture is held only to the draw of its
                    # z nearest the real one, so where the condition leaves the picture open
                    # (which of two colours sits where, an object's exact place) the draws can
                    # each commit to one answer instead of all drawing the average. The other
                    # terms judge the first draw.
                    others = [errors(draw(jax.random.normal(jax.random.fold_in(k_z, i), z.shape),
                                          jax.random.fold_in(k_noise, i)))
                              for i in range(1, samples)]
                    per_picture = jnp.stack([per_picture, *others]).min(axis=0)
                rec = per_picture.mean()
                loss = loss + lc.get("reconstruction_weight") * rec
                metrics["reconstruction"] = rec
            if lc.get("perceptual_weight", 0.0):
                perceptual = self.perceptual_distance(frozen["clip"], fake, real)
                loss = loss + lc.get("perceptual_weight") * perceptual
                metrics["perceptual"] = perceptual
            contrastive_weight = lc.get("clip_contrastive_weight", 0.0)
            if lc.clip_weight or contrastive_weight:
                fake_embed = self.clip_model.apply({"params": frozen["clip"]},
                                                   self.to_clip(fake),
                                                   method=self.clip_model.encode_image)[0]
                similarity = fake_embed @ clip_lib.l2_normalize(cond).T  # [b, b] cosines
                cosine = jnp.diagonal(similarity).mean()
                loss = loss + lc.clip_weight * (1.0 - cosine)
                metrics["clip_cosine"] = cosine
            if contrastive_weight:
                scale = jnp.minimum(jnp.exp(frozen["clip"]["logit_scale"]), 100.0)  # as CLIP
                contrastive = clip_contrastive_loss(similarity, scale)
                loss = loss + contrastive_weight * contrastive
                metrics["clip_contrastive"] = contrastive
            return (fake, loss), metrics

        (fake, g_rest), g_vjp, g_metrics = jax.vjp(generator_terms, params["generator"],
                                                   has_aux=True)
        dp = params["discriminator"]

        # One discriminator pass over the fake batch serves both players: the generator's
        # non-saturating loss softplus(-l) pulls its gradient back to the pictures, the
        # discriminator's softplus(l) to its weights (the two gradients of one forward,
        # where a step written as two losses runs that forward twice). The same (augmented)
        # fakes are seen by both.
        fake_logits, fake_vjp = jax.vjp(lambda p, x: D(p, augment(x, k_aug_f), cond), dp, fake)
        adversarial_weight = lc.get("adversarial_weight", 1.0)
        adversarial = jax.nn.softplus(-fake_logits).mean()
        fake_grad = fake_vjp(-adversarial_weight * jax.nn.sigmoid(-fake_logits) / b)[1]
        d_fake_grads = fake_vjp(jax.nn.sigmoid(fake_logits) / b)[0]
        g_grads = g_vjp((fake_grad, jnp.ones(())))[0]
        g_loss = adversarial_weight * adversarial + g_rest
        g_metrics = {"g_adversarial": adversarial, **g_metrics}

        def real_loss(p):
            # The matching-aware term (a real image under another's condition is a negative)
            # scores the same real batch under other conditions: one trunk, a head for each.
            # With matching_negatives "counterfactual" the negatives are the neighbour's
            # condition and the scene's minimal-pair partner's (data.minimal_pairs: the same
            # picture but for its shape), the term their mean.
            others = [jnp.roll(cond, 1, axis=0)] if lc.matching_weight else []
            if lc.matching_weight and self.counterfactual_negatives:
                others.append(pipeline.minimal_pair_partners(cond, jax.process_count()))
            logits = D(p, augment(real, k_aug_r), jnp.stack([cond, *others]))
            loss = jax.nn.softplus(-logits[0]).mean()
            metrics = {"d_real": logits[0].mean()}
            if others:
                loss = loss + lc.matching_weight * jax.nn.softplus(logits[1:]).mean()
                metrics["d_mismatch"] = logits[1].mean()
                if len(others) > 1:
                    metrics["d_counterfactual"] = logits[2].mean()
            return loss, metrics

        (d_real_loss, d_metrics), d_real_grads = jax.value_and_grad(real_loss, has_aux=True)(dp)
        d_loss = jax.nn.softplus(fake_logits).mean() + d_real_loss
        d_metrics["d_fake"] = fake_logits.mean()
        d_grads = jax.tree.map(jnp.add, d_fake_grads, d_real_grads)

        def r1_grads(dp):
            def penalty(dp):
                score = lambda x: D(dp, x, cond).sum()
                g = jax.grad(score)(real)
                return 0.5 * lc.r1_gamma * jnp.mean(jnp.sum(jnp.square(g), axis=(1, 2, 3)))
            value, grads = jax.value_and_grad(penalty)(dp)
            # Lazy regularisation: every r1_interval steps, scaled up to the same strength.
            return jax.tree.map(lambda x: x * lc.r1_interval, grads), value

        if lc.r1_gamma:
            r1_on = (step % lc.r1_interval) == 0
            r1, r1_value = jax.lax.cond(
                r1_on, r1_grads,
                lambda dp: (jax.tree.map(jnp.zeros_like, dp), jnp.zeros(())),
                params["discriminator"])
            d_grads = jax.tree.map(jnp.add, d_grads, r1)
        else:
            r1_value = jnp.zeros(())
        grads = {"generator": g_grads, "discriminator": d_grads}
        metrics = {**g_metrics, **d_metrics, "loss": g_loss + d_loss, "g_loss": g_loss,
                   "d_loss": d_loss, "r1": r1_value, "g_grad_norm": optax.tree.norm(g_grads),
                   "d_grad_norm": optax.tree.norm(d_grads)}
        return grads, metrics

    def _nearest_draw(self, generator_params, candidates, cond, token_features, mask, real,
                      noise_key, layout=None):
        """The row of `candidates` [K, B, Z] whose picture is nearest each real picture under
        the reconstruction error: [B, Z]. The K x B pictures are drawn as one batch, so their
        per-pixel noise is that batch's, not the final draw's (the learned noise strengths stay
        below 0.002 on shapes: benchmarks/RESULTS.md, session 21)."""
        k, b = candidates.shape[:2]
        tile = lambda x: None if x is None else jnp.tile(x, (k,) + (1,) * (x.ndim - 1))
        fakes = self.generator.apply({"params": generator_params}, candidates.reshape(k * b, -1),
                                     tile(cond), noise_key, tile(token_features), tile(mask),
                                     layout=tile(layout))
        # The real pictures (and their edge weights) once, against each candidate row.
        errors = jax.vmap(lambda f: self._picture_errors(f, real))(
            fakes.reshape(k, b, *fakes.shape[1:]))
        best = jnp.argmin(errors, axis=0)
        return candidates[best, jnp.arange(b)]

    def _picture_errors(self, fake, real):
        """The configured reconstruction error of each picture: [B]."""
        lc = self.config.loss
        return picture_errors(fake, real, lc.get("reconstruction", "l2"),
                              lc.get("reconstruction_shift", 0),
                              lc.get("reconstruction_blur", 0.0),
                              lc.get("reconstruction_edge", 0.0))

    def render(self, generator_params, clip_params, images, tokens, keys):
        """Pictures in [-1, 1] for the conditions of (images, tokens) (with the pictures' own
        layouts where the generator reads one); one key per picture, so each picture's noise
        is its own whatever batch it is drawn in."""
        cond, token_features, mask = self.conditions(clip_params, images, tokens)
        layout = self.layouts(images, tokens)
        if layout is None:
            layout = jnp.full((images.shape[0], 1), -1, jnp.int32)  # unused

        def one(z_key, c, f, m, lay):
            kz, kn = jax.random.split(z_key)
            z = jax.random.normal(kz, (1, self.gan_config.z_dim))
            return self.generator.apply({"params": generator_params}, z, c[None], kn, f[None],
                                        m[None], layout=lay[None])[0]
        return jax.vmap(one)(keys, cond, token_features, mask, layout)

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        """Decoder adherence: each eval picture re-drawn from its own CLIP vector (the prior is
        judged separately), scored by the analytic adherence scorer; a grid goes to workdir."""
        d = self.config.data
        n = self.config.eval.num_examples
        images, captions = pipeline.eval_examples(d, n)
        tokens = Tokenizer()(captions, context_length=d.context_length)
        if not hasattr(self, "_render"):
            self._render = jax.jit(self.render)
        keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), len(captions)))
        fake = clip_family.batched(
            functools.partial(self._render, params["generator"], self.frozen["clip"]),
            pipeline.to_float_images(images), tokens, keys, chunk=100)
        return decoder_report(images, pipeline.to_uint8_images(fake), captions,
                              getattr(self, "workdir", None), step, d.name,
                              functools.partial(clip_family.embed_images, self.clip_model,
                                                self.frozen["clip"]))


def decoder_report(images, fakes, captions, workdir, step, data_name: str = "shapes",
                   embed_images=None) -> dict[str, float]:
    """Any decoder's evaluation of the pictures it re-drew (`fakes`, uint8) for the eval
    `images` and their captions, and a grid of real | decoded pairs in `workdir`.

    On shapes: the adherence scorer's results. On other data, which no analytic scorer reads:
    the mean squared pixel error in [-1, 1] units and, with `embed_images` (uint8 pictures ->
    unit CLIP image vectors), the mean cosine between the CLIP vectors of the re-drawn and
    the real pictures, i.e. how much of what CLIP sees survives the round trip."""
    if data_name == "shapes":
        results = adherence.summary(adherence.score_batch(fakes, captions), captions)
        results = {f"decoder_adherence/{k}": v for k, v in results.items()
                   if not k.startswith("n_")}
    else:
        error = pipeline.to_float_images(fakes) - pipeline.to_float_images(images)
        results = {"decoder/mse": float(np.mean(np.square(error)))}
        if embed_images is not None:
            cosine = np.sum(embed_images(fakes) * embed_images(images), -1)
            results["decoder/clip_cosine"] = float(np.mean(cosine))
    if workdir and jax.process_index() == 0:
        pairs = np.stack([images[:32], fakes[:32]], 1).reshape(-1, *images.shape[1:])
        images_lib.save_png(os.path.join(workdir, f"samples_{step or 0:06d}.png"),
                            images_lib.grid(pairs, cols=16), {"caption": "real | decoded"},
                            scale=2)
    return results

