"""unCLIP families: the diffusion prior and the diffusion decoder, each trained on a frozen CLIP.

Tasks for the shared loop, as `train/prior.py` and `train/gan.py` are: init, gradients of the
diffusion loss with the conditions computed from the batch by the frozen CLIP, and evaluation
(the prior: cosine of a sampled image vector to the true one on the eval split; the decoder:
the adherence scorer on eval pictures re-drawn from their own CLIP image vectors by DDIM in a
few steps). `sample_prior` and `sample_decoder` are what a Pipeline calls: jitted, with
per-example keys, so that a picture does not depend on the batch it is drawn in.

Stage config fields: `model` holds the network's fields (`DiffusionPriorConfig`,
`UNetConfig`; the CLIP sizes and the image size are filled in from CLIP and `data`), `eval`
holds `num_examples`, `use_ema`, and optionally `sample_steps` (25 for both) and
`guidance_scale` (1 for the prior, 3 for the decoder). `stages.build_task` maps the families
`diffusion_prior` and `diffusion_decoder` to the two tasks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import numpy as np

from dalle_jax.data import pipeline
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import prior as prior_lib
from dalle_jax.models import unet as unet_lib
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import clip as clip_family
from dalle_jax.train.gan import decoder_report
from dalle_jax.train.prior import clip_conditions


def _fields(cls, model_config: Mapping[str, Any], filled: dict) -> dict:
    """The model config's fields as keyword arguments (lists as tuples); an unknown field is a
    one-line error naming the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls)} - set(filled)
    given = dict(model_config)
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(valid))}")
    return {**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}, **filled}


def build_prior(stage_config, clip_config: clip_lib.CLIPConfig) -> prior_lib.DiffusionPrior:
    """The prior a stage config (a ConfigDict, or its JSON form from a model file) describes."""
    return prior_lib.DiffusionPrior(prior_lib.DiffusionPriorConfig(**_fields(
        prior_lib.DiffusionPriorConfig, stage_config["model"],
        dict(embed_dim=clip_config.embed_dim, token_dim=clip_config.text_width))))


def build_decoder(stage_config, clip_config: clip_lib.CLIPConfig) -> unet_lib.UNet:
    return unet_lib.UNet(unet_lib.UNetConfig(**_fields(
        unet_lib.UNetConfig, stage_config["model"],
        dict(embed_dim=clip_config.embed_dim, token_dim=clip_config.text_width,
             image_size=stage_config["data"]["image_size"]))))


@functools.partial(jax.jit, static_argnames=("model", "steps", "guidance_scale", "eta",
                                             "num_candidates"))
def sample_prior(model: prior_lib.DiffusionPrior, params, text_embed, token_features,
                 token_mask, keys, steps: int, guidance_scale: float, eta: float = 1.0,
                 num_candidates: int = 2):
    """Unit CLIP image embeddings [B, E] for text embeddings [B, E] and caption token features
    [B, L, T] (mask [B, L]), one key per example [B, 2]. The step count, guidance scale and eta
    are compile-time constants (guidance 1 runs the conditional model alone)."""
    return prior_lib.sample(model, params, text_embed, token_features, token_mask, keys, steps,
                            guidance_scale, eta, num_candidates)


@functools.partial(jax.jit, static_argnames=("model", "steps", "guidance_scale", "eta"))
def sample_decoder(model: unet_lib.UNet, params, image_embed, token_features, token_mask, keys,
                   steps: int, guidance_scale: float, eta: float = 0.0):
    """Pictures [B, H, W, 3] in [-1, 1] (`data.pipeline.to_uint8_images` makes them uint8) for
    CLIP image embeddings [B, E] and the caption's token features, one key per example."""
    return unet_lib.sample(model, params, image_embed, token_features, token_mask, keys, steps,
                           guidance_scale, eta)


@functools.partial(jax.jit, static_argnames="clip_model")
def _conditions(clip_model, clip_params, images, tokens):
    return clip_conditions(clip_model, clip_params, images, tokens)


def embed_stats(clip_model, clip_params, data_config, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and spread of the frozen CLIP's image vectors over training pictures
    (a fixed stretch of the stream far past what early steps read), as the flow prior's task."""
    images, _ = pipeline.reference_examples(data_config, count)
    embed = clip_family.embed_images(clip_model, clip_params, images)
    return embed.mean(0), embed.std(0) + 1e-4


def _eval_set(data_config, count: int):
    images, captions = pipeline.eval_examples(data_config, count)
    tokens = Tokenizer()(captions, context_length=data_config.context_length)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), len(captions)))
    return images, captions, tokens, keys


