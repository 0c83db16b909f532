"""Bad data: a generated corpus of every kind of broken or awkward file, as a folder and as
shards. Usable files are converted (CMYK, 16-bit, palette, grey, RGBA, EXIF-rotated); the rest
are skipped and counted by reason; nothing crashes the loader or stalls it."""

import io
import os
import struct
import tarfile
import threading
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dalle_jax import images as images_lib
from dalle_jax.data import files, pipeline, shards

SIZE = 16
RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def exif_rotated() -> bytes:
    """Stored 40x20, red left and blue right, with EXIF orientation 6 (display rotated 90
    degrees clockwise): shown 20x40, red on top."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20], stored[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())


def bomb() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels (900 MP) and whose data is tiny."""
    png = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">II", 30000, 30000) + png[24:29]
    chunk = b"IHDR" + ihdr
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def corpus() -> dict[str, tuple[str, bytes | None, bytes | None, str | None]]:
    """name -> (image extension, image bytes, caption bytes or None for no caption file,
    the expected skip reason or None if usable)."""
    good = encode(Image.new("RGB", (20, 16), (10, 200, 30)), "JPEG", quality=95)
    text = "a usable picture".encode()
    return {
        "good": ("jpg", good, text, None),
        "cmyk": ("jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), text, None),
        "deep": ("png", encode(Image.new("I;16", (16, 16), 65535), "PNG"), text, None),
        "palette": ("png", encode(Image.new("P", (16, 16), 3), "PNG"), text, None),
        "grey": ("png", encode(Image.new("L", (16, 16), 128), "PNG"), text, None),
        "rgba": ("png", encode(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "PNG"), text, None),
        "exif": ("jpg", exif_rotated(), text, None),
        "bom": ("jpg", good, "\ufeffa caption with a byte order mark".encode(), None),
        "gif": ("gif", encode(Image.new("P", (16, 16), 1), "GIF"), text, None),
        "zero": ("jpg", b"", text, "image_empty"),
        "truncated": ("jpg", encode(Image.new("RGB", (64, 64), RED), "JPEG")[:300], text,
                      "image_unreadable"),
        "notimage": ("jpg", b"<html>404 not found</html>", text, "image_unreadable"),
        "bomb": ("png", bomb(), text, "image_too_large"),
        "nocaption": ("jpg", good, None, "caption_missing"),
        "emptycaption": ("jpg", good, b"  \n\t ", "caption_empty"),
        "binarycaption": ("jpg", good, bytes(range(0, 64)), "caption_binary"),
        "latin1caption": ("jpg", good, "caf\u00e9 au lait".encode("latin-1"),
                          "caption_not_utf8"),
    }


def write_folder(root: str):
    os.makedirs(root, exist_ok=True)
    for name, (ext, image, caption, _) in corpus().items():
        with open(os.path.join(root, f"{name}.{ext}"), "wb") as f:
            f.write(image)
        if caption is not None:
            with open(os.path.join(root, f"{name}.txt"), "wb") as f:
                f.write(caption)


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: str):
    """The corpus in one shard, plus: a record with no image, one captioned only in its json,
    a shard cut off mid-member, and a file that is no tar at all."""
    os.makedirs(root, exist_ok=True)
    good = corpus()["good"][1]
    with tarfile.open(os.path.join(root, "00000.tar"), "w") as tar:
        for name, (ext, image, caption, _) in corpus().items():
            add(tar, f"{name}.{ext}", image)
            if caption is not None:
                add(tar, f"{name}.txt", caption)
        add(tar, "noimage.txt", b"a caption alone")
        add(tar, "jsononly.jpg", good)
        add(tar, "jsononly.json", b'{"caption": "captioned in json", "status": "success"}')
    with tarfile.open(os.path.join(root, "00001.tar"), "w") as tar:
        for i in range(4):
            add(tar, f"cut{i}.jpg", good)
            add(tar, f"cut{i}.txt", b"before the cut")
    whole = open(os.path.join(root, "00001.tar"), "rb").read()
    with open(os.path.join(root, "00001.tar"), "wb") as f:
        f.write(whole[:512 * 11 + 100])  # two whole records (5 blocks each), a third cut short
    with open(os.path.join(root, "00002.tar"), "wb") as f:
        f.write(os.urandom(3000))


EXPECTED_FOLDER = {name: want for name, (_, _, _, want) in corpus().items()}
EXPECTED_SHARDS = {**EXPECTED_FOLDER, "noimage": "image_missing", "jsononly": None,
                   "cut0": None, "cut1": None}


def data_config(name, path, **overrides):
    c = dict(name=name, path=str(path), split="train", seed=0, image_size=SIZE,
             context_length=16, global_batch=8, num_threads=2, hard_negatives=0,
             shuffle_buffer=4, caption_dropout=0.0, random_crop=False)
    c.update(overrides)
    return ml_collections.ConfigDict(c)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_folder(str(root / "folder"))
    write_shards(str(root / "shards"))
    return root


