"""Configs are data: a config file's `get_config()` returns an `ml_collections.ConfigDict`.

Every field can be overridden on the command line as `key.path=value` (or
`--config.key.path=value`, the big_vision spelling). Values are parsed as Python literals and
must keep the field's type; an unknown key or a value of the wrong type is a `ConfigError` whose
one-line message names the valid keys or the expected type. An optional field of the schema
that the file leaves out may be set too (`clip.import_from=DIR`).

`load` checks the whole config against `SCHEMAS`, the fields and types the trainers read, keyed
by model family (a `pipeline` holds one sub-config per stage, each checked by its own family),
so that a typo or a wrong type in the config file itself is one line at load time, before any
model is built, not a traceback from deep inside a jitted step. A family or field that a
trainer starts to read belongs in `SCHEMAS` too.

`check_workdir` refuses, before anything is written, a workdir that holds another run: another
family, a pipeline where one model was expected (or the reverse), or a model of another shape.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable, NamedTuple

import ml_collections


class ConfigError(ValueError):
    """A bad config file, key or value. Its message is one line, for the user."""


class Field(NamedTuple):
    """One leaf of a schema: its type (int, float, str, bool or list for a sequence), whether
    a config must set it, the values allowed, a lower bound, and a sequence's element type (a
    tuple of types: each element is a sequence of that length and those types)."""
    kind: type
    required: bool = True
    choices: tuple = ()
    minimum: float | None = None
    item: Any = None


def _opt(kind, **kw) -> Field:
    return Field(kind, required=False, **kw)


class Block(NamedTuple):
    """A block of fields that a config may leave out (the trainer then uses its defaults)."""
    fields: dict


class Stage(NamedTuple):
    """A sub-config trained as its own run, checked by the schema of its `family`. A stage
    `based_on` another holds only the fields that differ from that one's (`stage_config`)."""
    families: tuple[str, ...]
    required: bool = True
    based_on: str | None = None


# What a stage based on another never takes from it: where that one's parameters come from.
NOT_INHERITED = ("init_from", "import_from")


_OPTIM = {"lr": Field(float, minimum=0), "warmup_steps": Field(int, minimum=0),
          "final_lr_fraction": Field(float, minimum=0), "weight_decay": Field(float, minimum=0),
          "b1": Field(float, minimum=0), "b2": Field(float, minimum=0),
          "eps": Field(float, minimum=0), "clip_norm": Field(float, minimum=0),
          "ema_decay": Field(float, minimum=0), "clip_separately": _opt(bool),
          "restart_steps": _opt(int, minimum=0), "restart_lr": _opt(float, minimum=0)}

# data/pipeline.py: shapes, or image-caption folders and tar shards (name, path and the rest).
_DATA = {"name": Field(str), "split": Field(str), "seed": Field(int),
         "image_size": Field(int, minimum=1), "context_length": Field(int, minimum=2),
         "global_batch": Field(int, minimum=1), "num_threads": Field(int, minimum=0),
         "hard_negatives": Field(int, minimum=0), "minimal_pairs": _opt(bool),
         "oversample": _opt(str), "oversample_from": _opt(int, minimum=0), "path": _opt(str),
         "eval_path": _opt(str), "caption_dropout": _opt(float, minimum=0),
         "shuffle_buffer": _opt(int, minimum=0), "random_crop": _opt(bool)}

# What dalle_jax/train/loop.py, optim.py, sharding.py and data/pipeline.py read of any family.
# `dtype` is the compute dtype; only the CLIP towers have a bfloat16 path so far, so the other
# families accept float32 alone (a bfloat16 there would be silently trained in float32).
_TRAINING = {
    "family": Field(str), "seed": Field(int), "total_steps": Field(int, minimum=1),
    "data": _DATA, "dtype": Field(str, choices=("float32",)), "remat": Field(bool),
    "grad_accum_steps": Field(int, minimum=1),
    "mesh": {"data": Field(int, minimum=-1), "fsdp": Field(int, minimum=-1)},
    "sharding": {"params": Field(str, choices=("replicate", "fsdp")),
                 "rules": Field(list, item=(str, list))},
    "log_every": Field(int, minimum=1), "eval_every": Field(int, minimum=0),
    "eval": {"num_examples": Field(int, minimum=1), "use_ema": Field(bool)},
    "checkpoint_every": Field(int, minimum=1), "keep_checkpoints": Field(int, minimum=1),
    "progress_bar": Field(bool), "optim": _OPTIM,
    "nan_guard": Block({"max_consecutive": _opt(int, minimum=1),
                        "action": _opt(str, choices=("rollback", "stop")),
                        "lr_factor": _opt(float, minimum=0),
                        "max_rollbacks": _opt(int, minimum=0)})}

