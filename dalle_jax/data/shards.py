"""WebDataset-style tar shards, as img2dataset writes them: reader, and a command to write them.

A shard is a plain (uncompressed) tar whose consecutive members share a key and differ in
extension: `000000012.jpg`, `000000012.txt`, `000000012.json`, then the next key. The key is
the member path up to the first dot of its base name, the extension everything after it (the
WebDataset convention). The reader streams a shard front to back, reading headers and the
members of one example at a time, and yields `files.Record`s; a damaged shard yields what it
can and then raises `DamagedShardError`, which the input pipeline counts and moves past.

    python -m dalle_jax.data.shards write SRC_FOLDER OUT_DIR --per-shard 1000 [--resize 256]
    python -m dalle_jax.data.shards write --from-shapes 5000 OUT_DIR --per-shard 1000

writes `OUT_DIR/00000.tar`, `00001.tar`, ... from a folder of `x.jpg` + `x.txt` pairs (images
copied byte for byte unless `--resize` re-encodes them), or from the captioned-shapes dataset.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
import tarfile
from typing import Iterable, Iterator

from dalle_jax.data import files
from dalle_jax.data.files import DataError, Record

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class DamagedShardError(DataError):
    """A shard that ends early or holds a corrupt header; the records before it were read."""


def split_name(name: str) -> tuple[str, str]:
    """Member path -> (key, extension): `a/b/0001.seg.jpg` -> (`a/b/0001`, `seg.jpg`)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def expand_braces(pattern: str) -> list[str]:
    """`shards/{00000..00009}.tar` -> ten names (WebDataset's brace ranges, zero padding kept)."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [name for i in range(int(lo), int(hi) + 1)
            for name in expand_braces(f"{head}{i:0{width}d}{tail}")]


def list_shards(path: str) -> list[str]:
    """The shards `path` names: a folder (every .tar below it), one file, or a glob/brace
    pattern; sorted, so that every host lists them in the same order."""
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "**", "*.tar"), recursive=True)
    elif os.path.isfile(path):
        found = [path]
    else:
        found = [f for p in expand_braces(path) for f in glob.glob(p) if os.path.isfile(f)]
    if not found:
        raise DataError(f"no .tar shards match {path}")
    return sorted(set(found))


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        info = tar.next()
        if info is None:
            return
        if info.isfile():
            yield info


def _next_group(members, pending):
    """The consecutive members sharing `pending`'s key, and the first member after them."""
    group = [pending] if pending is not None else []
    for info in members:
        if group and split_name(info.name)[0] != split_name(group[0].name)[0]:
            return group, info
        group.append(info)
    return group, None


def read_shard(path: str, unit: int = 0, start: int = 0) -> Iterator[Record]:
    """The records of one shard, from the `start`-th on; `unit` goes into each record's ref.
    Raises DamagedShardError (after the good records) if the shard is damaged."""
    errors = (tarfile.TarError, OSError, EOFError)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DamagedShardError(f"cannot open shard {path}: {e.strerror or e}") from e
    with f:
        try:
            members = _members(tarfile.open(fileobj=f, mode="r:"))
        except errors as e:
            raise DamagedShardError(f"damaged shard {path}: {str(e).splitlines()[0][:200]}") from e
        pending, index = None, 0
        while True:
            # The yield stays outside the try: a generator closed while suspended must not
            # evaluate the except clause (at interpreter exit its names may be gone).
            try:
                group, pending = _next_group(members, pending)
                record = _record(f, unit, group) if group and index >= start else None
            except errors as e:
                raise DamagedShardError(
                    f"damaged shard {path}: {str(e).splitlines()[0][:200]}") from e
            if not group:
                return
            index += 1
            if record is not None:
                yield record


def _record(f, unit: int, group: list[tarfile.TarInfo]) -> Record:
    key = split_name(group[0].name)[0]
    ref = [unit, key, [[split_name(i.name)[1], i.offset_data, i.size] for i in group]]
    return fetch(f, ref)


def fetch(f, ref: list) -> Record:
    """The record `ref` locates, read from the open shard file `f`."""
    members = {}
    for ext, offset, size in ref[2]:
        if size > files.MAX_MEMBER_BYTES:
            members[ext] = None
            continue
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"member {ref[1]}.{ext} is cut short")
        members[ext] = data
    return Record(ref[1], members, ref)


class ShardSource:
    """The shards of one host: `shards[process_index::process_count]` of the sorted list.

    A unit (the thing an epoch shuffles) is one shard.
    """

    def __init__(self, path: str, process_index: int = 0, process_count: int = 1):
        every = list_shards(path)
        if len(every) < process_count:
            raise DataError(f"{len(every)} shards in {path} cannot feed {process_count} "
                            "processes; each needs at least one")
        self.root = path
        self.units = every[process_index::process_count]

    def read(self, unit: int, start: int = 0) -> Iterator[Record]:
        return read_shard(self.units[unit], unit, start)

    def fetch(self, ref: list) -> Record:
        path = self.units[ref[0]]
        try:
            with open(path, "rb") as f:
                return fetch(f, ref)
        except OSError as e:
            raise DamagedShardError(f"cannot re-read {ref[1]} from {path}: {e}") from e


# --------------------------------------------------------------------------------------------
# Writing.


