"""Bad input never shows a traceback: config files of the wrong shape, checkpoints and workdirs
of another model, outputs that cannot be written, odd prompts and odd bytes on the command
line. Each case is one `error:` line (or ConfigError/BundleError/PromptError in Python), a
non-zero exit, and nothing half-written. The cases tests/test_generation.py already covers
(empty prompt on the command line, missing model file, unreadable image, /proc output) are not
repeated here."""

import json
import os
import subprocess
import sys
import warnings

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dalle_jax import bundle, cli, evaluate
from dalle_jax import config as config_lib
from dalle_jax.models import prior as prior_lib
from dalle_jax.pipeline import Pipeline, PromptError
from dalle_jax.train import unclip
from dalle_jax.train.clip import CLIPTask
from dalle_jax.train.gan import GANTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_CONFIG = os.path.join(ROOT, "configs", "shapes_clip.py")
GAN_CONFIG = os.path.join(ROOT, "configs", "shapes_gan.py")
SMALL = ["clip.model.variant=micro", "clip.data.image_size=16", "prior.data.image_size=16",
         "decoder.data.image_size=16", "decoder.model.channels=(16,16,8)",
         "decoder.model.d_channels=(8,16,16)", "prior.model.width=32", "prior.model.depth=1",
         "prior.model.num_heads=2", "decoder.model.w_dim=16", "decoder.model.z_dim=8"]
ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small pipeline model file with random parameters. Shapes come from eval_shape, the
    values from numpy: the model only has to run, and this costs seconds, not a minute."""
    config = config_lib.load(GAN_CONFIG, SMALL)
    clip_task = CLIPTask(config.clip)
    rng = np.random.default_rng(0)
    fill = lambda tree: jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) * 0.05).astype(s.dtype), tree)
    key = jax.random.PRNGKey(0)
    clip_params = fill(jax.eval_shape(clip_task.init_params, key))
    prior_model = unclip.build_prior(config.prior, clip_task.model.config)
    prior = fill(jax.eval_shape(lambda r: prior_lib.init(prior_model, r, 16), key))
    gan = fill(jax.eval_shape(GANTask(config.decoder, clip_params, config.clip).init_params,
                              key))
    configs = {"generator": "gan", **{k: json.loads(config[k].to_json_best_effort())
                                      for k in ("clip", "prior", "decoder")}}
    path = str(tmp_path_factory.mktemp("model") / "model.npz")
    bundle.export(path, configs, {"clip": clip_params, "prior": prior,
                                  "generator": gan["generator"]})
    return path


def fake_run(workdir, config, step=3):
    """A workdir as training leaves it, as far as the workdir check reads it: Orbax writes the
    "meta" item of step N to checkpoints/N/meta/metadata (the layout of a real run's)."""
    meta_dir = os.path.join(workdir, "checkpoints", str(step), "meta")
    os.makedirs(meta_dir)
    meta = {"format_version": 1, "family": config.family,
            "config": json.loads(config.to_json_best_effort())}
    with open(os.path.join(meta_dir, "metadata"), "w") as f:
        json.dump(meta, f)
    return str(workdir)


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert "Traceback" not in text
    return lines[0]


# ---- config files -----------------------------------------------------------------------------

def write_config(tmp_path, base: str, body: str) -> str:
    """A config file that takes a shipped config as a plain dict and changes it (`c`)."""
    path = tmp_path / "bad_config.py"
    path.write_text(
        "import importlib.util\nimport ml_collections\n"
        f"_spec = importlib.util.spec_from_file_location('base', {base!r})\n"
        "_base = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_base)\n\n"
        "def get_config():\n    c = _base.get_config().to_dict()\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "    return ml_collections.ConfigDict(c)\n")
    return str(path)


@pytest.mark.parametrize("base, body, message", [
    (CLIP_CONFIG, "c['total_steps'] = '1000'", "total_steps must be int, got '1000' (str)"),
    (CLIP_CONFIG, "c['optim']['lr'] = 'x'", "optim.lr must be float, got 'x' (str)"),
    (CLIP_CONFIG, "c['data']['global_batch'] = 12.5", "data.global_batch must be int, got 12.5"),
    (CLIP_CONFIG, "c['remat'] = 1", "remat must be a bool"),
    (CLIP_CONFIG, "c['loss'] = 'hinge'", "loss must be one of softmax, sigmoid"),
    (CLIP_CONFIG, "c['model'] = 'tiny'", "model must be a block of fields"),
    (CLIP_CONFIG, "c['data']['image_size'] = 0", "data.image_size must be at least 1"),
    (CLIP_CONFIG, "del c['optim']['lr']", "missing config field optim.lr (float)"),
    (CLIP_CONFIG, "del c['eval']", "missing config field eval (a block of fields)"),
    (CLIP_CONFIG, "c['optim']['learning_rate'] = 1e-3",
     "unknown config field 'optim.learning_rate'; valid here: optim.lr, optim.warmup_steps"),
    (CLIP_CONFIG, "c['data']['global_bach'] = 8",
     "unknown config field 'data.global_bach' (did you mean data.global_batch?)"),
    (CLIP_CONFIG, "c['family'] = 'vae'", "valid families: clip, prior, gan, layout, diffusion_prior, diffusion_decoder, pipeline"),
    (CLIP_CONFIG, "del c['family']", "config has no family field"),
    (CLIP_CONFIG, "c['sharding']['rules'] = [('x',)]", "sharding.rules[0] must be a (str,"),
    (GAN_CONFIG, "c['decoder']['model']['channels'] = (16, 'x')",
     "decoder.model.channels[1] must be int, got 'x'"),
    (GAN_CONFIG, "c['decoder']['loss']['r1_gamma'] = None", "decoder.loss.r1_gamma must be float"),
    (GAN_CONFIG, "c['prior']['family'] = 'gan'", "prior.family must be one of prior"),
    (GAN_CONFIG, "del c['decoder']['model']['z_dim']", "missing config field decoder.model.z_dim"),
    (GAN_CONFIG, "c['clip']['optim']['lr'] = [1e-3]", "clip.optim.lr must be float"),
    (GAN_CONFIG, "c['export_dtype'] = 'int8'", "export_dtype must be one of float32, bfloat16"),
    # Only the CLIP has a bfloat16 compute path; elsewhere it would train in float32 unsaid.
    (GAN_CONFIG, "c['decoder']['dtype'] = 'bfloat16'", "decoder.dtype must be one of float32;"),
    (GAN_CONFIG, "c['stages'] = 3", "unknown config field 'stages'"),
])
def test_config_file_errors_are_one_line_at_load(tmp_path, base, body, message):
    path = write_config(tmp_path, base, body)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.load(path)
    text = str(error.value)
    assert message in text and text.startswith(path) and "\n" not in text, text


def test_config_schema_accepts_the_shipped_configs_and_ints_for_floats(tmp_path):
    path = write_config(tmp_path, GAN_CONFIG, "c['clip']['optim']['lr'] = 1\n"
                        "c['decoder']['loss'].pop('adversarial_weight')")  # optional field
    config = config_lib.load(path, ["prior.optim.lr=2", "clip.optim.lr=3e-4"])
    assert config.clip.optim.lr == 3e-4 and isinstance(config.prior.optim.lr, float)
    config = config_lib.load(write_config(tmp_path, CLIP_CONFIG, "c['optim']['lr'] = 2"),
                             ["optim.lr=5e-4"])  # an int in the file does not fix the type
    assert config.optim.lr == 5e-4
    # An optional field the config leaves out can be set from the command line, checked.
    config = config_lib.load(GAN_CONFIG, ["clip.import_from=/clip/dir",
                                          "decoder.data.shuffle_buffer=50"])
    assert config.clip.import_from == "/clip/dir" and config.decoder.data.shuffle_buffer == 50
    with pytest.raises(config_lib.ConfigError, match="decoder.data.shuffle_buffer must be int"):
        config_lib.load(GAN_CONFIG, ["decoder.data.shuffle_buffer=many"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'clip.import_fro'"):
        config_lib.load(GAN_CONFIG, ["clip.import_fro=/clip/dir"])
    # Overrides are checked against the schema too, not only against the old value's type.
    with pytest.raises(config_lib.ConfigError, match="sharding.params must be one of"):
        config_lib.load(CLIP_CONFIG, ["sharding.params=zero3"])
    # A run shortened below its warm restart is told so before anything trains.
    with pytest.raises(config_lib.ConfigError, match=r"decoder.optim.restart_steps=600 must be "
                       r"less than decoder.total_steps=500; decoder.optim.restart_steps=0 "):
        config_lib.load(GAN_CONFIG, ["decoder.total_steps=500", "decoder.optim.restart_steps=600"])
    # The refine stage holds what differs from the decoder; the rest, overrides included,
    # is the decoder's, but for its shape, which only the decoder's fields set.
    config = config_lib.load(GAN_CONFIG, ["decoder.model.w_dim=64", "decoder.loss.clip_weight=2",
                                          "refine.data.global_batch=32"])
    refine = config_lib.stage_config(config, "refine")
    assert (refine.model.w_dim, refine.loss.clip_weight, refine.data.global_batch,
            refine.total_steps, config.decoder.data.global_batch) == (64, 2.0, 32, 2400, 64)
    with pytest.raises(config_lib.ConfigError, match=r"refine.model.w_dim=32 differs from "
                       r"decoder.model.w_dim=128: the refine stage fine-tunes the decoder's"):
        config_lib.load(GAN_CONFIG, ["refine.model.w_dim=32"])
    # It may add layers that read the caption (they start as the identity), nothing else.
    config = config_lib.load(GAN_CONFIG, ["refine.model.cross_attention_res=(8,)",
                                          "refine.model.text_reader_layers=2",
                                          "refine.model.caption_to_w=True"])
    refine = config_lib.stage_config(config, "refine")
    assert (tuple(refine.model.cross_attention_res), refine.model.text_reader_layers,
            refine.model.caption_to_w, tuple(config.decoder.model.cross_attention_res)) == (
                (8,), 2, True, ())
    with pytest.raises(config_lib.ConfigError, match="refine.init_from cannot be set"):
        config_lib.load(GAN_CONFIG, ["refine.init_from=shipped:gan"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'refine.optim.lrr'"):
        config_lib.load(GAN_CONFIG, ["refine.optim.lrr=1e-3"])
    with pytest.raises(config_lib.ConfigError, match="refine.optim.lr must be float"):
        config_lib.load(GAN_CONFIG, ["refine.optim.lr=fast"])
    with pytest.raises(config_lib.ConfigError, match="could not load config .*ZeroDivisionError"):
        config_lib.load(write_config(tmp_path, CLIP_CONFIG, "1 / 0"))


def test_train_command_refuses_a_bad_config_file_before_building_anything(tmp_path):
    path = write_config(tmp_path, CLIP_CONFIG, "c['data']['global_batch'] = 12.5")
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", path,
                        "--workdir", str(workdir)], capture_output=True, text=True, timeout=120,
                       env=ENV)
    assert r.returncode == 2
    assert "data.global_batch must be int" in one_error_line(r.stderr)
    assert not workdir.exists()


# ---- workdirs and checkpoints -----------------------------------------------------------------

TINY = ["model.variant=micro", "data.image_size=16", "data.global_batch=16", "total_steps=2"]


def test_workdir_of_another_model_is_refused(tmp_path):
    clip = config_lib.load(CLIP_CONFIG, TINY)
    pipeline = config_lib.load(GAN_CONFIG, SMALL)
    clip_run = fake_run(tmp_path / "clip_run", clip)
    config_lib.check_workdir(clip, clip_run)  # the same model resumes
    config_lib.check_workdir(config_lib.load(CLIP_CONFIG, TINY + ["total_steps=9",
                                                                   "optim.lr=0.1"]), clip_run)
    cases = [
        (pipeline, clip_run, "holds a clip run, not a pipeline's"),
        (config_lib.load(CLIP_CONFIG, TINY + ["model.variant=tiny"]), clip_run,
         "model.variant 'micro' -> 'tiny'"),
        (config_lib.load(CLIP_CONFIG, TINY + ["data.image_size=32"]), clip_run,
         "data.image_size 16 -> 32"),
    ]
    pipe_run = tmp_path / "pipe_run"
    fake_run(pipe_run / "clip", pipeline.clip)
    fake_run(pipe_run / "prior", pipeline.prior)
    config_lib.check_workdir(pipeline, str(pipe_run))
    cases += [(clip, str(pipe_run), "holds a pipeline run"),
              (config_lib.load(GAN_CONFIG, SMALL + ["prior.model.width=64"]), str(pipe_run),
               "prior holds a model of another shape (checkpoint -> this config: "
               "model.width 32 -> 64)")]
    stray = tmp_path / "file"
    stray.write_text("x")
    cases.append((clip, str(stray), "is a file, not a directory"))
    for config, workdir, message in cases:
        with pytest.raises(config_lib.ConfigError, match=None) as error:
            config_lib.check_workdir(config, workdir)
        assert message in str(error.value), str(error.value)


def test_a_run_saved_before_a_model_field_existed_resumes_under_its_old_value(tmp_path):
    pipeline = config_lib.load(GAN_CONFIG, SMALL)
    old = pipeline.decoder.to_dict()
    del old["model"]["upsample"]  # as the code before decoder.model.upsample wrote it
    run = tmp_path / "run"
    fake_run(run / "clip", pipeline.clip)
    fake_run(run / "prior", pipeline.prior)
    fake_run(run / "decoder", ml_collections.ConfigDict(old))
    config_lib.check_workdir(pipeline, str(run))  # "nearest" is what it trained with
    with pytest.raises(config_lib.ConfigError, match="model.upsample 'nearest' -> 'bilinear'"):
        config_lib.check_workdir(config_lib.load(GAN_CONFIG, SMALL + [
            "decoder.model.upsample=bilinear"]), str(run))


def test_train_command_writes_nothing_into_a_foreign_workdir(tmp_path):
    clip_run = fake_run(tmp_path / "clip_run", config_lib.load(CLIP_CONFIG, TINY))
    before = sorted(os.walk(clip_run))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", GAN_CONFIG,
                        "--workdir", clip_run, *SMALL], capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 2
    assert "holds a clip run" in one_error_line(r.stderr)
    assert sorted(os.walk(clip_run)) == before


def test_model_path_of_another_kind_is_named(tmp_path, model_file):
    clip_run = fake_run(tmp_path / "clip_run", config_lib.load(CLIP_CONFIG, TINY))
    pipe_run = tmp_path / "pipe_run"
    fake_run(pipe_run / "clip", config_lib.load(GAN_CONFIG, SMALL).clip)
    meta, params = bundle.load(model_file)
    half = dict(np.load(model_file))
    m = json.loads(bytes(half["__meta__"]).decode())
    del m["configs"]["prior"]
    half["__meta__"] = np.frombuffer(json.dumps(m).encode(), np.uint8)
    np.savez(tmp_path / "no_prior.npz", **half)
    for path, message in [(clip_run, "is a clip training run, not a text-to-image model"),
                          (str(pipe_run), "pipeline run with no model.npz yet"),
                          (os.path.join(clip_run, "checkpoints", "3", "meta"),
                           "is a directory, not a model file"),
                          (str(tmp_path / "no_prior.npz"), "no prior config")]:
        with pytest.raises(bundle.BundleError, match=message):
            bundle.load(path)
    # A finished run's workdir stands for its model.npz.
    os.symlink(model_file, pipe_run / "model.npz")
    assert bundle.load(str(pipe_run))[0]["configs"] == meta["configs"]


def run_sample(capsys, *args):
    status = cli.sample_main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_sample_refuses_foreign_or_corrupt_checkpoints_and_writes_nothing(tmp_path, capsys,
                                                                          model_file):
    clip_run = fake_run(tmp_path / "clip_run", config_lib.load(CLIP_CONFIG, TINY))
    raw = open(model_file, "rb").read()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 3])
    out = tmp_path / "grid.png"
    for checkpoint, message in [(clip_run, "clip training run"),
                                (str(tmp_path / "cut.npz"), "cannot read model file")]:
        status, stdout, err = run_sample(capsys, "a red circle", "--checkpoint", checkpoint,
                                         "--out", str(out))
        assert status == 2 and stdout == "" and message in one_error_line(err)
        assert os.listdir(tmp_path) == ["clip_run", "cut.npz"]  # no grid, no temporary file


def test_sample_refuses_unwritable_outputs_before_loading(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    # The checkpoint does not exist either: the output is checked first, in milliseconds.
    for out, message in [(tmp_path / "missing" / "x.png", "no directory"),
                         (tmp_path / "a_dir", "it is a directory"),
                         (tmp_path / "a_file" / "x.png", "is not a directory"),
                         ("", "empty path")]:
        status, stdout, err = run_sample(capsys, "a red circle", "--out", str(out),
                                         "--checkpoint", "/no/such/model.npz")
        assert status == 2 and message in one_error_line(err), (out, err)
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file"]  # no directory made
    assert os.listdir(tmp_path / "a_dir") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_sample_refuses_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status, _, err = run_sample(capsys, "a red circle", "--out", str(locked / "x.png"))
        assert status == 2 and "permission denied" in one_error_line(err)
    finally:
        locked.chmod(0o700)


def test_sample_images_that_are_not_images(tmp_path, capsys, model_file):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    (tmp_path / "folder.png").mkdir()
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(good)
    for args, message in [(["--edit", str(text), "--from", "red", "--to", "blue"],
                           "cannot read"),
                          (["--interpolate", str(good), str(tmp_path / "folder.png")],
                           "no such image file"),
                          (["--edit", str(good), "--from", "\x00\x01", "--to", "blue"],
                           "empty")]:
        status, stdout, err = run_sample(capsys, *args, "--checkpoint", model_file, "--out",
                                         str(tmp_path / "out.png"))
        assert status == 2 and stdout == "" and message in one_error_line(err), (args, err)
    assert not (tmp_path / "out.png").exists()


# ---- evaluate ---------------------------------------------------------------------------------

def run_evaluate(capsys, *args):
    status = evaluate.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_evaluate_bad_checkpoints_and_outputs(tmp_path, capsys, model_file):
    clip_run = fake_run(tmp_path / "clip_run", config_lib.load(CLIP_CONFIG, TINY))
    (tmp_path / "text.npz").write_text("not a zip")
    report = str(tmp_path / "report.json")
    for args, message in [(["--checkpoint", "/no/such.npz"], "no model file"),
                          (["--checkpoint", clip_run], "clip training run"),
                          (["--checkpoint", str(tmp_path / "text.npz")], "cannot read"),
                          (["--num", "0"], "--num must be between"),
                          (["--truncation", "-1"], "truncation must be between"),
                          (["--steps", "5"], "--steps is not an option of the gan"),
                          (["--out", str(tmp_path / "nowhere" / "r.json")], "no directory"),
                          (["--out", str(tmp_path)], "it is a directory")]:
        if "--out" not in args:
            args = [*args, "--out", report]
        if "--checkpoint" not in args:
            args = [*args, "--checkpoint", "/no/such.npz"]  # never reached
        status, stdout, err = run_evaluate(capsys, *args)
        assert status == 2 and stdout == "" and message in one_error_line(err), (args, err)
    assert sorted(os.listdir(tmp_path)) == ["clip_run", "text.npz"]


def test_evaluate_writes_report_and_grid_together_or_not_at_all(tmp_path, monkeypatch):
    assert evaluate.output_paths("runs.v2/report") == ("runs.v2/report", "runs.v2/report.png")
    assert evaluate.output_paths("r.json") == ("r.json", "r.png")
    assert evaluate.output_paths("r.PNG") == ("r.PNG", "r.grid.png")  # never one file for both
    # Reports named apart only after a dot get grids apart too.
    assert evaluate.output_paths("t0.7")[1] != evaluate.output_paths("t0.4")[1]
    assert evaluate.output_paths("r.JSON") == ("r.JSON", "r.png")
    grid = np.zeros((4, 4, 3), np.uint8)
    evaluate._write(str(tmp_path / "ok.json"), {"a": 1}, grid)
    assert json.load(open(tmp_path / "ok.json")) == {"a": 1} and (tmp_path / "ok.png").exists()

    def broken(*args, **kwargs):
        raise evaluate.images_lib.ImageError("disk full")
    monkeypatch.setattr(evaluate.images_lib, "save_png", broken)
    with pytest.raises(evaluate.images_lib.ImageError):
        evaluate._write(str(tmp_path / "bad.json"), {"a": 1}, grid)
    assert sorted(os.listdir(tmp_path)) == ["ok.json", "ok.png"]  # no JSON without its grid


# ---- prompts ----------------------------------------------------------------------------------

def test_prompts_with_nothing_to_draw_are_refused_in_python(model_file):
    pipe = Pipeline.load(model_file, batch_size=4)
    for prompt in ["\x00\x07\x1b", "\ufeff", "\u2028", "\t\n\r"]:
        with pytest.raises(PromptError, match="empty: the GAN pipeline has no unconditional"):
            pipe.generate([prompt])
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        pipe.encode_text(["a red circle", ""])


def test_a_10000_character_prompt_is_cut_with_one_warning(model_file):
    pipe = Pipeline.load(model_file, batch_size=4)
    long = ("a large red circle in the top left " * 300)[:10_000]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = pipe.tokenize([long])
    assert [("cut to the model's 14 tokens" in str(w.message)) for w in caught] == [True]
    assert len(str(caught[0].message)) < 200
    np.testing.assert_array_equal(tokens, pipe.tokenizer([long], 16))
    assert tokens[0, -1] == pipe.tokenizer.eot_token  # the end token survives the cut


def test_sample_command_with_undecodable_bytes_and_a_long_prompt(tmp_path, model_file):
    """A real process with bytes in argv that are not UTF-8 (as a shell passes them): the
    prompt's bad bytes and control characters become spaces, the 10,000-character prompt is
    cut with one warning, paths keep their own bytes (the output's is printed as it is, the
    model's is stored readably in the PNG's metadata)."""
    model = os.fsencode(str(tmp_path)) + b"/model-\xff.npz"
    os.symlink(model_file, model)
    out = os.fsencode(str(tmp_path)) + b"/grid-\xfe.png"
    long = b"a blue square " * 715
    r = subprocess.run([sys.executable.encode(), os.path.join(ROOT, "sample.py").encode(),
                        b"a red \xff\xfe circle\x07\x1b[2J", long, b"--num", b"1",
                        b"--checkpoint", model, b"--out", out, b"--scale", b"1"],
                       capture_output=True, timeout=300, env=ENV)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert r.stdout == out + b"\n"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: prompt cut"), err
    with Image.open(out) as im:
        assert im.text["prompt"].startswith("a red    circle  [2J | a blue square")
        assert im.text["model"].endswith("/model-\ufffd.npz")
        assert im.size == (18 + 2, 2 * 18 + 2)  # one column (--num 1), two prompts


def test_sample_prompt_of_undecodable_bytes_only(tmp_path, capsys, model_file):
    """What Python makes of such bytes in argv (surrogate escapes): nothing left to draw."""
    status, stdout, err = run_sample(capsys, os.fsdecode(b"\xff\xfe\x01"), "--checkpoint",
                                     model_file, "--out", str(tmp_path / "x.png"))
    assert status == 2 and stdout == "" and "empty" in one_error_line(err)
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_train_command_on_a_real_workdir_of_another_shape_or_corrupt(tmp_path):
    """A real one-step CLIP run, then train.py again with another variant (refused before
    anything is written) and with its checkpoint damaged (one line, no traceback)."""
    workdir = tmp_path / "run"
    base = [sys.executable, os.path.join(ROOT, "train.py"), "--config", CLIP_CONFIG,
            "--workdir", str(workdir), *TINY, "total_steps=1", "eval_every=0",
            "progress_bar=False", "data.num_threads=1"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    before = sorted(os.walk(workdir))
    r = subprocess.run(base + ["model.variant=tiny"], capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert r.returncode == 2 and "model.variant 'micro' -> 'tiny'" in one_error_line(r.stderr)
    assert sorted(os.walk(workdir)) == before
    state = workdir / "checkpoints" / "1" / "state"
    for root, _, files in os.walk(state):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(7)
    r = subprocess.run(base + ["total_steps=2"], capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint" in errors[0], r.stderr[-2000:]