def verdicts_of(source):
    """Skip reason (or None) and picture of every record of the first epoch, unshuffled."""
    stream = pipeline.RecordStream(source, seed=0, buffer_size=0,
                                   counts={"examples": 0, "skipped": 0})
    verdicts, pictures = {}, {}
    while True:
        _, record = stream.next()
        if record.key in verdicts:  # the second epoch began: all units were read to the end
            break
        image, caption, skip = pipeline.example_of(record, SIZE)
        verdicts[record.key] = None if skip is None else skip[0]
        if image is not None:
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
            assert caption and "\ufeff" not in caption
            pictures[record.key] = image
    return verdicts, pictures, stream.counts


def test_folder_verdicts(bad):
    verdicts, pictures, _ = verdicts_of(files.FolderSource(str(bad / "folder")))
    assert verdicts == EXPECTED_FOLDER
    check_conversions(pictures)


def test_shard_verdicts(bad):
    verdicts, pictures, counts = verdicts_of(shards.ShardSource(str(bad / "shards")))
    assert verdicts == EXPECTED_SHARDS
    assert counts["shard_damaged"] == 2  # the cut one and the random bytes
    check_conversions(pictures)


def check_conversions(pictures):
    np.testing.assert_allclose(pictures["cmyk"][8, 8], RED, atol=3)  # CMYK (0, 255, 255, 0)
    assert (pictures["deep"] == 255).all()  # 16-bit white stays white
    assert (pictures["rgba"] == 255).all()  # transparent over white
    assert (pictures["grey"] == 128).all()
    top, bottom = pictures["exif"][1, 8], pictures["exif"][-2, 8]
    np.testing.assert_allclose(top, RED, atol=40)  # rotated as the camera said
    np.testing.assert_allclose(bottom, BLUE, atol=40)


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_loader_skips_and_counts_without_stopping(bad, kind):
    usable = sum(v is None for v in (EXPECTED_FOLDER if kind == "folder"
                                     else EXPECTED_SHARDS).values())
    it = pipeline.make_iterator(pipeline.make_dataset(
        data_config(kind, bad / kind, global_batch=usable, shuffle_buffer=0)))
    for _ in range(3):  # three epochs' worth of usable examples
        batch = next(it)
        assert np.isfinite(batch["image"]).all() and batch["image"].shape[0] == usable
    counts = pipeline.data_metrics(it)
    it.close()
    expected = EXPECTED_FOLDER if kind == "folder" else EXPECTED_SHARDS
    reasons = {r for r in expected.values() if r}
    assert counts["data/examples"] == 3 * usable
    for reason in reasons:  # at least two epochs passed, at most three
        per_epoch = sum(v == reason for v in expected.values())
        assert 2 * per_epoch <= counts[f"data/skipped_{reason}"] <= 3 * per_epoch, reason
    if kind == "shards":
        assert 4 <= counts["data/skipped_shard_damaged"] <= 6
    assert counts["data/skipped"] == sum(v for k, v in counts.items()
                                         if k.startswith("data/skipped_"))


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_nothing_usable_is_an_error_not_a_hang(tmp_path, kind):
    if kind == "folder":
        for i in range(5):
            (tmp_path / f"x{i}.jpg").write_bytes(b"not a picture")
            (tmp_path / f"x{i}.txt").write_text("a caption")
    else:
        (tmp_path / "00000.tar").write_bytes(b"\0" * 100)
    result = {}

    def consume():
        try:
            next(pipeline.make_iterator(pipeline.make_dataset(data_config(kind, tmp_path))))
        except files.DataError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the loader spins on data with nothing usable"
    message = result["error"]
    assert "\n" not in message
    assert ("no usable example" in message and "image_unreadable" in message
            if kind == "folder" else "no readable records" in message)


def test_oversized_member_is_not_read(bad, monkeypatch):
    monkeypatch.setattr(files, "MAX_MEMBER_BYTES", 100)
    for source in (files.FolderSource(str(bad / "folder")),
                   shards.ShardSource(str(bad / "shards"))):
        record = next(r for u in range(len(source.units)) for r in source.read(u)
                      if r.key.endswith("good"))
        assert record.members["jpg"] is None
        assert pipeline.example_of(record, SIZE)[2][0] == "image_too_large"


def test_user_image_errors_stay_one_line(bad):
    for name in ("zero.jpg", "truncated.jpg", "notimage.jpg", "bomb.png"):
        with pytest.raises(images_lib.ImageError) as e:
            images_lib.load_image(str(bad / "folder" / name), 8)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_writer_leaves_bad_pairs_out(bad, tmp_path):
    paths, written, skipped = shards.write_from_folder(str(bad / "folder"), str(tmp_path), 100)
    expected = {}
    for reason in EXPECTED_FOLDER.values():
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert written == sum(v is None for v in EXPECTED_FOLDER.values())
    assert skipped == expected and len(paths) == 1
