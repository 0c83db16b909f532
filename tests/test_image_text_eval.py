"""Evaluation on image-text data (shards or folders, e.g. the emoji corpus) rather than
shapes: the fixed eval set read from data.eval_path, CLIP retrieval, the decoder's round-trip
report (`python -m dalle_jax.evaluate --captions` is tested in test_evaluate.py)."""

import io
import tarfile

import numpy as np
import pytest
import ml_collections

from dalle_jax.data import pipeline, shapes, shards
from dalle_jax.data.files import DataError
from dalle_jax.train.clip import retrieval_scores
from dalle_jax.train.gan import decoder_report

SIZE = 16


def _config(path, eval_path=None, name="shards"):
    return ml_collections.ConfigDict(dict(name=name, path=str(path), eval_path=eval_path,
                                          seed=0, image_size=SIZE))


def test_eval_examples_come_in_file_order_and_skip_unusable_records(tmp_path):
    shards.write_from_shapes(10, str(tmp_path / "eval"), per_shard=4, size=SIZE, split="eval")
    # A record with no caption, in a shard of its own that sorts between the others.
    with tarfile.open(tmp_path / "eval" / "00001a.tar", "w") as tar:
        data = b"\xff\xd8 not a jpeg"
        info = tarfile.TarInfo("broken.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    images, captions = pipeline.eval_examples(_config("x", str(tmp_path / "eval")), 8)
    want_images, want_captions = shapes.examples(range(8), split="eval", size=SIZE)
    assert captions == want_captions
    assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - want_images).mean() < 8  # JPEG at quality 95
    # Fewer usable records than asked for: all of them.
    assert len(pipeline.eval_examples(_config("x", str(tmp_path / "eval")), 50)[1]) == 10
    with pytest.raises(DataError, match="needs data.eval_path"):
        pipeline.eval_examples(_config("x"), 8)
    reference, _ = pipeline.reference_examples(_config(tmp_path / "eval"), 3)
    np.testing.assert_array_equal(reference, images[:3])


def test_retrieval_scores():
    rng = np.random.default_rng(0)
    truth = np.array([0, 1, 2, 2, 3])  # pictures 2 and 3 share caption 2
    sims = rng.normal(size=(5, 4)) * 0.1
    sims[np.arange(5), truth] += 1.0  # every picture closest to its own caption
    perfect = retrieval_scores(sims, truth, ks=(1, 2))
    assert perfect["retrieval/image_to_text_top1"] == 1.0
    assert perfect["retrieval/text_to_image_top1"] == 1.0
    assert perfect["retrieval/chance_top2"] == 0.5
    # Picture 0 now prefers caption 1: one image->text miss of 5; caption 0 still finds
    # picture 0 first among pictures (nothing else is close to it).
    sims[0, 1] = 2.0
    one_off = retrieval_scores(sims, truth, ks=(1, 2))
    assert one_off["retrieval/image_to_text_top1"] == pytest.approx(0.8)
    assert one_off["retrieval/image_to_text_top2"] == 1.0
    # Caption 1's closest picture is now picture 0 (2.0 > ~1.0): one text->image miss of 4.
    assert one_off["retrieval/text_to_image_top1"] == pytest.approx(0.75)


def test_decoder_report_on_image_text_data(tmp_path):
    images, captions = shapes.examples(range(4), split="eval", size=SIZE)
    same = decoder_report(images, images.copy(), captions, None, 0, "shards",
                          lambda x: np.tile(np.eye(4)[:1], (len(x), 1)))
    assert same == {"decoder/mse": 0.0, "decoder/clip_cosine": 1.0}
    black = np.zeros_like(images)
    report = decoder_report(images, black, captions, str(tmp_path), 7, "shards")
    want = np.mean(np.square(images.astype(np.float64) / 127.5 - 1.0 + 1.0))
    assert report["decoder/mse"] == pytest.approx(want, rel=1e-5)
    assert "decoder/clip_cosine" not in report
    assert (tmp_path / "samples_000007.png").is_file()
    # Shapes data is scored by adherence instead.
    assert decoder_report(images, images, captions, None, 0)[
        "decoder_adherence/one_object_seen"] == 1.0
