"""CLIP family: model from the config, the contrastive loss, and its evaluation: zero-shot
attribute accuracy on shapes, retrieval accuracy on other image-text data."""

from __future__ import annotations

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import images as images_lib
from dalle_jax import once
from dalle_jax.data import pipeline, shapes
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import layers
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import state as state_lib

ATTRIBUTES = ("colour", "shape", "size", "position", "background")


def build_model(config) -> clip_lib.CLIP:
    return clip_lib.CLIP(variant=config.model.variant, image_size=config.data.image_size,
                         context_length=config.data.context_length, remat=config.remat,
                         dtype=jnp.dtype(config.dtype))


# The key of the pixel head's parameters beside the CLIP's own: a training aid, dropped from
# the CLIP that later stages and model files take (`clip_params`).
PIXEL_HEAD = "pixel_head"


class PixelHead(nn.Module):
    """Normalised image embedding [B, E] -> the picture box-downsampled to [B, s, s, 3].

    A training aid for the image tower (`loss_fn`): a picture's embedding must say which colour
    is where for this small MLP to redraw the picture, which the contrastive loss alone never
    asked of it (two objects' places exchanged gave image vectors of cosine 0.98 and a relation
    read at chance; benchmarks/RESULTS.md, sessions 10-14)."""

    size: int
    width: int = 256

    @nn.compact
    def __call__(self, embed):
        h = nn.gelu(layers.Dense(self.width, name="hidden")(embed))
        out = layers.Dense(self.size * self.size * 3, name="out")(h)
        return out.reshape(embed.shape[0], self.size, self.size, 3)


def clip_params(params):
    """The CLIP's own parameters of a CLIP run's (the pixel head dropped)."""
    return {k: v for k, v in params.items() if k != PIXEL_HEAD}


class CLIPTask:
    """What the shared loop needs from a model family: init, loss, evaluation."""

    def __init__(self, config):
        self.config = config
        self.model = build_model(config)
        pixel = config.get("pixel_loss") or {}
        self.pixel_weight = float(pixel.get("weight", 0.0))
        self.text_pixel_weight = float(pixel.get("text_weight", 0.0))
        if self.text_pixel_weight and not self.pixel_weight:
            raise ValueError("pixel_loss.text_weight needs pixel_loss.weight > 0: the head it "
                             "draws through is trained on the pictures")
        size = int(pixel.get("size", 8))
        if self.pixel_weight and config.data.image_size % size:
            raise ValueError(f"pixel_loss.size {size} must divide data.image_size "
                             f"{config.data.image_size}")
        self.pixel_head = PixelHead(size) if self.pixel_weight else None

    def init_params(self, rng):
        c = self.config.data
        images = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
        tokens = jnp.zeros((1, c.context_length), jnp.int32)
        params = once.jit(self.model.init)(rng, images, tokens)["params"]
        if self.pixel_head is not None:
            head_rng = jax.random.fold_in(rng, 1)
            embed = jnp.zeros((1, self.model.config.embed_dim), jnp.float32)
            head = once.jit(self.pixel_head.init)(head_rng, embed)["params"]
            params = {**params, PIXEL_HEAD: head}
        return params

    frozen = {}  # CLIP trains every parameter it uses

    def grad_fn(self, params, batch, rng, frozen, step):
        return state_lib.value_and_grad_fn(self.loss_fn)(params, batch, rng, frozen, step)

    def loss_fn(self, params, batch, rng, frozen):
        del rng, frozen  # the contrastive loss is deterministic
        image_embed, text_embed, aux = self.model.apply({"params": params}, batch["image"],
                                                        batch["tokens"])
        negative_embed = None
        if "negative_tokens" in batch:
            tokens = batch["negative_tokens"]
            negative_embed = self.model.apply({"params": params},
                                              tokens.reshape(-1, tokens.shape[-1]),
                                              method=self.model.encode_text)[0]
        loss = clip_lib.contrastive_loss(self.config.loss, image_embed, text_embed, aux,
                                         negative_embed)
        metrics = {"logit_scale": aux["logit_scale"]}
        if self.pixel_head is not None:
            redrawn = self.pixel_head.apply({"params": params[PIXEL_HEAD]}, image_embed)
            target = images_lib.box_downsample(batch["image"].astype(jnp.float32),
                                               self.pixel_head.size)
            pixel = jnp.mean(jnp.square(redrawn - target))
            metrics = {**metrics, "contrastive_loss": loss, "pixel_loss": pixel}
            loss = loss + self.pixel_weight * pixel
            if self.text_pixel_weight:
                # The caption's vector through the same head, its weights held: the text tower
                # must put a caption where the head draws what the caption says, in the code
                # the image tower uses for which colour is where.
                head = jax.lax.stop_gradient(params[PIXEL_HEAD])
                drawn = self.pixel_head.apply({"params": head}, text_embed)
                text_pixel = jnp.mean(jnp.square(drawn - target))
                metrics["text_pixel_loss"] = text_pixel
                loss = loss + self.text_pixel_weight * text_pixel
        return loss, metrics

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        del step
        evaluate = zero_shot_accuracy if self.config.data.name == "shapes" else retrieval_accuracy
        return evaluate(self.model, params, self.config.data, self.config.eval.num_examples)