_DIFFUSION = {"schedule": _opt(str, choices=("cosine", "linear")),
              "num_timesteps": _opt(int, minimum=0),
              "prediction": _opt(str, choices=("eps", "x0", "v")),
              "min_snr_gamma": _opt(float, minimum=0),
              "text_drop_prob": _opt(float, minimum=0)}
_DIFFUSION_EVAL = {"num_examples": Field(int, minimum=1), "use_ema": Field(bool),
                   "sample_steps": _opt(int, minimum=1), "guidance_scale": _opt(float, minimum=0),
                   "eta": _opt(float, minimum=0)}

SCHEMAS: dict[str, dict] = {
    # dalle_jax/train/clip.py
    # (import_from: a directory of `python -m dalle_jax.clip_import`, the pipeline's frozen CLIP)
    "clip": {**_TRAINING, "dtype": Field(str, choices=("float32", "bfloat16")),
             "model": {"variant": Field(str)},
             "loss": Field(str, choices=("softmax", "sigmoid")), "import_from": _opt(str),
             "pixel_loss": Block({"weight": _opt(float, minimum=0),
                                  "text_weight": _opt(float, minimum=0),
                                  "size": _opt(int, minimum=1)})},
    # dalle_jax/train/prior.py (import_from: a pipeline model file whose prior is used as it is)
    "prior": {**_TRAINING, "import_from": _opt(str),
              "model": {"width": Field(int, minimum=1), "depth": Field(int, minimum=1),
                        "sample_steps": Field(int, minimum=1)}},
    # dalle_jax/train/gan.py
    # (init_from: a pipeline model file, or shipped:gan, whose generator starts the run)
    # (import_from: a pipeline model file whose generator is the decoder stage's result)
    "gan": {**_TRAINING, "init_from": _opt(str), "import_from": _opt(str),
            "model": {"z_dim": Field(int, minimum=1), "w_dim": Field(int, minimum=1),
                      "mapping_layers": Field(int, minimum=1),
                      "mapping_lr_mul": _opt(float, minimum=0), "input_from_w": _opt(bool),
                      "channels": Field(list, item=int), "d_channels": Field(list, item=int),
                      "noise": Field(bool), "cross_attention_res": Field(list, item=int),
                      "text_drop_prob": _opt(float, minimum=0),
                      "text_reader_layers": _opt(int, minimum=0),
                      "caption_to_w": _opt(bool),
                      "condition": Field(str, choices=("image", "text")),
                      "upsample": _opt(str, choices=("nearest", "bilinear")),
                      "input_res": _opt(int, minimum=1),
                      "synthesis": _opt(str, choices=("style", "conv")),
                      "norm_groups": _opt(int, minimum=1),
                      "d_resolution": _opt(int, minimum=0), "layout": _opt(bool),
                      "layout_drop_prob": _opt(float, minimum=0),
                      "layout_lr_mul": _opt(float, minimum=0),
                      "layout_modulate": _opt(bool)},
            "loss": {"augment": Field(str), "clip_weight": Field(float, minimum=0),
                     "clip_contrastive_weight": _opt(float, minimum=0),
                     "matching_weight": Field(float, minimum=0),
                     "matching_negatives": _opt(str, choices=("other", "counterfactual")),
                     "r1_gamma": Field(float, minimum=0), "r1_interval": Field(int, minimum=1),
                     "reconstruction": _opt(str, choices=("l1", "l2")),
                     "reconstruction_weight": _opt(float, minimum=0),
                     "reconstruction_shift": _opt(int, minimum=0),
                     "reconstruction_samples": _opt(int, minimum=1),
                     "reconstruction_search": _opt(bool),
                     "reconstruction_blur": _opt(float, minimum=0),
                     "reconstruction_edge": _opt(float, minimum=0),
                     "adversarial_weight": _opt(float, minimum=0),
                     "perceptual_weight": _opt(float, minimum=0)}},
    # dalle_jax/train/layout.py (import_from: a pipeline model file whose layout model is used
    # as it is)
    "layout": {**_TRAINING, "import_from": _opt(str),
               "model": {"width": Field(int, minimum=1), "layers": Field(int, minimum=1),
                         "num_heads": Field(int, minimum=1), "vector": _opt(bool),
                         "text_drop_prob": _opt(float, minimum=0)},
               "eval": {"num_examples": Field(int, minimum=1), "use_ema": Field(bool),
                        "temperature": _opt(float, minimum=0)}},
    # dalle_jax/train/unclip.py (model fields: models/prior.py DiffusionPriorConfig and
    # models/unet.py UNetConfig; the sizes CLIP fixes are filled in)
    "diffusion_prior": {**_TRAINING, "import_from": _opt(str), "eval": _DIFFUSION_EVAL,
                        "model": Block({"width": _opt(int, minimum=1), "depth": _opt(int, minimum=1),
                                        "num_heads": _opt(int, minimum=1), **_DIFFUSION})},
    "diffusion_decoder": {**_TRAINING, "eval": _DIFFUSION_EVAL, "model": Block({
        "base_channels": _opt(int, minimum=1), "channel_mult": _opt(list, item=int),
        "num_res_blocks": _opt(int, minimum=1), "attention_resolutions": _opt(list, item=int),
        "num_heads": _opt(int, minimum=1), "norm_groups": _opt(int, minimum=1),
        "context_dim": _opt(int, minimum=1), "num_image_tokens": _opt(int, minimum=1),
        "image_drop_prob": _opt(float, minimum=0), "threshold_percentile": _opt(float, minimum=0),
        **_DIFFUSION})},
    # dalle_jax/train/stages.py: CLIP, then the prior and the decoder on the frozen CLIP.
    "pipeline": {"family": Field(str), "export_dtype": _opt(str, choices=("float32", "bfloat16")),
                 "clip": Stage(("clip",)), "prior": Stage(("prior", "diffusion_prior")),
                 "layout": Stage(("layout",), required=False),
                 "decoder": Stage(("gan", "diffusion_decoder")),
                 "refine": Stage(("gan",), required=False, based_on="decoder")},
}

