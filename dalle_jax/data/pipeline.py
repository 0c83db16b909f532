"""The input pipeline: per-host batches as a grain dataset, assembled into global arrays.

Each element of the grain dataset is one host's slice of one global batch, a dict of
  image   float32 [b, H, W, 3] in [-1, 1] (NHWC)
  tokens  int32 [b, L] CLIP token ids
  negative_tokens  int32 [b, K, L], only with K = `hard_negatives` > 0: captions that differ
          from the true one in one attribute (NegCLIP, Yuksekgonul et al. 2023)
where b = global_batch / process_count. Element k on host p holds examples
k * global_batch + p * b + [0, b) of the source, so the stream is a pure function of the step
and the host; the iterator's state (the next k) is saved with each checkpoint.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from dalle_jax.data import shapes
from dalle_jax.tokenizer import Tokenizer

# Large enough never to run out, small enough for int64 index arithmetic.
_ENDLESS = 2 ** 40


def to_float_images(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8_images(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ShapesBatches:
    """Random access to the shapes stream, one host's batch at a time."""

    def __init__(self, split: str, seed: int, image_size: int, context_length: int,
                 global_batch: int, process_index: int = 0, process_count: int = 1,
                 hard_negatives: int = 0):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} does not split over "
                             f"{process_count} processes")
        self.split, self.seed, self.image_size = split, seed, image_size
        self.context_length = context_length
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.hard_negatives = hard_negatives
        self.tokenizer = Tokenizer()

    def __len__(self):
        return _ENDLESS

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        start = int(k) * self.global_batch + self.offset
        images, captions = shapes.examples(range(start, start + self.local_batch),
                                           split=self.split, seed=self.seed,
                                           size=self.image_size)
        batch = {"image": to_float_images(images),
                 "tokens": self.tokenizer(captions, context_length=self.context_length)}
        if self.hard_negatives:
            rng = np.random.default_rng([self.seed, 1, start])
            negatives = [hard_negative(c, rng) for c in captions
                         for _ in range(self.hard_negatives)]
            tokens = self.tokenizer(negatives, context_length=self.context_length)
            batch["negative_tokens"] = tokens.reshape(len(captions), self.hard_negatives, -1)
        return batch


def hard_negative(caption: str, rng: np.random.Generator) -> str:
    """The caption with one stated attribute changed (for two objects: a colour or shape
    changed, the colours swapped, or the relation reversed), so that the contrastive loss
    rewards reading every word, not only the easiest one.

    A negative never names a held-out colour-shape pair: the training split must not contain
    them in any caption, and a model that only ever sees "red triangle" as a wrong answer learns
    to reject it everywhere.
    """
    parsed = shapes.parse_caption(caption)
    if len(parsed.objects) == 2:
        kinds = ["swap", "relation", "shape", "colour"]
    else:
        obj = parsed.objects[0]
        stated = {"size": obj.size, "position": obj.position, "background": parsed.background}
        # Shape and colour are always stated; the others only sometimes.
        kinds = ["shape", "shape", "colour"] + [k for k, v in stated.items() if v is not None]
    for kind in rng.permutation(kinds):
        if kind == "swap":
            candidates = shapes.swap_colours(caption)[1:]
        elif kind == "relation":
            candidates = shapes.reverse_relation(caption)[1:]
        else:
            candidates = shapes.caption_variants(caption, kind)[1:]
        candidates = [c for c in candidates if not _names_held_out(c)]
        if candidates:
            return candidates[rng.integers(len(candidates))]
    return caption  # nothing to change: the negative duplicates the positive


def _names_held_out(caption: str) -> bool:
    parsed = shapes.parse_caption(caption)
    return any((o.colour, o.shape) in shapes.HELD_OUT for o in parsed.objects)


def make_dataset(config, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The training stream from a `data` config block."""
    if config.name != "shapes":
        raise ValueError(f"unknown dataset {config.name!r}; valid: shapes")
    source = ShapesBatches(config.split, config.seed, config.image_size, config.context_length,
                           config.global_batch, process_index, process_count,
                           config.hard_negatives)
    return grain.MapDataset.source(source)


def make_iterator(dataset: grain.MapDataset, num_threads: int = 2,
                  prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable iterator that prepares batches in background threads."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


@functools.lru_cache(maxsize=8)
def eval_examples(split: str, seed: int, image_size: int, count: int):
    """A fixed evaluation set: (uint8 images [N, H, W, 3], captions)."""
    return shapes.examples(range(count), split=split, seed=seed, size=image_size)