class ShardWriter:
    """Writes examples `per_shard` to a shard; each shard appears whole (written under a
    temporary name, then renamed) and byte-for-byte reproducible (fixed member metadata)."""

    def __init__(self, out_dir: str, per_shard: int):
        if per_shard < 1:
            raise DataError(f"--per-shard must be at least 1, got {per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.per_shard = out_dir, per_shard
        self.width = max(4, len(str(per_shard - 1)))
        self.shard, self.count, self.paths = 0, 0, []
        self._tar = self._file = None

    def add(self, image: bytes, ext: str, caption: str, meta: dict | None = None) -> str:
        if self._tar is None:
            self._open()
        key = f"{self.shard:05d}{self.count:0{self.width}d}"
        body = {"key": key, "caption": caption, "status": "success", **(meta or {})}
        for member_ext, data in ((ext, image), ("txt", caption.encode("utf-8")),
                                 ("json", json.dumps(body, ensure_ascii=False).encode("utf-8"))):
            info = tarfile.TarInfo(f"{key}.{member_ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count == self.per_shard:
            self._close()
        return key

    def _open(self):
        final = os.path.join(self.out_dir, f"{self.shard:05d}.tar")
        self._file = final + ".tmp"
        self._tar = tarfile.open(self._file, "w", format=tarfile.USTAR_FORMAT)

    def _close(self):
        self._tar.close()
        final = self._file[:-len(".tmp")]
        os.replace(self._file, final)
        self.paths.append(final)
        self._tar, self._file = None, None
        self.shard, self.count = self.shard + 1, 0

    def close(self) -> list[str]:
        if self._tar is not None:
            self._close()
        return self.paths


def _reencode(image: bytes, size: int) -> tuple[bytes, int, int]:
    """Shorter side to `size` (never enlarged), as a quality-95 JPEG."""
    from PIL import Image
    from dalle_jax import images
    im = images.open_rgb(io.BytesIO(image), draft=size)
    scale = size / min(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=95)
    return out.getvalue(), im.width, im.height


def write_from_folder(src: str, out_dir: str, per_shard: int, resize: int = 0):
    """Shards from a folder of captioned images; returns (shard paths, written, skipped by
    reason). Pairs the input pipeline would skip are left out and counted here already."""
    from dalle_jax import images
    from dalle_jax.data import pipeline
    source = files.FolderSource(src)
    writer = ShardWriter(out_dir, per_shard)
    written, skipped = 0, {}
    for unit, relative in enumerate(source.units):
        record = source.fetch([unit])
        caption, reason = pipeline.caption_of(record)
        ext = relative.rpartition(".")[2].lower()
        data = record.members.get(ext)
        meta = {"source": relative}
        if reason is None:
            try:
                if data is None:
                    raise images.ImageTooLargeError(f"{relative} is too large")
                if not data:
                    raise images.EmptyImageError(f"{relative} is empty")
                if resize:
                    data, meta["width"], meta["height"] = _reencode(data, resize)
                    ext = "jpg"
                else:
                    im = images.open_rgb(io.BytesIO(data), relative)
                    meta["width"], meta["height"] = im.size
            except images.ImageError as e:
                reason = pipeline.image_reason(e)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        writer.add(data, ext, caption, meta)
        written += 1
    return writer.close(), written, skipped


def write_from_shapes(count: int, out_dir: str, per_shard: int, size: int = 64,
                      split: str = "train", seed: int = 0) -> list[str]:
    """`count` captioned-shapes examples as JPEG shards (for tests and smoke runs)."""
    from PIL import Image
    from dalle_jax.data import shapes
    writer = ShardWriter(out_dir, per_shard)
    for index in range(count):
        picture, caption = shapes.example(index, split=split, seed=seed, size=size)
        out = io.BytesIO()
        Image.fromarray(picture).save(out, format="JPEG", quality=95)
        writer.add(out.getvalue(), "jpg", caption,
                   {"shapes_index": index, "split": split, "width": size, "height": size})
    return writer.close()


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_jax.data.shards",
                                     description="Write WebDataset-style tar shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="SRC_FOLDER OUT_DIR, or --from-shapes N OUT_DIR")
    w.add_argument("paths", nargs="+", metavar="SRC_FOLDER OUT_DIR")
    w.add_argument("--per-shard", type=int, default=1000)
    w.add_argument("--resize", type=int, default=0,
                   help="re-encode as JPEG with the shorter side at most this (0: copy bytes)")
    w.add_argument("--from-shapes", type=int, default=0, metavar="N",
                   help="write N captioned-shapes examples instead of a folder")
    w.add_argument("--image-size", type=int, default=64, help="shapes picture size")
    w.add_argument("--split", default="train", help="shapes split")
    w.add_argument("--seed", type=int, default=0, help="shapes seed")
    args = parser.parse_args(argv)
    want = 1 if args.from_shapes else 2
    if len(args.paths) != want:
        parser.error("give OUT_DIR with --from-shapes, else SRC_FOLDER OUT_DIR")
    try:
        if args.from_shapes:
            paths = write_from_shapes(args.from_shapes, args.paths[0], args.per_shard,
                                      args.image_size, args.split, args.seed)
            written, skipped = args.from_shapes, {}
        else:
            paths, written, skipped = write_from_folder(*args.paths, args.per_shard,
                                                        args.resize)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    note = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    print(f"wrote {written} examples in {len(paths)} shards to {args.paths[-1]}"
          + (f"; skipped {sum(skipped.values())} ({note})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