# The fields that fix a model's parameter shapes: a checkpoint resumes only under equal ones.
SHAPE_FIELDS = ("family", "model", "data.image_size", "data.context_length")
# Model fields added after runs were saved without them, with the value such a run trained
# with: a checkpoint that lacks one resumes under a config that states that value.
LATER_FIELD_DEFAULTS = {"model.upsample": "nearest", "model.input_res": 4,
                        "model.min_snr_gamma": 0.0, "model.synthesis": "style"}


def _module(path: str):
    """A config file run as a module of its own (config files are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_dalle_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling_module(config_file: str, name: str):
    """The config file `name` beside `config_file` (a config's `__file__`), as a module."""
    return _module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `name` beside `config_file`, unchecked, for a config
    built from others: `config.sibling(__file__, "shapes_clip.py")`."""
    return sibling_module(config_file, name).get_config()


def load(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a Python file, checks it against its family's schema, then
    applies `key=value` overrides and checks the result again."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        module = _module(path)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config {path} has no get_config() function")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # A user's file: report it, do not dump a traceback.
        raise ConfigError(f"could not load config {path}: {type(e).__name__}: "
                          f"{_first_line(e)}") from e
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path} returned a {type(config).__name__}, "
                          "not a ConfigDict")
    validate(config, where=f"{path}: ")
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return lines[0][:300] if lines else ""


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_name(kind) -> str:
    return {list: "a list or tuple", bool: "a bool (True/False)"}.get(kind, kind.__name__)


def _is(kind, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def _check_item(key: str, item, value, where: str):
    for i, element in enumerate(value):
        if isinstance(item, tuple):
            ok = (_is(list, element) and len(element) == len(item)
                  and all(_is(k, e) for k, e in zip(item, element)))
            want = f"a ({', '.join(_kind_name(k) for k in item)}) pair"
        else:
            ok, want = _is(item, element), _kind_name(item)
        if not ok:
            raise ConfigError(f"{where}{key}[{i}] must be {want}, got {_short(element)}")


def _check_field(key: str, spec: Field, value, where: str):
    if not _is(spec.kind, value):
        what = "a block of fields" if isinstance(value, ml_collections.ConfigDict) else (
            f"{_short(value)} ({type(value).__name__})")
        raise ConfigError(f"{where}{key} must be {_kind_name(spec.kind)}, got {what}")
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{where}{key} must be one of {', '.join(map(str, spec.choices))}; "
                          f"got {_short(value)}")
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"{where}{key} must be at least {spec.minimum}, got {value}")
    if spec.item is not None:
        _check_item(key, spec.item, value, where)


def _check_block(config, schema: dict, prefix: str, where: str):
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{where}{prefix.rstrip('.')} must be a block of fields (a dict), "
                          f"got {_short(config)}")
    for key in config.keys():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{where}unknown config field {prefix + key!r}{hint}; valid here: "
                              + ", ".join(f"{prefix}{k}" for k in schema))
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        if key not in config:
            if isinstance(spec, Block) or (isinstance(spec, (Field, Stage))
                                           and not spec.required):
                continue
            kind = _kind_name(spec.kind) if isinstance(spec, Field) else "a block of fields"
            raise ConfigError(f"{where}missing config field {name} ({kind})")
        value = config[key]
        if isinstance(spec, (dict, Block)):
            _check_block(value, spec.fields if isinstance(spec, Block) else spec, f"{name}.",
                         where)
        elif isinstance(spec, Stage):
            if spec.based_on and isinstance(value, ml_collections.ConfigDict):
                value = _merged(config, key, spec)
            family = value.get("family") if isinstance(value, ml_collections.ConfigDict) else None
            if family not in spec.families:
                raise ConfigError(f"{where}{name}.family must be one of "
                                  f"{', '.join(spec.families)}; got {_short(family)}")
            _check_block(value, SCHEMAS[family], f"{name}.", where)
        else:
            _check_field(name, spec, value, where)
            if spec.kind is float and isinstance(value, int):
                with config.unlocked():  # a ConfigDict field keeps its first type: replace it
                    del config[key]
                    config[key] = float(value)
    _check_restart(config, prefix, where)


def _check_restart(config, prefix: str, where: str):
    """A warm restart (`optim.restart_steps`) must leave the run a first cycle: a shortened run
    (`decoder.total_steps=500` where `decoder.optim.restart_steps=600`) says so before any stage
    trains, not when its schedule is built."""
    optim = config.get("optim")
    if "total_steps" not in config or not isinstance(optim, ml_collections.ConfigDict):
        return
    restart, total = int(optim.get("restart_steps", 0) or 0), config.total_steps
    if restart > 0 and restart >= total:
        raise ConfigError(f"{where}{prefix}optim.restart_steps={restart} must be less than "
                          f"{prefix}total_steps={total}; {prefix}optim.restart_steps=0 turns "
                          "the warm restart off")


def validate(config: ml_collections.ConfigDict, where: str = "") -> ml_collections.ConfigDict:
    """Checks `config` against the schema of its family (ints given for float fields become
    floats); raises ConfigError naming the first bad field. `where` prefixes the message."""
    family = config.get("family") if isinstance(config, ml_collections.ConfigDict) else None
    if family not in SCHEMAS:
        got = "no family field" if family is None else f"family {_short(family)}"
        raise ConfigError(f"{where}config has {got}; valid families: {', '.join(SCHEMAS)}")
    _check_block(config, SCHEMAS[family], "", where)
    if family == "pipeline" and "refine" in config:
        _check_refine(config, where)
    if family == "pipeline":
        _check_layout(config, where)
    return config


def _check_layout(config, where: str):
    """A GAN decoder that reads layouts (`model.layout`) needs the `layout` stage that draws
    them for prompts, and that stage is of use only to such a decoder."""
    last = "refine" if "refine" in config else "decoder"
    reads = (config.decoder.family == "gan"
             and bool(stage_config(config, last).model.get("layout", False)))
    if reads and "layout" not in config:
        raise ConfigError(f"{where}{last}.model.layout=True needs a layout stage (a `layout` "
                          "block, as configs/shapes_gan_layout.py has) to draw the prompts' "
                          "layouts")
    if "layout" in config and not reads:
        raise ConfigError(f"{where}the layout stage's layouts would be read by no decoder: set "
                          f"{last}.model.layout=True, or drop the layout block")


def _merged(config, name: str, spec: Stage) -> ml_collections.ConfigDict:
    """Stage `name`'s fields over those of the stage it is based on (a copy)."""
    base = config[spec.based_on].to_dict()
    for key in NOT_INHERITED:
        base.pop(key, None)

    def merge(into, over):
        for k, v in over.items():
            into[k] = merge(dict(into[k]), v) if isinstance(v, dict) and isinstance(
                into.get(k), dict) else v
        return into
    return ml_collections.ConfigDict(merge(base, config[name].to_dict()))


def stage_config(config, name: str) -> ml_collections.ConfigDict:
    """A pipeline stage's whole config: for a stage based on another (`refine` on `decoder`),
    its fields over that one's, checked by its family's schema."""
    spec = SCHEMAS[config.family][name]
    if not spec.based_on:
        return config[name]
    merged = _merged(config, name, spec)
    _check_block(merged, SCHEMAS[merged.family], f"{name}.", "")
    return merged


# Model fields the refine stage may set apart from the decoder's: they add layers that read
# the caption or its layout (new, started as the identity: `train.gan.GANTask.init_params`)
# or say how often those are hidden from them; every other weight is the decoder's.
REFINE_MAY_ADD = ("model.cross_attention_res", "model.text_reader_layers",
                  "model.caption_to_w", "model.text_drop_prob", "model.layout",
                  "model.layout_drop_prob", "model.layout_lr_mul",
                  "model.layout_modulate")


def _check_refine(config, where: str):
    """The `refine` stage fine-tunes the decoder stage's generator: a GAN decoder of the same
    shape (but for caption layers it may add: REFINE_MAY_ADD), started from nothing else."""
    if config.decoder.family != "gan":
        raise ConfigError(f"{where}refine fine-tunes a GAN decoder; decoder.family is "
                          f"{config.decoder.family}: drop the refine block")
    for key in NOT_INHERITED:
        if config.refine.get(key):
            raise ConfigError(f"{where}refine.{key} cannot be set: the refine stage starts from "
                              "the decoder stage's generator")
    refine_config = stage_config(config, "refine")
    decoder, refine = (_shape_of(json.loads(c.to_json_best_effort()))
                       for c in (config.decoder, refine_config))
    # Where the decoder already reads layouts, its layout inputs are trained weights, which a
    # learning-rate multiplier (applied at run time) would rescale and a refine without
    # their modulation would drop.
    if config.decoder.model.get("layout", False):
        for key, default in (("layout_lr_mul", 1.0), ("layout_modulate", False)):
            a, b = (c.model.get(key, default) for c in (config.decoder, refine_config))
            if a != b:
                raise ConfigError(f"{where}refine.model.{key}={b} differs from decoder.model."
                                  f"{key}={a}: the decoder's layout inputs are trained; set "
                                  f"refine.model.{key}={a}")
    for key in sorted(set(decoder) | set(refine)):
        if key in REFINE_MAY_ADD:
            continue
        if decoder.get(key) != refine.get(key):
            raise ConfigError(f"{where}refine.{key}={_short(refine.get(key))} differs from "
                              f"decoder.{key}={_short(decoder.get(key))}: the refine stage "
                              "fine-tunes the decoder's generator")


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # A bare word is a string: `model.variant=tiny`.


def _coerce(key: str, old, new):
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
        raise ConfigError(f"{key} must be a bool (True/False), got {new!r}")
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return type(old)(new)
    if not isinstance(new, type(old)):
        raise ConfigError(f"{key} must be {type(old).__name__}, got {_short(new)} "
                          f"({type(new).__name__})")
    return new


def _optional_field(config, key: str) -> bool:
    """Whether `key` names an optional field of the schema that `config` leaves out (it may
    then be set by an override, e.g. `clip.import_from=DIR` or `nan_guard.action=stop`)."""
    is_block = lambda node: isinstance(node, ml_collections.ConfigDict)
    node = config
    schema = SCHEMAS.get(node.get("family")) if is_block(node) else None
    *parents, leaf = key.split(".")
    for p in parents:
        spec = schema.get(p) if isinstance(schema, dict) else None
        based = isinstance(spec, Stage) and spec.based_on
        if based and is_block(node) and is_block(node.get(p)):
            node = _merged(node, p, spec)  # a field it inherits is one of its own
        else:
            node = node.get(p) if is_block(node) else None
        if isinstance(spec, Stage):
            schema = SCHEMAS.get(node.get("family")) if is_block(node) else None
        else:
            schema = spec.fields if isinstance(spec, Block) else spec
    spec = schema.get(leaf) if isinstance(schema, dict) else None
    return isinstance(spec, Field) and not spec.required


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
    config = copy.deepcopy(config)  # the caller's stays as it was, nested blocks too
    valid = flat_keys(config)
    for name, spec in SCHEMAS.get(config.get("family"), {}).items():
        if isinstance(spec, Stage) and spec.based_on and name in config:  # the inherited too
            valid += [f"{name}.{k}" for k in flat_keys(_merged(config, name, spec))
                      if f"{name}.{k}" not in valid]
    for item in overrides:
        item = item[len("--config."):] if item.startswith("--config.") else item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; valid keys: "
                              + ", ".join(valid))
        key, text = item.split("=", 1)
        if key not in valid and not _optional_field(config, key):
            raise ConfigError(f"unknown config key {key!r}; valid keys: " + ", ".join(valid))
        node = config
        *parents, leaf = key.split(".")
        with config.unlocked():
            for p in parents:
                if p not in node:  # an optional block the config leaves out
                    node[p] = ml_collections.ConfigDict()
                node = node[p]
        with node.unlocked():
            old = node[leaf] if leaf in node else None
            node[leaf] = _coerce(key, old, _parse_value(text))
    return config


