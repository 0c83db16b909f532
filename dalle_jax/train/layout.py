"""Layout family: learns caption -> layout map (`models/layout.py`) on a frozen CLIP's token
embeddings, by teacher-forced cross-entropy of each cell given the caption and the cells
before it; the targets are read from the training pictures inside the step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import images as images_lib
from dalle_jax.data import pipeline
from dalle_jax.data import shapes
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import layout as layout_lib
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import clip as clip_family


def build_model(config, clip_config) -> layout_lib.LayoutModel:
    """The layout model of a `layout` stage config (a dict or ConfigDict) on this CLIP."""
    m = config["model"]
    return layout_lib.LayoutModel(layout_lib.LayoutConfig(
        token_dim=clip_config.text_width, context_length=config["data"]["context_length"],
        width=m["width"], layers=m["layers"], num_heads=m["num_heads"],
        vector_dim=clip_config.embed_dim if m.get("vector") else 0))


def image_vectors(clip_model, clip_params, images):
    """The frozen CLIP's image vectors of pictures in [-1, 1] (box-downsampled to its side)."""
    x = images_lib.box_downsample(images, clip_model.config.image_size)
    return jax.lax.stop_gradient(clip_model.apply({"params": clip_params}, x,
                                                  method=clip_model.encode_image)[0])


def words_of(clip_params, tokens):
    """What the layout model reads: the CLIP's token embeddings (the words before its causal
    Transformer mixes them) and the mask of real tokens."""
    return jax.lax.stop_gradient(clip_lib.token_embeddings(clip_params, tokens)), tokens != 0


class LayoutTask:
    def __init__(self, config, clip_params, clip_config):
        if config.data.name != "shapes":
            raise ValueError("the layout stage reads the layouts of captioned shapes (colour "
                             f"and shape words); data.name is {config.data.name!r}")
        self.config = config
        self.clip_model = clip_family.build_model(clip_config)
        self.frozen = {"clip": clip_params}
        self.model = build_model(config, self.clip_model.config)
        self.text_drop_prob = config.model.get("text_drop_prob", 0.0)
        if self.text_drop_prob and not self.model.config.vector_dim:
            raise ValueError("layout model.text_drop_prob needs model.vector=True (a layout "
                             "drawn without its caption is drawn from the image vector alone)")

    def init_params(self, rng):
        length = self.config.data.context_length
        c = self.model.config
        vector = np.zeros((1, c.vector_dim), np.float32) if c.vector_dim else None
        return self.model.init(rng, np.zeros((1, length, c.token_dim), np.float32),
                               np.ones((1, length), bool),
                               np.zeros((1, c.res * c.res), np.int32), vector)["params"]

    def grad_fn(self, params, batch, rng, frozen, step):
        del step
        words, mask = words_of(frozen["clip"], batch["tokens"])
        target = layout_lib.targets(batch["image"], batch["tokens"], self.model.config.res)
        vector = None
        if self.model.config.vector_dim:
            vector = image_vectors(self.clip_model, frozen["clip"], batch["image"])
        if self.text_drop_prob:  # the caption dropped: the layout from the vector alone
            drop = jax.random.bernoulli(rng, self.text_drop_prob, (mask.shape[0],))
            mask = mask & ~drop[:, None]
        loss, grads = jax.value_and_grad(
            lambda p: layout_lib.loss(self.model, p, words, mask, target, vector))(params)
        return grads, {"loss": loss}

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        del step
        return layout_report(self.model, params, self.frozen["clip"], self.config.data,
                             self.config.eval.num_examples,
                             self.config.eval.get("temperature", 1.0), clip_model=self.clip_model)


def layout_report(model, params, clip_params, data_config, num_examples: int,
                  temperature: float = 1.0, seed: int = 0, clip_model=None) -> dict[str, float]:
    """On the eval split's first `num_examples` captions, each layout sampled once (a model
    that reads an image vector reads the real picture's, from `clip_model`):
    `layout/two_object_relation`, the two-object captions whose sampled layout holds both named
    (colour, shape) classes in the caption's relation (`models/layout.relation_right`), beside
    `layout/two_object_reversed`, the same layouts read against the caption with the relation
    reversed (what a model deaf to the relation scores alike), and `layout/one_object_class`,
    the one-object captions whose layout holds the named class and no other object; with an
    image vector also `layout/cell_agreement`, the cells that agree with the real map."""
    images, captions = pipeline.eval_examples(data_config, num_examples)
    tokens = Tokenizer()(captions, context_length=data_config.context_length)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), len(captions)))
    arrays = (tokens, keys)
    if model.config.vector_dim:
        x = pipeline.to_float_images(images)
        arrays += (clip_family.batched(jax.jit(functools.partial(
            image_vectors, clip_model, clip_params)), x, chunk=200),)
    drawn = clip_family.batched(functools.partial(_sampler(model, temperature), params,
                                                  clip_params), *arrays, chunk=200)
    parsed = [shapes.parse_caption(c) for c in captions]
    two = [i for i, p in enumerate(parsed) if len(p.objects) == 2]
    one = [i for i, p in enumerate(parsed) if len(p.objects) == 1]
    report = {}
    if two:
        report["layout/two_object_relation"] = float(np.mean(layout_lib.relation_right(
            drawn[two], [captions[i] for i in two])))
        report["layout/two_object_reversed"] = float(np.mean(layout_lib.relation_right(
            drawn[two], [shapes.reverse_relation(captions[i])[1] for i in two])))
    if one:
        first = len(layout_lib.BACKGROUNDS)
        right = []
        for i in one:
            o = parsed[i].objects[0]
            present = {c for c in np.unique(drawn[i]).tolist() if c >= first}
            right.append(present == {layout_lib.object_class(o.colour, o.shape)})
        report["layout/one_object_class"] = float(np.mean(right))
    if model.config.vector_dim:
        real = np.asarray(layout_lib.targets(jnp.asarray(x), tokens, model.config.res))
        report["layout/cell_agreement"] = float(np.mean(drawn == real))
    return report


def _sampler(model, temperature):
    @jax.jit
    def fn(params, clip_params, tokens, keys, vector=None):
        words, mask = words_of(clip_params, tokens)
        return layout_lib.sample(model, params, words, mask, keys, temperature, vector)
    return fn
