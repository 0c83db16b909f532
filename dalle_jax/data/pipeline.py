"""The input pipeline: per-host batches as a grain dataset, assembled into global arrays.

Each element of the grain dataset is one host's slice of one global batch, a dict of
  image   float32 [b, H, W, 3] in [-1, 1] (NHWC)
  tokens  int32 [b, L] CLIP token ids
  negative_tokens  int32 [b, K, L], only with K = `hard_negatives` > 0: captions that differ
          from the true one in one attribute (NegCLIP, Yuksekgonul et al. 2023)
With `minimal_pairs` (shapes only) the second half of each host's batch is the first half's
scenes changed in one hard attribute (`shapes.counterfactual`: a shape; for two objects also
the colours or the places exchanged), so that every such picture and caption meets, inside the
batch, the one picture and caption it differs from in that attribute alone.
where b = global_batch / process_count. Element k on host p holds examples
k * global_batch + p * b + [0, b) of the source, so the stream is a pure function of the step
and the host; the iterator's state (the next k) is saved with each checkpoint.
With `oversample` (shapes only, e.g. "small star:3,small diamond:3" or "two objects:3")
one-object scenes of a named size and shape, or two-object scenes, are drawn that many times
as often as the generator makes them, by rejection sampling over the scene indices
(`ShapesBatches.pick`): still a pure function of the step and the host, but element k then
holds other scene indices than those above. With `oversample_from` = N > 0 that holds from
element N on only, and elements 0 .. N - 1 are the plain stream's: a final phase that dwells
on rare kinds, inside one run, which up to element N is the run without it (so a checkpoint
from before N resumes into it exactly).

Image-text data (`data.name = "folder"` or `"shards"`, at `data.path`) gives the same keys.
Each host reads its own files or shards (`[process_index::process_count]` of the sorted list),
in a fresh permutation every epoch, through a shuffle buffer; each example is decoded, cropped
square (centre, or at a random offset along the longer side) and its caption dropped with
probability `caption_dropout` (an empty caption, for classifier-free guidance). Everything is
a function of the seed and the position in the stream, so runs are repeatable, and the
iterator's state (position, the buffer's contents by reference, the counters) is checkpointed
like the shapes one. Records that cannot be used (unreadable image, missing or non-UTF-8
caption, damaged shard, ...) are skipped and counted by reason: `data_metrics(iterator)`.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import glob
import json
import logging
import os
import unicodedata
import weakref

import grain
import numpy as np

from dalle_jax import images as images_lib
from dalle_jax.data import files, shapes, shards
from dalle_jax.data.files import DataError
from dalle_jax.tokenizer import Tokenizer

# Large enough never to run out, small enough for int64 index arithmetic.
_ENDLESS = 2 ** 40
# Candidate scenes per slot under `oversample`; the chance that all are rejected is below
# (1 - 1 / largest factor) ** 256, 2e-6 at the largest factor allowed, 20 (the last candidate
# is then kept).
_OVERSAMPLE_TRIES = 256
_OVERSAMPLE_MAX = 20.0


# The `data.oversample` kind of every two-object scene.
TWO_OBJECTS = ("two", "objects")


def parse_oversample(spec: str) -> dict[tuple[str, str], float]:
    """`data.oversample`, "size shape:factor,..." (one-object scenes of that size and shape)
    or "two objects:factor", as {(size, shape) or TWO_OBJECTS: factor}; "" is none."""
    factors = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, factor = item.rpartition(":")
        words = tuple(kind.split())
        try:
            value = float(factor)
        except ValueError:
            value = None
        if (not (words == TWO_OBJECTS or len(words) == 2 and words[0] in shapes.SIZES
                 and words[1] in shapes.SHAPES)
                or value is None or not 1.0 <= value <= _OVERSAMPLE_MAX):
            raise DataError(
                f"data.oversample item {item!r} is not 'size shape:factor' with a size in "
                f"{', '.join(shapes.SIZES)}, a shape in {', '.join(shapes.SHAPES)}, or 'two "
                f"objects:factor', with a factor from 1 to {_OVERSAMPLE_MAX:g} (e.g. "
                "'small star:3,small diamond:3')")
        factors[words] = value
    return factors


def to_float_images(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8_images(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ShapesBatches:
    """Random access to the shapes stream, one host's batch at a time."""

    def __init__(self, split: str, seed: int, image_size: int, context_length: int,
                 global_batch: int, process_index: int = 0, process_count: int = 1,
                 hard_negatives: int = 0, minimal_pairs: bool = False, oversample: str = "",
                 oversample_from: int = 0):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} does not split over "
                             f"{process_count} processes")
        if minimal_pairs and (global_batch // process_count) % 2:
            raise ValueError(f"data.minimal_pairs needs an even batch per host, got "
                             f"{global_batch // process_count}")
        self.split, self.seed, self.image_size = split, seed, image_size
        self.context_length = context_length
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.hard_negatives = hard_negatives
        self.minimal_pairs = minimal_pairs
        self.oversample = parse_oversample(oversample)
        if oversample_from < 0:
            raise DataError(f"data.oversample_from must be >= 0, got {oversample_from}")
        self.oversample_from = int(oversample_from)
        self.tokenizer = Tokenizer()

    def __len__(self):
        return _ENDLESS

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if self.minimal_pairs:
            images, captions, keys = self._minimal_pairs(k)
        else:
            start = int(k) * self.global_batch + self.offset
            keys = [self.pick(slot, k) for slot in range(start, start + self.local_batch)]
            images, captions = shapes.examples(keys, split=self.split, seed=self.seed,
                                               size=self.image_size)
        batch = {"image": to_float_images(images),
                 "tokens": self.tokenizer(captions, context_length=self.context_length)}
        if self.hard_negatives:
            # Seeded per example, so that the stream does not depend on how many hosts read it.
            negatives = []
            for key, caption in zip(keys, captions):
                rng = np.random.default_rng([self.seed, 1, key])
                negatives += [hard_negative(caption, rng) for _ in range(self.hard_negatives)]
            tokens = self.tokenizer(negatives, context_length=self.context_length)
            batch["negative_tokens"] = tokens.reshape(len(captions), self.hard_negatives, -1)
        return batch

    def _minimal_pairs(self, k: int) -> tuple[np.ndarray, list[str], list[int]]:
        """Scenes i of this host's half-batch, then their counterfactuals; each row's key
        (2i, or 2i + 1 for a counterfactual) seeds its hard negatives."""
        half = self.local_batch // 2
        first = int(k) * (self.global_batch // 2) + self.offset // 2
        indices = [self.pick(slot, k) for slot in range(first, first + half)]
        scenes = [shapes.scene(i, self.split, self.seed) for i in indices]
        scenes += [shapes.counterfactual(sc, np.random.default_rng([self.seed, 2, i]),
                                         allow_held_out=self.split == "eval")
                   for i, sc in zip(indices, scenes)]
        images = np.stack([shapes.render(sc, self.image_size) for sc in scenes])
        keys = [2 * i for i in indices] + [2 * i + 1 for i in indices]
        return images, [sc.caption for sc in scenes], keys

    def pick(self, slot: int, k: int) -> int:
        """The scene index at position `slot` of the stream, in element `k`: the slot itself,
        or under `oversample` (from element `oversample_from` on) the first of candidates
        slot * T + t kept with probability factor / largest factor (a one-object scene of a
        named size and shape, or a two-object scene, has its factor, any other scene 1), so the
        stream is still a pure function of the slot."""
        if not self.oversample or int(k) < self.oversample_from:
            return int(slot)
        top = max(self.oversample.values())
        for t in range(_OVERSAMPLE_TRIES):
            index = int(slot) * _OVERSAMPLE_TRIES + t
            sc = shapes.scene(index, self.split, self.seed)
            if len(sc.objects) == 1:
                obj = sc.objects[0]
                factor = self.oversample.get((obj.size_name, obj.shape), 1.0)
            else:
                factor = self.oversample.get(TWO_OBJECTS, 1.0)
            if np.random.default_rng([self.seed, 3, index]).random() * top < factor:
                break
        return index


def minimal_pair_partners(x, processes: int):
    """Each row's minimal-pair partner in a global batch built with `data.minimal_pairs`: the
    batch is `processes` host slices, each its scenes then their counterfactuals in the same
    order (`ShapesBatches`), so row i of a slice's first half pairs with row i of its second."""
    b = x.shape[0]
    return x.reshape(processes, 2, b // (2 * processes), *x.shape[1:])[:, ::-1].reshape(x.shape)


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


def make_dataset(config, process_index: int = 0, process_count: int = 1):
    """The training stream from a `data` config block: a grain MapDataset (shapes) or
    IterDataset (folder, shards) of per-host batches."""
    if config.name == "shapes":
        source = ShapesBatches(config.split, config.seed, config.image_size,
                               config.context_length, config.global_batch, process_index,
                               process_count, config.hard_negatives,
                               bool(config.get("minimal_pairs", False)),
                               str(config.get("oversample", "")),
                               int(config.get("oversample_from", 0)))
        return grain.MapDataset.source(source)
    sources = {"folder": files.FolderSource, "shards": shards.ShardSource}
    if config.name not in sources:
        raise ValueError(f"unknown dataset {config.name!r}; valid: shapes, {', '.join(sources)}")
    if not config.get("path"):
        raise DataError(f"data.name={config.name} needs data.path (a folder, or shards)")
    if config.get("hard_negatives", 0):
        raise DataError(f"data.hard_negatives needs shapes captions; set it to 0 for "
                        f"data.name={config.name}")
    if config.get("minimal_pairs", False):
        raise DataError(f"data.minimal_pairs needs shapes scenes; set it to False for "
                        f"data.name={config.name}")
    if config.get("oversample", ""):
        raise DataError(f"data.oversample needs shapes scenes; set it to '' for "
                        f"data.name={config.name}")
    if config.get("oversample_from", 0):
        raise DataError(f"data.oversample_from needs shapes scenes; set it to 0 for "
                        f"data.name={config.name}")
    if config.global_batch % process_count:
        raise DataError(f"global batch {config.global_batch} does not split over "
                        f"{process_count} processes")
    dropout = float(config.get("caption_dropout", 0.0))
    if not 0.0 <= dropout <= 1.0:
        raise DataError(f"data.caption_dropout must be in [0, 1], got {dropout}")
    buffer = int(config.get("shuffle_buffer", 1000))
    if buffer < 0:
        raise DataError(f"data.shuffle_buffer must be at least 0, got {buffer}")
    return ExampleBatches(sources[config.name](config.path, process_index, process_count),
                          seed=config.seed, image_size=config.image_size,
                          context_length=config.context_length,
                          local_batch=config.global_batch // process_count,
                          shuffle_buffer=buffer, caption_dropout=dropout,
                          random_crop=bool(config.get("random_crop", True)),
                          num_threads=int(config.get("num_threads", 2)))


def make_iterator(dataset, num_threads: int = 2, prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable iterator that prepares batches in background threads (for image-text
    data the decoding threads belong to the dataset; one more thread runs ahead here)."""
    if isinstance(dataset, grain.MapDataset):
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        return iter(dataset.to_iter_dataset(options))
    iterator = iter(grain.experimental.ThreadPrefetchIterDataset(dataset,
                                                                 prefetch_buffer_size=prefetch))
    # Stop the read-ahead thread before the interpreter tears modules down; grain's own
    # clean-up at that point prints an ignored-exception traceback.
    atexit.register(_close, weakref.ref(iterator))
    return iterator


def _close(ref):
    iterator = ref()
    if iterator is not None:
        iterator.close()
        # grain's prefetching iterator closes itself again in __del__ during teardown, when
        # its module globals are gone; once closed, there is nothing left to do.
        iterator.close = lambda: None


def data_metrics(iterator) -> dict[str, int]:
    """Counters of the data consumed so far, for the training log: `data/examples` and
    `data/skipped` in all, and `data/skipped_<reason>` for each reason met (see
    SKIP_REASONS). Empty for shapes, which has nothing to skip."""
    counts = iterator.get_state().get("counts") or {}
    return {f"data/{k}" if k in ("examples", "skipped") else f"data/skipped_{k}": int(v)
            for k, v in counts.items()}


# --------------------------------------------------------------------------------------------
# Image-text records -> examples.

SKIP_REASONS = ("image_missing", "image_empty", "image_too_large", "image_unreadable",
                "caption_missing", "caption_empty", "caption_binary", "caption_not_utf8",
                "shard_damaged")
# Longer captions are cut before tokenizing (the context holds far fewer tokens anyway), so a
# stray megabyte of text costs nothing.
MAX_CAPTION_CHARS = 1000
# Skips reported one by one in the log before only the counters go on.
_LOGGED_SKIPS = 20
_log = logging.getLogger(__name__)


def caption_of(record: files.Record) -> tuple[str | None, str | None]:
    """(caption, None), or (None, skip reason). The caption is `key.txt`, else the "caption"
    field of `key.json` (img2dataset writes both); whitespace runs become one space."""
    data = record.members.get("txt")
    if data is None and record.members.get("json"):
        try:
            text = json.loads(record.members["json"]).get("caption")
        except (ValueError, AttributeError, RecursionError):  # not JSON, not an object
            text = None
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else None
    if data is None:
        return None, "caption_missing"
    if b"\0" in data:
        return None, "caption_binary"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
        return None, "caption_binary"
    text = " ".join(text[:MAX_CAPTION_CHARS].split())
    return (text, None) if text else (None, "caption_empty")


def image_reason(error: images_lib.ImageError) -> str:
    if isinstance(error, images_lib.EmptyImageError):
        return "image_empty"
    if isinstance(error, images_lib.ImageTooLargeError):
        return "image_too_large"
    return "image_unreadable"


def example_of(record: files.Record, size: int, offset: float = 0.5):
    """(uint8 [size, size, 3], caption, None), or (None, None, (reason, detail))."""
    caption, reason = caption_of(record)
    if reason is not None:
        return None, None, (reason, record.key)
    ext = next((e for e in record.members if e in files.IMAGE_EXTENSIONS), None)
    if ext is None:
        return None, None, ("image_missing", record.key)
    data = record.members[ext]
    if data is None:
        return None, None, ("image_too_large", f"{record.key}.{ext} is over "
                                               f"{files.MAX_MEMBER_BYTES} bytes")
    try:
        return images_lib.decode_image(data, size, offset, f"{record.key}.{ext}"), caption, None
    except images_lib.ImageError as e:
        return None, None, (image_reason(e), str(e))
    except Exception as e:  # noqa: BLE001 - no file, however broken, may stop a long run
        return None, None, ("image_unreadable", f"{record.key}.{ext}: {type(e).__name__}: {e}")


def _mix(*words: int) -> int:
    """A 64-bit hash of small integers (splitmix64 rounds): a cheap, stateless random draw."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (w & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def _uniform(*words: int) -> float:
    return (_mix(*words) >> 11) * 2.0 ** -53


class RecordStream:
    """One host's endless stream of records: units (files or shards) in a fresh permutation
    every epoch, records through a shuffle buffer of `buffer_size` (0 or 1: none).

    The state is small and JSON-able: the epoch, the unit and record reached in it, the count
    emitted, and the buffered records by reference (re-read on restore).
    """

    def __init__(self, source, seed: int, buffer_size: int, counts: dict):
        self.source, self.seed, self.counts = source, seed, counts
        self.capacity = max(1, buffer_size)
        self.restore({"epoch": 0, "unit": 0, "member": 0, "emitted": 0, "buffer": "[]",
                      "epoch_records": 0, "last_epoch_records": 0,
                      "units": len(source.units)})

    def state(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "member": self.member,
                "emitted": self.emitted,
                # One string, not a list of lists: grain deep-copies the state after every
                # batch, and a copy of a thousand small lists costs ten times the encoding.
                "buffer": json.dumps([r.ref for r in self.buffer], separators=(",", ":")),
                "epoch_records": self.epoch_records,
                "last_epoch_records": self.last_epoch_records, "units": len(self.source.units)}

    def restore(self, state: dict):
        if state["units"] != len(self.source.units):
            raise DataError(f"{self.source.root} held {state['units']} files or shards for this "
                            f"process when saved, {len(self.source.units)} now")
        self.epoch, self.unit, self.member = state["epoch"], state["unit"], state["member"]
        self.emitted, self.epoch_records = state["emitted"], state["epoch_records"]
        self.last_epoch_records = state["last_epoch_records"]
        self.order = np.random.default_rng([self.seed, 0, self.epoch]).permutation(
            len(self.source.units))
        if getattr(self, "reader", None) is not None:
            self.reader.close()  # the open shard, at the old position
        self.reader = None
        self.buffer = []
        for ref in json.loads(state["buffer"]):
            try:
                self.buffer.append(self.source.fetch(ref))
            except DataError as e:  # the shard went away since: lose the record, say so
                self.skip("shard_damaged", str(e))

    def next(self) -> tuple[int, files.Record]:
        """(position in the stream, record)."""
        while len(self.buffer) < self.capacity:
            self.buffer.append(self._pull())
        j = _mix(self.seed, 1, self.emitted) % len(self.buffer)
        record = self.buffer[j]
        self.buffer[j] = self.buffer[-1]
        self.buffer.pop()
        self.emitted += 1
        return self.emitted - 1, record

    def _pull(self) -> files.Record:
        while True:
            if self.reader is None:
                if self.unit == len(self.order):
                    self._next_epoch()
                self.reader = self.source.read(int(self.order[self.unit]), self.member)
            try:
                record = next(self.reader)
            except StopIteration:
                record = None
            except DataError as e:  # a damaged shard: keep what it gave, go on to the next
                self.skip("shard_damaged", str(e))
                record = None
            if record is None:
                self.reader, self.unit, self.member = None, self.unit + 1, 0
                continue
            self.member += 1
            self.epoch_records += 1
            return record

    def _next_epoch(self):
        if self.epoch_records == 0:
            raise DataError(f"no readable records in {self.source.root} for this process "
                            f"({self.summary()})")
        self.last_epoch_records, self.epoch_records = self.epoch_records, 0
        self.epoch, self.unit, self.member = self.epoch + 1, 0, 0
        self.order = np.random.default_rng([self.seed, 0, self.epoch]).permutation(
            len(self.source.units))

    def skip(self, reason: str, detail: str):
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.counts["skipped"] += 1
        if self.counts["skipped"] <= _LOGGED_SKIPS:
            _log.warning("skipped (%s): %s%s", reason, detail,
                         "; further skips are only counted"
                         if self.counts["skipped"] == _LOGGED_SKIPS else "")

    def summary(self) -> str:
        skipped = {k: v for k, v in self.counts.items() if k not in ("examples", "skipped")}
        return (f"{self.counts['skipped']} skipped: "
                + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))) if skipped else \
            "nothing read"


class ExampleBatches(grain.IterDataset):
    """Per-host batches of decoded, cropped image-text examples from a folder or shard source
    (`files.FolderSource`, `shards.ShardSource`), in the form `ShapesBatches` gives."""

    def __init__(self, source, *, seed: int, image_size: int, context_length: int,
                 local_batch: int, shuffle_buffer: int = 1000, caption_dropout: float = 0.0,
                 random_crop: bool = True, num_threads: int = 2):
        super().__init__()
        self.source = source
        self.options = dict(seed=seed, image_size=image_size, context_length=context_length,
                            local_batch=local_batch, shuffle_buffer=shuffle_buffer,
                            caption_dropout=caption_dropout, random_crop=random_crop,
                            num_threads=num_threads)

    def __iter__(self):
        return ExampleBatchIterator(self.source, **self.options)


class ExampleBatchIterator(grain.DatasetIterator):
    """Draws records in stream order and decodes them in a thread pool, a batch's worth at a
    time, drawing again only for the ones skipped; so the batches depend on the seed and the
    data alone, never on thread timing. A stream that yields nothing usable for two epochs
    (plus a buffer) raises DataError instead of spinning."""

    def __init__(self, source, *, seed, image_size, context_length, local_batch,
                 shuffle_buffer, caption_dropout, random_crop, num_threads):
        super().__init__()
        self.seed, self.size, self.context_length = seed, image_size, context_length
        self.local_batch, self.caption_dropout = local_batch, caption_dropout
        self.random_crop = random_crop
        self.counts = {"examples": 0, "skipped": 0}
        self.consecutive_skips = 0
        self.stream = RecordStream(source, seed, shuffle_buffer, self.counts)
        self.tokenizer = Tokenizer()
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads),
                                                          thread_name_prefix="dalle_jax-decode")
        atexit.register(_close, weakref.ref(self))

    def _prepare(self, drawn):
        position, record = drawn
        offset = _uniform(self.seed, 2, position) if self.random_crop else 0.5
        image, caption, skip = example_of(record, self.size, offset)
        if skip is None and _uniform(self.seed, 3, position) < self.caption_dropout:
            caption = ""
        return image, caption, skip

    def __next__(self) -> dict[str, np.ndarray]:
        pictures, captions = [], []
        while len(pictures) < self.local_batch:
            # Submitted as drawn, so that decoding overlaps the reading of later records.
            futures = [self.pool.submit(self._prepare, self.stream.next())
                       for _ in range(self.local_batch - len(pictures))]
            for future in futures:
                image, caption, skip = future.result()
                if skip is None:
                    pictures.append(image)
                    captions.append(caption)
                    self.consecutive_skips = 0
                    continue
                self.stream.skip(*skip)
                self.consecutive_skips += 1
                limit = self.stream.capacity + 2 * self.stream.last_epoch_records
                if self.stream.last_epoch_records and self.consecutive_skips > limit:
                    raise DataError(f"no usable example in {self.stream.source.root} "
                                    f"({self.stream.summary()})")
        self.counts["examples"] += len(pictures)
        return {"image": to_float_images(np.stack(pictures)),
                "tokens": self.tokenizer(captions, context_length=self.context_length)}

    def close(self):
        if self._closed:  # also called from __del__, perhaps at interpreter exit
            return
        if self.stream.reader is not None:
            self.stream.reader.close()
            self.stream.reader = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().close()

    def get_state(self) -> dict:
        return {**self.stream.state(), "counts": dict(self.counts),
                "consecutive_skips": self.consecutive_skips}

    def set_state(self, state: dict):
        self.counts.clear()
        self.counts.update(state["counts"])
        self.consecutive_skips = state["consecutive_skips"]
        self.stream.restore(state)