# ---- workdirs ---------------------------------------------------------------------------------

def saved_meta(run_dir: str) -> dict | None:
    """The meta JSON of the newest checkpoint in `run_dir/checkpoints` that has a readable one
    (Orbax writes the "meta" item of step N to checkpoints/N/meta/metadata); None if none."""
    directory = os.path.join(run_dir, "checkpoints")
    try:
        steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)
    except OSError:
        return None
    for step in steps:
        try:
            with open(os.path.join(directory, str(step), "meta", "metadata"), "rb") as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            continue  # half-written or damaged: the checkpoint layer decides what to do
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return meta
    return None


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fields_of(config: dict, fields) -> dict:
    """The flat `a.b.c` values of a config (as a dict) under the dotted `fields`."""
    return {k: v for k, v in _flat(config).items()
            if any(k == f or k.startswith(f + ".") for f in fields)}


def _shape_of(config: dict) -> dict:
    return fields_of(config, SHAPE_FIELDS)


def _check_run(config, run_dir: str, what: str):
    meta = saved_meta(run_dir)
    if meta is None:
        return
    saved = _shape_of(meta["config"])
    wanted = _shape_of(json.loads(config.to_json_best_effort()))
    saved = {**{k: v for k, v in LATER_FIELD_DEFAULTS.items() if k in wanted}, **saved}
    if saved.get("family") != wanted.get("family"):
        raise ConfigError(f"{run_dir} holds a {saved.get('family')} run, not the "
                          f"{wanted.get('family')} run this config trains: give {what} its own "
                          "--workdir")
    changed = [f"{k} {_short(saved.get(k))} -> {_short(wanted.get(k))}"
               for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if changed:
        raise ConfigError(f"{run_dir} holds a model of another shape (checkpoint -> this config: "
                          f"{', '.join(changed)}); a run resumes only with the same shape: use "
                          "another --workdir or the run's own config")


def check_workdir(config: ml_collections.ConfigDict, workdir: str):
    """Raises ConfigError if `workdir` cannot hold this config's run: a file, a pipeline's
    workdir for a one-model config or the reverse, another family, or checkpoints of a model
    of another shape (their saved config says which field differs). Writes nothing."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory")
    stages = [k for k, v in SCHEMAS.get(config.family, {}).items() if isinstance(v, Stage)]
    if stages:
        meta = saved_meta(workdir)
        if meta is not None:
            raise ConfigError(f"{workdir} holds a {meta.get('family')} run, not a "
                              f"{config.family}'s: give the {config.family} its own --workdir")
        for stage in stages:
            if stage in config:
                _check_run(stage_config(config, stage), os.path.join(workdir, stage),
                           f"the {stage} stage")
        return
    pipeline_stages = {k for s in SCHEMAS.values() for k, v in s.items() if isinstance(v, Stage)}
    if os.path.isfile(os.path.join(workdir, "model.npz")) or any(
            os.path.isdir(os.path.join(workdir, s, "checkpoints")) for s in pipeline_stages):
        raise ConfigError(f"{workdir} holds a pipeline run (one directory per stage), not a "
                          f"{config.family} run: give this run its own --workdir")
    _check_run(config, workdir, f"this {config.family} run")
