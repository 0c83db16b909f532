"""Image-text datasets: a folder of captioned images and WebDataset-style tar shards.

Both readers feed the same pipeline, so most checks run on both: the batch has the shapes
source's form, it is a pure function of the seed, a restored iterator goes on with exactly the
batches an uninterrupted one gives (through the real Orbax checkpointer), hosts read disjoint
files, captions drop out at the asked rate, and the shard writer round-trips a folder.
"""

import io
import json
import os
import tarfile
import unicodedata

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import images as images_lib
from dalle_jax.data import files, pipeline, shapes, shards
from dalle_jax.tokenizer import Tokenizer

SIZE = 16


def make_folder(root, count=24, nested=True):
    """`count` captioned images with distinct colours and captions, some in sub-folders."""
    captions = {}
    for i in range(count):
        sub = os.path.join(root, f"part{i % 3}") if nested else root
        os.makedirs(sub, exist_ok=True)
        colour = (i * 10 % 256, 255 - i * 7 % 256, i * 37 % 256)
        Image.new("RGB", (24 + i % 5, 20), colour).save(os.path.join(sub, f"im{i:03d}.png"))
        caption = f"picture {chr(97 + i % 26)}{chr(120 + i // 26)}"  # CLIP splits digits
        with open(os.path.join(sub, f"im{i:03d}.txt"), "w") as f:
            f.write(caption + "\n")
        captions[caption] = colour
    return captions


