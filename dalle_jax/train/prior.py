"""Prior family: learns text vector -> image vector on a frozen CLIP (flow matching)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from dalle_jax.data import pipeline
from dalle_jax.models import flow_prior
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import clip as clip_family


def build_model(config, clip_model) -> flow_prior.FlowPrior:
    c = clip_model.config
    return flow_prior.FlowPrior(flow_prior.PriorConfig(
        embed_dim=c.embed_dim, token_dim=c.text_width, width=config.model.width,
        depth=config.model.depth, sample_steps=config.model.sample_steps))


def clip_conditions(clip_model, clip_params, images, tokens):
    """(image embedding or None, text embedding, token features, token mask), no gradient."""
    apply = lambda x, method: clip_model.apply({"params": clip_params}, x, method=method)
    text_embed, token_features = apply(tokens, clip_model.encode_text)
    image_embed = None if images is None else apply(images, clip_model.encode_image)[0]
    stop = jax.lax.stop_gradient
    return (None if image_embed is None else stop(image_embed), stop(text_embed),
            stop(token_features), tokens != 0)


class PriorTask:
    def __init__(self, config, clip_params, clip_config):
        self.config = config
        self.clip_model = clip_family.build_model(clip_config)
        self.frozen = {"clip": clip_params}
        self.model = build_model(config, self.clip_model)
        self.embed_stats = self._embed_stats()

    def init_params(self, rng):
        mean, std = self.embed_stats
        return flow_prior.init(self.model, rng, self.config.data.context_length, mean, std)

    def _embed_stats(self, count: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and spread of the frozen CLIP's image vectors over training
        pictures (a fixed stretch of the stream, far past what early steps read)."""
        d = self.config.data
        images, _ = pipeline.reference_examples(d, count)
        embed = clip_family.embed_images(self.clip_model, self.frozen["clip"], images)
        return embed.mean(0), embed.std(0) + 1e-4

    def grad_fn(self, params, batch, rng, frozen, step):
        del step
        image_embed, text_embed, token_features, mask = clip_conditions(
            self.clip_model, frozen["clip"], batch["image"], batch["tokens"])
        loss, grads = jax.value_and_grad(
            lambda p: flow_prior.flow_matching_loss(self.model, p, image_embed, text_embed,
                                                    token_features, mask, rng))(params)
        return grads, {"loss": loss}

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        del step
        return prior_cosine(self.model, params, self.clip_model, self.frozen["clip"],
                            self.config.data, self.config.eval.num_examples)


def prior_cosine(model, params, clip_model, clip_params, data_config, num_examples: int,
                 seed: int = 0) -> dict[str, float]:
    """Mean cosine(sampled image vector, true image vector) on the eval split, beside the
    baseline of taking the text vector itself as the image vector (no prior)."""
    images, captions = pipeline.eval_examples(data_config, num_examples)
    tokens = Tokenizer()(captions, context_length=data_config.context_length)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), len(captions)))
    sampled, true, text = clip_family.batched(
        functools.partial(_sampler(model, clip_model), params, clip_params),
        pipeline.to_float_images(images), tokens, keys, chunk=200)
    return {"prior_cosine": float(np.mean(np.sum(sampled * true, -1))),
            "text_as_image_cosine": float(np.mean(np.sum(text * true, -1)))}


def _sampler(model, clip_model):
    @jax.jit
    def fn(params, clip_params, images, tokens, keys):
        image_embed, text_embed, features, mask = clip_conditions(clip_model, clip_params,
                                                                  images, tokens)
        return (flow_prior.sample(model, params, text_embed, features, mask, keys),
                image_embed, text_embed)
    return fn