@functools.lru_cache(maxsize=4)
def _encoders(model):
    image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image)[0])
    text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text)[0])
    return image, text


def batched(fn, *arrays, chunk: int = 256, progress=None):
    """`fn(*chunk_of_each_array)` over fixed-size chunks (the last padded by repeating its
    final row), so `fn` compiles once; returns the outputs concatenated, padding dropped (a
    tuple when `fn` returns one). `progress.update(rows)` is called after each chunk."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, chunk):
        part = [a[start:start + chunk] for a in arrays]
        m = len(part[0])
        if m < chunk:
            part = [np.concatenate([a, np.repeat(a[-1:], chunk - m, 0)]) for a in part]
        out = fn(*part)
        outs.append([np.asarray(o)[:m] for o in (out if isinstance(out, tuple) else (out,))])
        if progress is not None:
            progress.update(m)
    if not outs:
        return np.zeros((0,), np.float32)
    result = tuple(np.concatenate(parts) for parts in zip(*outs))
    return result if len(result) > 1 else result[0]


def embed_images(model, params, images_uint8: np.ndarray) -> np.ndarray:
    """Unit CLIP image vectors of uint8 pictures at the CLIP's side or a whole multiple of it
    (box-downsampled first)."""
    images = images_lib.box_downsample(pipeline.to_float_images(images_uint8),
                                       model.config.image_size)
    return batched(functools.partial(_encoders(model)[0], params), images)


def embed_texts(model, params, captions: list[str], context_length: int) -> np.ndarray:
    tokens = Tokenizer()(captions, context_length=context_length)
    return batched(functools.partial(_encoders(model)[1], params), tokens)


def _is_held_out(parsed) -> bool:
    return any((o.colour, o.shape) in shapes.HELD_OUT for o in parsed.objects)


def zero_shot_accuracy(model, params, data_config, num_examples: int) -> dict[str, float]:
    """Zero-shot attribute accuracy on the eval split.

    For each attribute a caption states, the model picks among captions that differ in that
    attribute alone (`shapes.caption_variants`); the score is how often it picks the true one.
    Two-object captions measure binding: the true caption against the one with the colours
    swapped between the objects, and against the reversed relation (chance is 50%).
    Reported overall and on the held-out colour-shape pairs.
    """
    images, captions = pipeline.eval_examples(data_config, num_examples)
    image_embed = embed_images(model, params, images)
    # Build every candidate list first, then encode all texts in one batched pass.
    groups = []  # (metric name, held_out, example index, candidate captions)
    for i, caption in enumerate(captions):
        parsed = shapes.parse_caption(caption)
        if parsed is None:
            continue
        held = _is_held_out(parsed)
        if len(parsed.objects) == 1:
            obj = parsed.objects[0]
            stated = {"colour": obj.colour, "shape": obj.shape, "size": obj.size,
                      "position": obj.position, "background": parsed.background}
            for attribute in ATTRIBUTES:
                if stated[attribute] is not None:
                    groups.append((attribute, held, i, shapes.caption_variants(caption, attribute)))
        else:
            groups.append(("binding_colour_swap", held, i, shapes.swap_colours(caption)))
            groups.append(("binding_relation", held, i, shapes.reverse_relation(caption)))
    texts = [c for g in groups for c in g[3]]
    text_embed = embed_texts(model, params, texts, data_config.context_length)
    hits = collections.defaultdict(list)
    offset = 0
    for name, held, i, candidates in groups:
        sims = text_embed[offset:offset + len(candidates)] @ image_embed[i]
        offset += len(candidates)
        correct = float(np.argmax(sims) == 0)
        hits[f"zero_shot/{name}"].append(correct)
        if held:
            hits[f"zero_shot_held_out/{name}"].append(correct)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def retrieval_accuracy(model, params, data_config, num_examples: int,
                       ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Zero-shot retrieval on the eval pictures and their captions (`data.eval_path`): how
    often the true caption is among the k captions closest to a picture (image -> text), and
    the true picture among the k closest to its caption (text -> image). Pictures that share
    a caption count as the same answer. Chance is about k / N for N examples (reported)."""
    images, captions = pipeline.eval_examples(data_config, num_examples)
    image_embed = embed_images(model, params, images)
    distinct = sorted(set(captions))
    text_embed = embed_texts(model, params, distinct, data_config.context_length)
    column = {c: j for j, c in enumerate(distinct)}
    truth = np.array([column[c] for c in captions])
    return {"retrieval/examples": float(len(captions)),
            **retrieval_scores(image_embed @ text_embed.T, truth, ks)}


def retrieval_scores(sims: np.ndarray, truth: np.ndarray,
                     ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval both ways from similarities [N pictures, M distinct captions], picture
    i's caption being column truth[i]: image -> text over the pictures, text -> image over
    the captions (a hit is any picture of that caption among the k closest)."""
    num_texts = sims.shape[1]
    results = {}
    for k in ks:
        top_texts = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        results[f"retrieval/image_to_text_top{k}"] = float(np.mean(np.any(
            top_texts == truth[:, None], axis=1)))
        top_images = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]
        results[f"retrieval/text_to_image_top{k}"] = float(np.mean(np.any(
            truth[top_images] == np.arange(num_texts)[:, None], axis=1)))
        results[f"retrieval/chance_top{k}"] = min(1.0, k / num_texts)
    return results