class DiffusionPriorTask:
    """The unCLIP prior on a frozen CLIP: text embedding and caption -> image embedding."""

    def __init__(self, config, clip_params, clip_config, embed_stats_count: int = 2048):
        self.config = config
        self.clip_model = clip_family.build_model(clip_config)
        self.frozen = {"clip": clip_params}
        self.model = build_prior(config, self.clip_model.config)
        self.embed_stats = embed_stats(self.clip_model, clip_params, config.data,
                                       embed_stats_count)

    def init_params(self, rng):
        mean, std = self.embed_stats
        return prior_lib.init(self.model, rng, self.config.data.context_length, mean, std)

    def grad_fn(self, params, batch, rng, frozen, step):
        del step
        conditions = clip_conditions(self.clip_model, frozen["clip"], batch["image"],
                                     batch["tokens"])
        loss, grads = jax.value_and_grad(
            lambda p: prior_lib.diffusion_loss(self.model, p, *conditions, rng))(params)
        return grads, {"loss": loss}

    def sample_prior(self, params, text_embed, token_features, token_mask, keys, steps: int,
                     guidance_scale: float):
        return sample_prior(self.model, params, text_embed, token_features, token_mask, keys,
                            steps, guidance_scale)

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        """Mean cosine(sampled image vector, true image vector) on the eval split, beside the
        baseline of the text vector itself as the image vector (as the flow prior reports)."""
        del step
        e = self.config.eval
        n = e.num_examples
        images, _, tokens, keys = _eval_set(self.config.data, n)
        steps, scale = e.get("sample_steps", 25), e.get("guidance_scale", 1.0)

        def fn(images, tokens, keys):
            image_embed, text_embed, features, mask = _conditions(
                self.clip_model, self.frozen["clip"], images, tokens)
            return (self.sample_prior(params, text_embed, features, mask, keys, steps, scale),
                    image_embed, text_embed)

        sampled, true, text = clip_family.batched(fn, pipeline.to_float_images(images), tokens,
                                                  keys, chunk=min(200, n))
        return {"prior_cosine": float(np.mean(np.sum(sampled * true, -1))),
                "text_as_image_cosine": float(np.mean(np.sum(text * true, -1)))}


class DiffusionDecoderTask:
    """The unCLIP decoder on a frozen CLIP: image embedding and caption -> pixels."""

    def __init__(self, config, clip_params, clip_config):
        self.config = config
        self.clip_model = clip_family.build_model(clip_config)
        self.frozen = {"clip": clip_params}
        self.model = build_decoder(config, self.clip_model.config)

    def init_params(self, rng):
        return unet_lib.init(self.model, rng, self.config.data.context_length)

    def grad_fn(self, params, batch, rng, frozen, step):
        del step
        image_embed, _, features, mask = clip_conditions(self.clip_model, frozen["clip"],
                                                         batch["image"], batch["tokens"])
        loss, grads = jax.value_and_grad(lambda p: unet_lib.diffusion_loss(
            self.model, p, batch["image"], image_embed, features, mask, rng))(params)
        return grads, {"loss": loss}

    def sample_decoder(self, params, image_embed, token_features, token_mask, keys, steps: int,
                       guidance_scale: float, eta: float = 0.0):
        return sample_decoder(self.model, params, image_embed, token_features, token_mask, keys,
                              steps, guidance_scale, eta)

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        """Decoder adherence: each eval picture re-drawn from its own CLIP image vector and
        caption (DDIM, `eval.sample_steps` steps, default 25; `eval.eta`, default 1 as the
        Pipeline draws), scored by the analytic adherence scorer; a grid of real | decoded
        pairs goes to the workdir."""
        e = self.config.eval
        n = e.num_examples
        images, captions, tokens, keys = _eval_set(self.config.data, n)
        steps, scale = e.get("sample_steps", 25), e.get("guidance_scale", 3.0)
        eta = e.get("eta", 1.0)

        def fn(images, tokens, keys):
            image_embed, _, features, mask = _conditions(self.clip_model, self.frozen["clip"],
                                                         images, tokens)
            return self.sample_decoder(params, image_embed, features, mask, keys, steps, scale,
                                       eta)

        fakes = pipeline.to_uint8_images(clip_family.batched(
            fn, pipeline.to_float_images(images), tokens, keys, chunk=min(100, n)))
        return decoder_report(images, fakes, captions, getattr(self, "workdir", None), step,
                              self.config.data.name,
                              functools.partial(clip_family.embed_images, self.clip_model,
                                                self.frozen["clip"]))
