"""One command trains a whole pipeline: CLIP, then the prior, where the config has a `layout`
block the layout model (`models/layout.py`), and the decoder on the frozen CLIP, then, where
the config has a `refine` block, a fine-tune of the GAN decoder's generator.

Each stage is an ordinary training run in `workdir/<stage>` (checkpoints, metrics.jsonl,
periodic evaluation), so rerunning the command resumes the unfinished stage and skips the
finished ones. When the last stage is done, the pipeline is written as one model file,
`workdir/model.npz` (see `dalle_jax.bundle`), which `Pipeline.load` reads.

The refine stage starts as a fine-tune does (`decoder.init_from`): the decoder stage's EMA
generator, a new discriminator, new optimizer moments, its own schedule, data and loss. Its
generator is the one the model file holds.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from dalle_jax import bundle
from dalle_jax import config as config_lib
from dalle_jax.data import shapes
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import loop

STAGES = ("clip", "prior", "decoder")


# The decoder family decides the generator a model file holds (`Pipeline.load(generator=...)`).
GENERATOR_OF = {"gan": "gan", "diffusion_decoder": "unclip"}


def build_task(stage_config, clip_params, clip_config):
    from dalle_jax.train.gan import GANTask
    from dalle_jax.train.layout import LayoutTask
    from dalle_jax.train.prior import PriorTask
    from dalle_jax.train.unclip import DiffusionDecoderTask, DiffusionPriorTask
    tasks = {"prior": PriorTask, "gan": GANTask, "diffusion_prior": DiffusionPriorTask,
             "diffusion_decoder": DiffusionDecoderTask, "layout": LayoutTask}
    if stage_config.family not in tasks:
        raise ValueError(f"unknown model family {stage_config.family!r} for a stage on a frozen "
                         f"CLIP; valid: {', '.join(tasks)}")
    return tasks[stage_config.family](stage_config, clip_params, clip_config)


def _params(state, config):
    return state.ema_params if config.eval.use_ema else state.params


def frozen_clip(config, workdir: str):
    """The CLIP the later stages stand on: imported when `clip.import_from` names a directory
    written by `python -m dalle_jax.clip_import`, taken from a trained pipeline when it names a
    model file (`model.npz`, or `shipped:gan` for the GAN model in the package), else trained
    by the `clip` stage."""
    source = config.clip.get("import_from")
    if source and (source.endswith(".npz") or source.startswith("shipped:")):
        return clip_from_model(source, config.clip)
    if source:
        from dalle_jax import clip_import
        return clip_import.frozen_params(config.clip)
    from dalle_jax.train.clip import clip_params
    clip_state = loop.train_and_evaluate(config.clip, os.path.join(workdir, "clip"))
    return clip_params(_params(clip_state, config.clip))


def clip_from_model(source: str, clip_config) -> dict:
    """The frozen CLIP of a pipeline model file, so that two generators can share one CLIP
    (the unCLIP config stands on the shipped GAN model's). Its CLIP config must be this one's."""
    return _section_of_model(source, "clip", clip_config,
                             ("model", "data.image_size", "data.context_length"))


def _same_file_as_clip(config, section: str) -> str:
    """`<section>.import_from`, which must name the file `clip.import_from` names: a prior or a
    decoder only fits the CLIP it was trained on. Raises BundleError (one line) otherwise."""
    from dalle_jax.pipeline import model_file
    source = config[section].import_from
    if model_file(config.clip.get("import_from") or "") != model_file(source):
        raise bundle.BundleError(f"{section}.import_from={source} needs clip.import_from="
                                 f"{source}: a {section} only fits the CLIP it was trained on")
    return source


def prior_from_model(config) -> tuple[dict, dict]:
    """(parameters, config as stored) of the prior of the model file `prior.import_from`, used
    as it is (not trained), so that a new decoder can be paired with a finished prior. A prior
    is tied to the CLIP it was trained on, so `clip.import_from` must name the same file; its
    family and model must be this config's."""
    source = _same_file_as_clip(config, "prior")
    return _section_of_model(source, "prior", config.prior, ("family", "model"), with_config=True)


def layout_from_model(config) -> tuple[dict, dict]:
    """(parameters, config as stored) of the layout model of the model file
    `layout.import_from`, used as it is; like a prior, it reads the CLIP of that file."""
    source = _same_file_as_clip(config, "layout")
    return _section_of_model(source, "layout", config.layout, ("family", "model"),
                             with_config=True)


# The decoder config's fields that decide what its training makes: an imported decoder must
# have been trained under the same ones (unset, empty and zero count as one).
DECODER_TRAINING_FIELDS = ("family", "seed", "total_steps", "model", "loss", "optim", "data.name",
                           "data.split", "data.seed", "data.image_size", "data.context_length",
                           "data.global_batch", "data.hard_negatives", "data.oversample",
                           "data.oversample_from", "data.minimal_pairs")


def decoder_from_model(config) -> dict:
    """The generator of the model file `decoder.import_from`, used as the decoder stage's result
    (not trained), so that a refine stage can go on from a finished decoder. A decoder is tied
    to the CLIP it was trained on, so `clip.import_from` must name the same file, and the file's
    decoder must have been trained under this config (DECODER_TRAINING_FIELDS)."""
    from dalle_jax.pipeline import model_file
    source = _same_file_as_clip(config, "decoder")
    path = model_file(source)
    meta, params = bundle.load(path)
    if meta["configs"].get("generator") != "gan" or "generator" not in params:
        raise bundle.BundleError(f"decoder.import_from={source}: {path} holds no GAN generator")
    unset = lambda v: None if v in (None, "", 0, False, [], {}) else v
    pick = lambda c: {k: unset(v)
                      for k, v in config_lib.fields_of(c, DECODER_TRAINING_FIELDS).items()}
    stored = pick(meta["configs"].get("decoder", {}))
    wanted = pick(json.loads(config.decoder.to_json_best_effort()))
    wanted.pop("import_from", None)
    changed = [f"{k}={stored.get(k)!r} there, {wanted.get(k)!r} here"
               for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if changed:
        raise bundle.BundleError(f"decoder.import_from={source} holds a decoder trained under "
                                 f"another config (decoder.{changed[0]}"
                                 f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''})"
                                 ": make the config's match")
    return params["generator"]


