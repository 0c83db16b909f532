"""The unCLIP generator behind the Pipeline interface and sample.py, on a tiny random model."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax import bundle
from dalle_jax import config as config_lib
from dalle_jax.pipeline import Pipeline
from dalle_jax.train import stages
from dalle_jax.train.clip import CLIPTask
from dalle_jax.train.unclip import DiffusionDecoderTask, DiffusionPriorTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["clip.import_from=", "clip.model.variant=micro", "clip.data.image_size=16",
        "prior.data.image_size=16", "decoder.data.image_size=16", "prior.model.width=32",
        "prior.model.depth=1", "prior.model.num_heads=2", "decoder.model.base_channels=8",
        "decoder.model.channel_mult=(1,2)", "decoder.model.attention_resolutions=(8,)",
        "decoder.model.num_heads=2", "decoder.model.context_dim=16"]
FAST = dict(steps=2, prior_steps=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A randomly initialised unCLIP pipeline written as a model file, as training would."""
    config = config_lib.load(os.path.join(ROOT, "configs/shapes_unclip.py"), TINY)
    clip_params = CLIPTask(config.clip).init_params(jax.random.PRNGKey(0))
    prior = DiffusionPriorTask(config.prior, clip_params, config.clip, embed_stats_count=64)
    decoder = DiffusionDecoderTask(config.decoder, clip_params, config.clip)
    # Zero-initialised output layers would make every picture the same; nudge them.
    nudge = lambda tree: jax.tree.map(lambda x: x + 0.05, tree)
    prior_params = prior.init_params(jax.random.PRNGKey(1))
    prior_params = {**prior_params, "net": nudge(prior_params["net"])}
    path = str(tmp_path_factory.mktemp("unclip") / "model.npz")
    stages.export(path, config, clip_params, prior_params,
                  nudge(decoder.init_params(jax.random.PRNGKey(2))))
    return path


@pytest.fixture(scope="module")
def pipe(model_file):
    return Pipeline.load(model_file, generator="unclip", batch_size=4)


def test_generate_is_per_picture_and_options_matter(pipe):
    prompts = ["a large red circle in the top left", "a blue star"]
    out = pipe.generate(prompts, num_per_prompt=3, seed=1, **FAST)
    assert out.dtype == np.uint8 and out.shape == (6, 16, 16, 3)
    # A picture depends on (seed, prompt, sample), not on the batch it was drawn in.
    alone = pipe.generate(prompts[1:], num_per_prompt=3, seed=1, **FAST)
    assert not np.array_equal(alone, out[3:])  # prompt index 0 vs 1: other keys
    np.testing.assert_array_equal(pipe.generate(prompts, 3, seed=1, **FAST), out)
    assert not np.array_equal(pipe.generate(prompts, 3, seed=2, **FAST), out)
    assert len({out[i].tobytes() for i in range(3)}) == 3  # samples of a prompt differ
    guided = pipe.generate(prompts, 3, seed=1, **FAST, guidance_scale=1.0)
    assert not np.array_equal(guided, out)  # the decoder's guidance scale is used


def test_variations_interpolate_edit_and_option_errors(pipe):
    source = pipe.generate(["a red circle", "a green square"], 1, seed=0, **FAST)
    varied = pipe.variations(source, num=2, **FAST)
    assert varied.shape == (4, 16, 16, 3) and not np.array_equal(varied[0], varied[1])
    frames = pipe.interpolate(source[0], source[1], steps=3, decoder_steps=2, prior_steps=2)
    assert frames.shape == (3, 16, 16, 3)
    assert pipe.edit(source[0], "a red circle", "a blue circle", **FAST).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="truncation"):
        pipe.generate(["a red circle"], truncation=0.5)
    with pytest.raises(ValueError, match="steps"):
        pipe.generate(["a red circle"], steps=0)
    with pytest.raises(bundle.BundleError, match="unclip model, not gan"):
        Pipeline.load(pipe.path, generator="gan")


def test_sample_py_with_unclip(tmp_path, model_file):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "a red circle", "--generator",
           "unclip", "--checkpoint", model_file, "--num", "2", "--steps", "2",
           "--prior-steps", "2", "--guidance-scale", "2", "--out", str(out), "--scale", "1"]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.text["generator"] == "unclip" and im.text["steps"] == "2"
        assert im.text["guidance_scale"] == "2.0"
    r = subprocess.run(cmd[:-4] + ["--truncation", "0.5"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode != 0 and "not an option of the unclip" in r.stderr
    assert "Traceback" not in r.stderr
