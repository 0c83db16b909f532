"""A folder of captioned images: `x.jpg` with its caption in `x.txt` beside it, at any depth.

The reader turns each image file into a `Record` (the form the tar-shard reader yields too):
its members by extension, e.g. {"jpg": bytes, "txt": bytes}, a caption file that is missing
simply absent. Nothing is decoded or judged here; `dalle_jax.data.pipeline` does that, so
that a bad file is counted once, in one place, whichever reader it came from.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

# Extensions read as images (lower-cased); anything else in the folder is ignored.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# A member larger than this is not read at all (counted as too large): a training image is
# rarely over a few MB, and reading a stray multi-GB file would stall the loader.
MAX_MEMBER_BYTES = 64 * 1024 * 1024


class DataError(ValueError):
    """A dataset that cannot be read at all. Its message is one line, for the user."""


class Record(NamedTuple):
    """One example as stored: `members` maps an extension to its bytes (None: too large to
    read); `ref` locates it again (JSON-able), so a shuffle buffer can be checkpointed."""
    key: str
    members: dict
    ref: list


def list_images(root: str) -> list[str]:
    """Every image file under `root` (recursive, hidden names skipped), sorted, relative."""
    if not os.path.isdir(root):
        raise DataError(f"no such folder: {root}")
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            stem, dot, ext = name.rpartition(".")
            path = os.path.join(directory, name)
            # Regular files only: reading a stray pipe or socket would block the loader.
            if (dot and stem and not name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS
                    and os.path.isfile(path)):
                found.append(os.path.relpath(path, root))
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return sorted(found)


def _read(path: str) -> bytes | None:
    if os.path.getsize(path) > MAX_MEMBER_BYTES:
        return None
    with open(path, "rb") as f:
        return f.read()


class FolderSource:
    """The image files of one host: `files[process_index::process_count]` of the sorted list.

    A unit (the thing an epoch shuffles) is one file holding one record.
    """

    def __init__(self, root: str, process_index: int = 0, process_count: int = 1):
        self.root = root
        every = list_images(root)
        if len(every) < process_count:
            raise DataError(f"{len(every)} images under {root} cannot feed {process_count} "
                            "processes; each needs at least one")
        self.units = every[process_index::process_count]

    def read(self, unit: int, start: int = 0) -> Iterator[Record]:
        """The records of unit `unit` from the `start`-th on (a file has just one)."""
        if start == 0:
            yield self.fetch([unit])

    def fetch(self, ref: list) -> Record:
        relative = self.units[ref[0]]
        path = os.path.join(self.root, relative)
        stem, _, ext = relative.rpartition(".")
        members = {}
        try:
            members[ext.lower()] = _read(path)
        except OSError:
            members[ext.lower()] = b""  # vanished or unreadable: counted as an empty image
        caption = os.path.join(self.root, stem + ".txt")
        try:
            members["txt"] = _read(caption)
        except OSError:
            pass  # no caption file: counted as such
        return Record(stem, members, list(ref))
