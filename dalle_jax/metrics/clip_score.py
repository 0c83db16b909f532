"""CLIP score: how well pictures match their captions, by the project's own (in-house) CLIP.

    from dalle_jax.metrics import clip_score
    scorer = clip_score.CLIPScore.from_pipeline(pipe)       # the pipeline's frozen CLIP
    scorer.score(images, captions)                           # {"clip_score": ..., "images": N}

CLIPScore (Hessel et al. 2021) with w = 100, as torchmetrics reports it: the mean over pictures
of max(100 * cos(image vector, caption vector), 0). The vectors come from this project's CLIP,
not OpenAI's ViT-L/14 (published weights are not on this machine), so the number is comparable
only between models judged by the same CLIP: reports label it "in-house CLIP". Given a CLIP
imported from published weights (`clip_import`), it is the standard score.

Both towers and the cosine run in one jitted program over fixed-size batches split over a data
mesh of this host's devices, so any number of pictures compiles once per picture size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import images as images_lib
from dalle_jax import sharding
from dalle_jax.models import clip as clip_lib
from dalle_jax.tokenizer import Tokenizer

W = 100.0  # Hessel et al.'s rescaling, as torchmetrics applies it
LABEL = "in-house CLIP"


class CLIPScoreError(ValueError):
    """Unusable pictures or captions. Its message is one line, for the user."""


def pair_scores(image_embed, text_embed):
    """max(W * cos, 0) per row of [N, E] image and text vectors (normalised here, so any
    length works)."""
    cos = jnp.sum(clip_lib.l2_normalize(image_embed) * clip_lib.l2_normalize(text_embed), -1)
    return jnp.maximum(W * cos, 0.0)


@functools.cache
def _scores_fn(clip: clip_lib.CLIP, mesh):
    """(params, uint8 images [B, S, S, 3], tokens [B, L]) -> scores [B], compiled per mesh and
    picture side (a whole multiple of the CLIP's is box-downsampled to it, as the Pipeline's
    encode_images does)."""
    batch = sharding.batch_sharding(mesh)

    def fn(params, images, tokens):
        x = images.astype(jnp.float32) / 127.5 - 1.0  # the [-1, 1] range CLIP trained on
        x = images_lib.box_downsample(x, clip.config.image_size)
        image_embed, _ = clip.apply({"params": params}, x, method=clip.encode_image)
        text_embed, _ = clip.apply({"params": params}, tokens, method=clip.encode_text)
        return pair_scores(image_embed, text_embed)

    return jax.jit(fn, in_shardings=(sharding.replicated(mesh), batch, batch),
                   out_shardings=batch)


class CLIPScore:
    """A CLIP (module and parameters) that scores picture-caption pairs."""

    def __init__(self, clip: clip_lib.CLIP, params: dict, batch_size: int = 64, mesh=None,
                 label: str = LABEL):
        self.clip, self.label = clip, label
        self.image_size = clip.config.image_size
        self.context_length = clip.config.context_length
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.local_devices())
        n = self.mesh.size
        self.batch_size = max(n, -(-batch_size // n) * n)  # a multiple of the device count
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        self.tokenizer = Tokenizer()

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "CLIPScore":
        """The pipeline's own frozen CLIP."""
        return cls(pipe.clip, pipe.params["clip"], **kwargs)

    def pair_scores(self, images, captions) -> np.ndarray:
        """Per-pair scores float32 [N] of uint8 pictures [N, S, S, 3] and their N captions
        (cut to the CLIP's context, as in training). Pictures at a whole multiple of the
        CLIP's side S are box-downsampled to it first."""
        images = np.asarray(images)
        s = self.image_size
        side = images.shape[1] if images.ndim == 4 else 0
        if (images.ndim != 4 or not side or side % s or images.shape[1:] != (side, side, 3)
                or images.dtype != np.uint8):
            raise CLIPScoreError(f"CLIP score takes uint8 pictures [N, {s}, {s}, 3] (or a whole "
                                 f"multiple of {s} px), not {images.dtype} {list(images.shape)}")
        if isinstance(captions, str) or len(captions) != len(images):
            raise CLIPScoreError(f"CLIP score needs one caption per picture: {len(images)} "
                                 f"pictures, {1 if isinstance(captions, str) else len(captions)} "
                                 "captions")
        tokens = self.tokenizer(list(captions), context_length=self.context_length)
        fn, b, out = _scores_fn(self.clip, self.mesh), self.batch_size, []
        batch = sharding.batch_sharding(self.mesh)
        for start in range(0, len(images), b):
            x, t = images[start:start + b], tokens[start:start + b]
            m = len(x)
            if m < b:  # pad to the compiled batch; the padding's scores are dropped
                x = np.concatenate([x, np.zeros((b - m, *x.shape[1:]), np.uint8)])
                t = np.concatenate([t, np.repeat(t[-1:], b - m, 0)])
            scores = fn(self.params, jax.device_put(x, batch), jax.device_put(t, batch))
            out.append(np.asarray(scores)[:m])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def score(self, images, captions) -> dict:
        """{"clip_score": mean over pictures, "images": N, "clip": label}."""
        scores = self.pair_scores(images, captions)
        if not len(scores):
            raise CLIPScoreError("CLIP score needs at least one picture")
        return {"clip_score": float(np.mean(scores, dtype=np.float64)), "images": len(scores),
                "clip": self.label}