def eval_examples(data_config, count: int):
    """A fixed evaluation set: (uint8 images [N, H, W, 3], captions), at most `count`.

    Shapes: the first `count` examples of the eval split. Image-text data: the first `count`
    usable records of `data.eval_path` (a folder or shards, like `data.path`) in file order,
    centre-cropped; unusable records are passed over."""
    if data_config.name == "shapes":
        return _shapes_examples("eval", data_config.seed, data_config.image_size, 0, count)
    path = data_config.get("eval_path")
    if not path:
        raise DataError(f"evaluation on data.name={data_config.name} needs data.eval_path "
                        "(held-out pictures with captions, a folder or shards)")
    return _file_examples(data_config.name, path, data_config.image_size, count)


def reference_examples(data_config, count: int):
    """Training pictures for statistics (the CLIP image vectors' mean and spread): a fixed
    stretch of the shapes train stream far past what early steps read, or the first `count`
    usable records of `data.path`."""
    if data_config.name == "shapes":
        return _shapes_examples("train", data_config.seed, data_config.image_size, 10 ** 9,
                                count)
    return _file_examples(data_config.name, data_config.path, data_config.image_size, count)


@functools.lru_cache(maxsize=8)
def _shapes_examples(split: str, seed: int, image_size: int, start: int, count: int):
    return shapes.examples(range(start, start + count), split=split, seed=seed, size=image_size)


def read_examples(path: str, image_size: int, count: int):
    """The first `count` usable captioned pictures at `path`, centre-cropped: tar shards when
    `path` is a .tar file, a pattern, or a folder holding .tar files; else a folder of
    pictures with captions beside them. (uint8 [N, size, size, 3], captions)."""
    is_shards = (not os.path.isdir(path)
                 or glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
    return _file_examples("shards" if is_shards else "folder", path, image_size, count)


@functools.lru_cache(maxsize=8)
def _file_examples(name: str, path: str, image_size: int, count: int):
    sources = {"folder": files.FolderSource, "shards": shards.ShardSource}
    if name not in sources:
        raise ValueError(f"unknown dataset {name!r}; valid: shapes, {', '.join(sources)}")
    source = sources[name](path)
    images, captions = [], []
    for unit in range(len(source.units)):
        try:
            for record in source.read(unit):
                image, caption, _ = example_of(record, image_size)
                if image is not None:
                    images.append(image)
                    captions.append(caption)
                if len(images) == count:
                    return np.stack(images), captions
        except shards.DamagedShardError:
            continue  # what it held before the damage was read
    if not images:
        raise DataError(f"no usable captioned pictures in {path}")
    return np.stack(images), captions