def _section_of_model(source: str, section: str, stage_config, keys, with_config=False):
    from dalle_jax.pipeline import model_file
    path = model_file(source)
    meta, params = bundle.load(path)
    if section not in params:
        raise bundle.BundleError(f"{section}.import_from={source}: {path} holds no {section}")
    stored = meta["configs"].get(section, {})
    wanted = json.loads(stage_config.to_json_best_effort())
    for key in keys:
        a, b = stored, wanted
        for part in key.split("."):
            a, b = (x.get(part) if isinstance(x, dict) else None for x in (a, b))
        if a != b:
            raise bundle.BundleError(f"{section}.import_from={source} holds a {section} with "
                                     f"{section}.{key}={a!r}, not {b!r}: make the config's match")
    return (params[section], stored) if with_config else params[section]


def run(config, workdir: str) -> str:
    """Trains every stage (resuming), exports the model file; returns its path."""
    clip_params = frozen_clip(config, workdir)
    prior_config = None  # the config's own, unless the prior is imported with its own
    if config.prior.get("import_from"):
        prior_params, prior_config = prior_from_model(config)
    else:
        prior_task = build_task(config.prior, clip_params, config.clip)
        prior_params = _params(loop.train_and_evaluate(
            config.prior, os.path.join(workdir, "prior"), task=prior_task), config.prior)
    layout_params = layout_config = None
    if config.get("layout") and config.layout.get("import_from"):
        layout_params, layout_config = layout_from_model(config)
    elif config.get("layout"):
        layout_task = build_task(config.layout, clip_params, config.clip)
        layout_params = _params(loop.train_and_evaluate(
            config.layout, os.path.join(workdir, "layout"), task=layout_task), config.layout)
    if config.decoder.get("import_from"):
        decoder = decoder_from_model(config)
    else:
        decoder_task = build_task(config.decoder, clip_params, config.clip)
        decoder = loop.train_and_evaluate(config.decoder, os.path.join(workdir, "decoder"),
                                          task=decoder_task).ema_params
        if config.decoder.family == "gan":
            decoder = decoder["generator"]
    if config.get("refine"):
        from dalle_jax.train.gan import GANTask
        refine = config_lib.stage_config(config, "refine")
        refine_task = GANTask(refine, clip_params, config.clip,
                              initial_generator=jax.device_get(decoder))
        decoder = loop.train_and_evaluate(refine, os.path.join(workdir, "refine"),
                                          task=refine_task).ema_params["generator"]
    path = os.path.join(workdir, "model.npz")
    if jax.process_index() == 0:
        export(path, config, clip_params, prior_params, decoder, prior_config=prior_config,
               layout_params=layout_params, layout_config=layout_config)
        print(f"model written to {path}", file=sys.stderr)
    return path


def shapes_vocabulary(context_length: int, count: int = 20000) -> np.ndarray:
    """Every token id the shapes captions use (both splits), plus start, end and padding."""
    captions = [shapes.caption_of(shapes.scene(i, split)) for split in ("train", "eval")
                for i in range(count)]
    return np.unique(np.concatenate([Tokenizer()(captions, context_length).ravel(), [0]]))


def export(path: str, config, clip_params, prior_params, generator_params,
           dtype: str | None = None, prior_config: dict | None = None,
           layout_params: dict | None = None, layout_config: dict | None = None):
    """The pipeline's model file: the frozen CLIP, the prior, the layout model where there is
    one and the decoder's EMA weights (the GAN's generator under "generator", the refine
    stage's where there is one; a diffusion decoder under "decoder"), with their configs (the
    prior's `prior_config` and the layout model's `layout_config` when given: an imported
    one's own)."""
    generator = GENERATOR_OF.get(config.decoder.family)
    if generator is None:
        raise ValueError(f"no generator for decoder family {config.decoder.family!r}; valid: "
                         f"{', '.join(GENERATOR_OF)}")
    configs = {"generator": generator, "clip": json.loads(config.clip.to_json_best_effort()),
               "prior": prior_config or json.loads(config.prior.to_json_best_effort()),
               "decoder": json.loads(config.decoder.to_json_best_effort())}
    if config.get("refine"):  # the refine stage's whole config
        configs["refine"] = json.loads(
            config_lib.stage_config(config, "refine").to_json_best_effort())
    params = {"clip": jax.device_get(clip_params), "prior": jax.device_get(prior_params),
              "generator" if generator == "gan" else "decoder": jax.device_get(generator_params)}
    if layout_params is not None:
        configs["layout"] = layout_config or json.loads(config.layout.to_json_best_effort())
        params["layout"] = jax.device_get(layout_params)
    keep = None
    # Only a CLIP trained on shapes has rows that never moved; an imported one uses them all.
    if config.clip.data.name == "shapes" and not _imported_elsewhere(config.clip):
        keep = {"clip/text/token_embedding/embedding":
                shapes_vocabulary(config.clip.data.context_length)}
    bundle.export(path, configs, params, dtype or config.get("export_dtype", "float32"), keep)


def _imported_elsewhere(clip_config) -> bool:
    """A CLIP imported from published weights (every token row used), not from a pipeline."""
    source = clip_config.get("import_from")
    return bool(source) and not (source.endswith(".npz") or source.startswith("shipped:"))