def data_config(name, path, **overrides):
    c = dict(name=name, path=str(path), split="train", seed=0, image_size=SIZE,
             context_length=16, global_batch=8, num_threads=2, hard_negatives=0,
             shuffle_buffer=10, caption_dropout=0.0, random_crop=False)
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def decode_captions(tokens):
    tok = Tokenizer()
    return [tok.decode([t for t in row[1:] if t not in (0, tok.eot_token)]).strip()
            for row in np.asarray(tokens)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, shard dir, {caption: colour}) with the shards written from the folder."""
    root = tmp_path_factory.mktemp("corpus")
    captions = make_folder(str(root / "folder"))
    paths, written, skipped = shards.write_from_folder(str(root / "folder"),
                                                       str(root / "shards"), per_shard=5)
    assert (len(paths), written, skipped) == (5, 24, {})
    return root / "folder", root / "shards", captions


@pytest.fixture(params=["folder", "shards"])
def source(request, corpus):
    folder, shard_dir, captions = corpus
    return request.param, folder if request.param == "folder" else shard_dir, captions


def test_folder_listing(tmp_path):
    make_folder(str(tmp_path), count=4)
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".hidden" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "._im000.png")  # macOS resource fork
    (tmp_path / "notes.txt").write_text("no image beside it")
    (tmp_path / "data.bin").write_bytes(b"\0")
    assert files.list_images(str(tmp_path)) == [
        "part0/im000.png", "part0/im003.png", "part1/im001.png", "part2/im002.png"]
    record = files.FolderSource(str(tmp_path)).fetch([1])
    assert record.key == "part0/im003" and record.members["txt"] == b"picture dx\n"
    assert set(record.members) == {"png", "txt"}


def test_writer_round_trips_a_folder(corpus):
    folder, shard_dir, captions = corpus
    names = sorted(os.listdir(shard_dir))
    assert names == [f"{i:05d}.tar" for i in range(5)]
    with tarfile.open(shard_dir / "00000.tar") as tar:
        members = tar.getnames()
        assert members[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
        meta = json.load(tar.extractfile("000000000.json"))
    assert meta["source"] == "part0/im000.png" and meta["caption"] == "picture ax"
    assert meta["width"] == 24 and meta["key"] == "000000000"
    records = [r for path in shards.list_shards(str(shard_dir)) for r in shards.read_shard(path)]
    assert len(records) == 24
    for r in records:
        original = open(folder / json.loads(r.members["json"])["source"], "rb").read()
        assert r.members["png"] == original  # copied byte for byte
    # A restart inside a shard skips exactly the records before it.
    assert [r.key for r in shards.read_shard(str(shard_dir / "00001.tar"), start=3)] == [
        "000010003", "000010004"]


def test_shard_names_globs_and_braces(corpus):
    _, shard_dir, _ = corpus
    every = shards.list_shards(str(shard_dir))
    assert shards.list_shards(str(shard_dir / "*.tar")) == every
    assert shards.list_shards(str(shard_dir / "{00001..00003}.tar")) == every[1:4]
    assert shards.expand_braces("a{8..10}b{0..1}") == ["a8b0", "a8b1", "a9b0", "a9b1",
                                                        "a10b0", "a10b1"]
    with pytest.raises(files.DataError, match="no .tar shards match"):
        shards.list_shards(str(shard_dir / "nothing-*.tar"))


def test_batches_have_the_shapes_form(source):
    name, path, captions = source
    it = iter(pipeline.make_dataset(data_config(name, path)))
    batch = next(it)
    shapes_batch = pipeline.ShapesBatches("train", 0, SIZE, 16, 8)[0]
    assert set(batch) == set(shapes_batch)
    for k in batch:
        assert batch[k].shape == shapes_batch[k].shape and batch[k].dtype == shapes_batch[k].dtype
    # Each picture is its caption's flat colour: image and caption stay paired.
    for image, caption in zip(batch["image"], decode_captions(batch["tokens"])):
        colour = pipeline.to_uint8_images(image)[SIZE // 2, SIZE // 2]
        np.testing.assert_allclose(colour, captions[caption], atol=2)
    it.close()


def test_epochs_cover_every_example_and_reshuffle(source):
    name, path, captions = source
    it = iter(pipeline.make_dataset(data_config(name, path, global_batch=24, shuffle_buffer=0)))
    first, second = (decode_captions(next(it)["tokens"]) for _ in range(2))
    assert sorted(first) == sorted(second) == sorted(captions)  # no buffer: epoch = batch
    assert first != second  # a fresh permutation each epoch
    it.close()


def test_same_seed_same_batches_other_seed_other_batches(source):
    name, path, _ = source

    def first_batches(seed):
        it = iter(pipeline.make_dataset(data_config(name, path, seed=seed, random_crop=True)))
        out = [next(it) for _ in range(3)]
        it.close()
        return out

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))


def test_restored_iterator_continues_exactly(source, tmp_path):
    """Through the real checkpointer: save after 3 batches, restore into a fresh iterator."""
    name, path, _ = source
    config = data_config(name, path, random_crop=True, caption_dropout=0.3)
    straight = pipeline.make_iterator(pipeline.make_dataset(config))
    for _ in range(3):
        next(straight)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    state = {"w": np.zeros(2, np.float32)}
    checkpointer.save(3, state, straight, {"note": "test"}, force=True)
    expected = [next(straight) for _ in range(4)]  # crosses an epoch boundary
    resumed = pipeline.make_iterator(pipeline.make_dataset(config))
    checkpointer.restore({"w": np.zeros(2, np.float32)}, resumed)
    checkpointer.close()
    for x in expected:
        y = next(resumed)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert pipeline.data_metrics(resumed) == pipeline.data_metrics(straight) == {
        "data/examples": 56, "data/skipped": 0}
    straight.close()
    resumed.close()


def test_hosts_read_disjoint_files(source):
    name, path, captions = source
    seen = []
    for host in range(2):
        it = iter(pipeline.make_dataset(data_config(name, path, global_batch=48,
                                                    shuffle_buffer=0), host, 2))
        batch = next(it)  # 24 examples per host: 2 epochs of its 12 (or 10/15) examples
        assert batch["image"].shape[0] == 24
        seen.append(set(decode_captions(batch["tokens"])))
        it.close()
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(captions)


def test_caption_dropout_rate(source):
    name, path, _ = source
    for p, low, high in ((0.0, 0, 0), (0.5, 0.35, 0.65), (1.0, 1, 1)):
        it = iter(pipeline.make_dataset(data_config(name, path, global_batch=96,
                                                    caption_dropout=p)))
        tokens = next(it)["tokens"]
        it.close()
        empty = tokens[:, 2] == 0  # [sot, eot, 0, ...]
        assert low <= empty.mean() <= high, (p, empty.mean())
        assert (tokens[empty, 1] == Tokenizer().eot_token).all()


def test_centre_and_random_crops():
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)
    wide[:, 20:] = (0, 0, 255)
    data = io.BytesIO()
    Image.fromarray(wide).save(data, format="PNG")
    record = files.Record("wide", {"png": data.getvalue(), "txt": b"wide"}, [0])
    left = pipeline.example_of(record, 10, offset=0.0)[0]
    centre = pipeline.example_of(record, 10, offset=0.5)[0]
    right = pipeline.example_of(record, 10, offset=1.0)[0]
    assert (left == (255, 0, 0)).all() and (right == (0, 0, 255)).all()
    assert (centre == 0).all()
    offsets = {round(pipeline._uniform(0, 2, i), 2) for i in range(50)}
    assert len(offsets) > 30 and min(offsets) >= 0 and max(offsets) <= 1


def test_shapes_shards_match_the_shapes_dataset(tmp_path):
    assert shards.main(["write", "--from-shapes", "12", str(tmp_path), "--per-shard", "5",
                        "--image-size", "32"]) == 0
    records = [r for p in shards.list_shards(str(tmp_path)) for r in shards.read_shard(p)]
    assert len(records) == 12
    for i, r in enumerate(records):
        picture, caption = shapes.example(i, size=32)
        assert r.members["txt"].decode() == caption
        decoded = images_lib.decode_image(r.members["jpg"], 32)
        assert np.abs(decoded.astype(int) - picture).mean() < 4  # JPEG quality 95


@pytest.mark.parametrize("overrides, message", [
    (dict(name="imagenet"), "unknown dataset 'imagenet'; valid: shapes, folder, shards"),
    (dict(path=""), "needs data.path"),
    (dict(hard_negatives=1), "hard_negatives needs shapes captions"),
    (dict(caption_dropout=1.5), "caption_dropout must be in"),
    (dict(path="/no/such/folder"), "no such folder"),
])
def test_config_errors_are_one_line(overrides, message):
    overrides = dict(overrides)
    config = data_config(overrides.pop("name", "folder"), overrides.pop("path", "/tmp"),
                         **overrides)
    with pytest.raises(ValueError, match=message) as e:
        pipeline.make_dataset(config)
    assert "\n" not in str(e.value)


def test_more_hosts_than_files_is_refused(corpus):
    _, shard_dir, _ = corpus
    with pytest.raises(files.DataError, match="5 shards .* cannot feed 8 processes"):
        pipeline.make_dataset(data_config("shards", shard_dir, global_batch=8), 0, 8)


def test_changed_dataset_is_refused_on_restore(tmp_path):
    make_folder(str(tmp_path), count=6, nested=False)
    it = iter(pipeline.make_dataset(data_config("folder", tmp_path, global_batch=2)))
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    Image.new("RGB", (8, 8)).save(tmp_path / "new.png")
    fresh = iter(pipeline.make_dataset(data_config("folder", tmp_path, global_batch=2)))
    with pytest.raises(files.DataError, match="held 6 files or shards .* 7 now"):
        fresh.set_state(state)
    fresh.close()



def _emoji_font_or_skip():
    from dalle_jax.data import emoji
    try:
        return emoji.load_font()
    except files.DataError:
        pytest.skip("Noto Color Emoji is not installed (apt-get install fonts-noto-color-emoji)")


def test_emoji_drawing():
    from dalle_jax.data import emoji
    font = _emoji_font_or_skip()
    grinning = emoji.draw(font, "\U0001F600", 32)
    assert grinning.shape == (32, 32, 3) and (grinning[0, 0] == 255).all()  # white margin
    r, g, b = grinning[10:22, 10:22].reshape(-1, 3).mean(0)
    assert r > 150 and g > 120 and b < 100  # a yellow face
    flag = emoji.draw(font, "\U0001F1EB\U0001F1F7", 32, (0, 0, 0))  # France: one glyph
    assert flag is not None and (flag[0, 0] == 0).all()
    assert emoji.draw(font, "A", 32) is None  # not in the font
    with pytest.raises(files.DataError, match="apt-get install fonts-noto-color-emoji"):
        emoji.load_font("/no/such/font.ttf")


def test_emoji_corpus_shards(tmp_path, monkeypatch):
    from dalle_jax.data import emoji
    _emoji_font_or_skip()
    monkeypatch.setattr(emoji, "EMOJI_RANGES", ((0x1F600, 0x1F64F),))  # the emoticons block
    counts = emoji.write_corpus(str(tmp_path), size=16, rich_names=False, eval_percent=20)
    assert counts == {"train": 65, "eval": 15, "missing": 0}  # fixed by the names alone
    for split in ("train", "eval"):
        records = [r for p in shards.list_shards(str(tmp_path / split))
                   for r in shards.read_shard(p)]
        assert len(records) == counts[split]
        for r in records:
            meta = json.loads(r.members["json"])
            name = r.members["txt"].decode()
            assert name == unicodedata.name(meta["emoji"]).lower()
            assert emoji.is_held_out(name, 20) == (split == "eval") == (meta["split"] == "eval")
            picture = images_lib.decode_image(r.members["png"], 16)
            assert picture.std() > 5  # something drawn on the background
    it = iter(pipeline.make_dataset(data_config("shards", tmp_path / "train")))
    assert next(it)["image"].shape == (8, SIZE, SIZE, 3)
    it.close()

@pytest.mark.slow
def test_clip_trains_on_shards_and_resumes_exactly(tmp_path):
    """The trainer runs unchanged on shards; stopped and resumed, it ends where an
    uninterrupted run ends (the shuffle buffer restored from the checkpoint)."""
    import jax

    from dalle_jax import config as config_lib
    from dalle_jax.train import loop
    shards.write_from_shapes(64, str(tmp_path / "shards"), per_shard=16, size=16)
    config = config_lib.load(
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "shapes_clip.py"),
        ["model.variant=micro", "data.image_size=16", "data.global_batch=16",
         "data.num_threads=1", "data.hard_negatives=0", "total_steps=6", "log_every=1",
         "eval_every=0", "checkpoint_every=3", "progress_bar=False", "optim.warmup_steps=2"])
    config.data.name = "shards"
    config.data.path = str(tmp_path / "shards")
    config.data.shuffle_buffer = 20
    config.data.caption_dropout = 0.1
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    loop.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3)
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params),
                 jax.device_get(resumed.params))
