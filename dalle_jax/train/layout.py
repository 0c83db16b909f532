"""Layout family: learns caption -> layout map (`models/layout.py`) on a frozen CLIP's token
embeddings, by teacher-forced cross-entropy of each cell given the caption and the cells
before it; the targets are read from the training pictures inside the step."""

from __future__ import annotations

import functools

import jax
import numpy as np

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
        width=m["width"], layers=m["layers"], num_heads=m["num_heads"]))


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

    def init_params(self, rng):
        length = self.config.data.context_length
        c = self.model.config
        return self.model.init(rng, np.zeros((1, length, c.token_dim), np.float32),
                               np.ones((1, length), bool),
                               np.zeros((1, c.res * c.res), np.int32))["params"]

    def grad_fn(self, params, batch, rng, frozen, step):
        del rng, step
        words, mask = words_of(frozen["clip"], batch["tokens"])
        target = layout_lib.targets(batch["image"], batch["tokens"], self.model.config.res)
        loss, grads = jax.value_and_grad(
            lambda p: layout_lib.loss(self.model, p, words, mask, target))(params)
        return grads, {"loss": loss}

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        del step
        return layout_report(self.model, params, self.frozen["clip"], self.config.data,
                             self.config.eval.num_examples,
                             self.config.eval.get("temperature", 1.0))


def layout_report(model, params, clip_params, data_config, num_examples: int,
                  temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """On the eval split's first `num_examples` captions, each layout sampled once:
    `layout/two_object_relation`, the two-object captions whose sampled layout holds both named
    (colour, shape) classes in the caption's relation (`models/layout.relation_right`), beside
    `layout/two_object_reversed`, the same layouts read against the caption with the relation
    reversed (what a model deaf to the relation scores alike), and `layout/one_object_class`,
    the one-object captions whose layout holds the named class and no other object."""
    _, captions = pipeline.eval_examples(data_config, num_examples)
    tokens = Tokenizer()(captions, context_length=data_config.context_length)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), len(captions)))
    drawn = clip_family.batched(functools.partial(_sampler(model, temperature), params,
                                                  clip_params), tokens, keys, chunk=200)
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
    return report


def _sampler(model, temperature):
    @jax.jit
    def fn(params, clip_params, tokens, keys):
        words, mask = words_of(clip_params, tokens)
        return layout_lib.sample(model, params, words, mask, keys, temperature)
    return fn
