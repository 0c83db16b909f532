"""Published CLIP weights (OpenAI, OpenCLIP, Hugging Face) as dalle_jax CLIP parameters.

    python -m dalle_jax.clip_import ViT-B-16.pt --out runs/clip_b16

reads a checkpoint from a local file, runs no code from it, infers the model's shapes from its
tensors, converts the weights to `dalle_jax.models.clip.CLIP`'s parameters and writes them, with
the inferred config, through the project's checkpoint wrapper. A pipeline config then uses them
as its frozen CLIP with `clip.import_from=DIR` (see `dalle_jax.train.stages.frozen_clip`).

Files read:
  .pt / .bin   `torch.save` or `torch.jit.save` archives (OpenAI's release is TorchScript;
               OpenCLIP writes state dicts, training checkpoints nest them under
               "state_dict" with DDP's "module." prefix), via `dalle_jax.torch_archive`.
  .safetensors OpenCLIP (OpenAI layout) or Hugging Face `CLIPModel` files, via
               `dalle_jax.safetensors`. A `config.json` (Hugging Face), `open_clip_config.json`
               or `preprocessor_config.json` beside the file supplies what tensors cannot say:
               head counts, the activation, the pixel normalisation.
Layouts, after OpenAI's `clip/model.py` (MIT) and transformers' `modeling_clip.py` (Apache-2.0):
  OpenAI   visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre,
           visual.transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2,
           mlp.c_fc, mlp.c_proj}, visual.ln_post, visual.proj; token_embedding,
           positional_embedding, transformer.resblocks.N.*, ln_final, text_projection,
           logit_scale. Tensors are used as `x @ proj` (no transpose), Linear weights [out, in].
  HF       vision_model.embeddings.{patch_embedding, class_embedding, position_embedding},
           vision_model.pre_layrnorm (sic), vision_model.encoder.layers.N.{layer_norm1,
           self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}, post_layernorm,
           visual_projection; text_model.{embeddings, encoder, final_layer_norm},
           text_projection, logit_scale.
Shapes follow OpenAI's `build_model`: widths, patch size, grid (so image size), context length,
vocabulary and embedding size from tensor shapes; layers by counting blocks; heads from
width / 64 unless a config file or the caller says otherwise.

Pixels: dalle_jax's image tower takes pictures in [-1, 1]; published models take
(x01 - mean) / std per channel. Since the patch embedding is linear and bias-free, that
normalisation is folded into it exactly: the kernel is scaled by 1 / (2 std) and the constant
term, the same for every patch, joins the patch tokens' positional embedding. An imported CLIP
therefore reads [-1, 1] pictures like every other model here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import safetensors, torch_archive
from dalle_jax.checkpoint import CheckpointError, Checkpointer
from dalle_jax.models import clip as clip_lib

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # clip/clip.py, _transform
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
VOCAB_SIZE = 49408  # the tokenizer's; a model with another vocabulary cannot read its ids
FAMILY = "clip_import"
# Tensors that carry no weights: causal masks, position id ranges, OpenAI's size constants.
_IGNORED = re.compile(r"(^|\.)(attn_mask|position_ids|input_resolution|context_length|"
                      r"vocab_size)$")
_ANCHORS = {"openai": "visual.conv1.weight",
            "hf": "vision_model.embeddings.patch_embedding.weight"}
_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin", "pytorch_model.bin")


class CLIPImportError(ValueError):
    """A file that is not a CLIP checkpoint this importer reads. One line, for the user."""


@dataclasses.dataclass(frozen=True)
class Hints:
    """What tensor shapes cannot say. None: from a side file, else OpenAI's convention."""
    text_heads: int | None = None
    vision_heads: int | None = None
    activation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


# ---- reading files ------------------------------------------------------------------------


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """A checkpoint file's tensors by name (PyTorch zip archive or safetensors)."""
    if not os.path.isfile(path):
        raise CLIPImportError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        try:
            return torch_archive.load(path)
        except torch_archive.TorchArchiveError as e:
            raise CLIPImportError(str(e)) from e
    try:
        return safetensors.load(path)
    except safetensors.SafetensorsError as e:
        if path.endswith(".safetensors"):
            raise CLIPImportError(str(e)) from e
        raise CLIPImportError(f"{path} is not a CLIP checkpoint (neither a PyTorch archive nor "
                              "a safetensors file)") from e


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIPImportError(f"cannot read {path}: {type(e).__name__}") from e
    return value if isinstance(value, dict) else {}


def side_hints(directory: str) -> Hints:
    """Head counts, activation and pixel normalisation from config files in `directory`."""
    found = {}
    hf = os.path.join(directory, "config.json")
    if os.path.isfile(hf):
        config = _read_json(hf)
        text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
        if config.get("model_type") == "clip" or (text and vision):
            acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
            if len(acts) > 1:
                raise CLIPImportError(f"{hf}: the towers use different activations {sorted(acts)}"
                                      "; dalle_jax's CLIP uses one")
            eps = {text.get("layer_norm_eps", 1e-5), vision.get("layer_norm_eps", 1e-5)}
            if eps != {1e-5}:
                raise CLIPImportError(f"{hf}: layer_norm_eps {sorted(eps)} is not CLIP's 1e-5")
            found.update(activation=acts.pop(), text_heads=text.get("num_attention_heads"),
                         vision_heads=vision.get("num_attention_heads"))
    oc = os.path.join(directory, "open_clip_config.json")
    if os.path.isfile(oc):
        config = _read_json(oc)
        model = config.get("model_cfg") or {}
        found["activation"] = "quick_gelu" if model.get("quick_gelu") else "gelu"
        text, vision = model.get("text_cfg") or {}, model.get("vision_cfg") or {}
        if "heads" in text:
            found["text_heads"] = text["heads"]
        if "width" in vision and "head_width" in vision:
            found["vision_heads"] = vision["width"] // vision["head_width"]
        pre = config.get("preprocess_cfg") or {}
        if "mean" in pre and "std" in pre:
            found.update(mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    pre = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(pre):
        config = _read_json(pre)
        if "image_mean" in config and "image_std" in config:
            found.update(mean=tuple(config["image_mean"]), std=tuple(config["image_std"]))
    return Hints(**found)


def locate(src: str) -> str:
    """The weights file: `src` itself, or the known file name inside a directory."""
    if os.path.isdir(src):
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(src, name)):
                return os.path.join(src, name)
        raise CLIPImportError(f"{src} holds none of {', '.join(_WEIGHT_FILES)}")
    return src


# ---- layout, shapes -----------------------------------------------------------------------


def detect_layout(tensors: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    """("openai" | "hf", the tensors with any wrapping prefix such as "state_dict.module."
    removed). Raises CLIPImportError for anything else."""
    if any(re.search(r"(^|\.)visual\.layer1\.", k) for k in tensors):
        raise CLIPImportError("a ResNet CLIP (visual.layer1...) cannot be imported: dalle_jax's "
                              "image tower is a ViT")
    for layout, anchor in _ANCHORS.items():
        for key in tensors:
            if key == anchor or key.endswith("." + anchor):
                prefix = key[: len(key) - len(anchor)]
                return layout, {k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix)}
    example = ", ".join(list(tensors)[:3]) or "no tensors"
    raise CLIPImportError(f"not a CLIP checkpoint: no {' or '.join(_ANCHORS.values())} "
                          f"(found {example})")


def _count_blocks(tensors, pattern: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise CLIPImportError(f"transformer blocks {sorted(found)} are not numbered 0..N-1")
    return len(found)


def _heads(width: int, given: int | None, what: str) -> int:
    heads = given or width // 64
    if heads < 1 or width % heads:
        raise CLIPImportError(f"{what} width {width} does not split into {heads} heads")
    return int(heads)


def infer_config(layout: str, tensors: dict[str, np.ndarray], hints: Hints = Hints()
                 ) -> clip_lib.CLIPConfig:
    """The model's shapes from its tensors, like OpenAI's `build_model`."""
    t = _Tensors(tensors)
    if layout == "openai":
        conv = t.shape("visual.conv1.weight", 4)
        pos = t.shape("visual.positional_embedding", 2)
        embed_dim = t.shape("text_projection", 2)[1]
        text_width = t.shape("ln_final.weight", 1)[0]
        context = t.shape("positional_embedding", 2)[0]
        vocab = t.shape("token_embedding.weight", 2)[0]
        vision_layers = _count_blocks(tensors, r"visual\.transformer\.resblocks\.(\d+)\.")
        text_layers = _count_blocks(tensors, r"transformer\.resblocks\.(\d+)\.")
    else:
        conv = t.shape("vision_model.embeddings.patch_embedding.weight", 4)
        pos = t.shape("vision_model.embeddings.position_embedding.weight", 2)
        embed_dim = t.shape("visual_projection.weight", 2)[0]
        text_width = t.shape("text_model.final_layer_norm.weight", 1)[0]
        context = t.shape("text_model.embeddings.position_embedding.weight", 2)[0]
        vocab = t.shape("text_model.embeddings.token_embedding.weight", 2)[0]
        vision_layers = _count_blocks(tensors, r"vision_model\.encoder\.layers\.(\d+)\.")
        text_layers = _count_blocks(tensors, r"text_model\.encoder\.layers\.(\d+)\.")
    vision_width, channels, patch, patch_w = conv
    grid = round((pos[0] - 1) ** 0.5)
    if channels != 3 or patch != patch_w or grid * grid + 1 != pos[0] or pos[1] != vision_width:
        raise CLIPImportError(f"unsupported image tower: patch embedding {list(conv)}, "
                              f"positional embedding {list(pos)}")
    if vocab != VOCAB_SIZE:
        raise CLIPImportError(f"the text vocabulary has {vocab} tokens, not CLIP's {VOCAB_SIZE}; "
                              "dalle_jax's tokenizer could not feed it")
    activation = hints.activation or "quick_gelu"
    if activation not in clip_lib.ACTIVATIONS:
        raise CLIPImportError(f"unsupported activation {activation!r}; valid: "
                              f"{', '.join(clip_lib.ACTIVATIONS)}")
    return clip_lib.CLIPConfig(
        embed_dim=int(embed_dim), image_size=int(patch * grid), patch_size=int(patch),
        vision_width=int(vision_width), vision_layers=vision_layers,
        vision_heads=_heads(vision_width, hints.vision_heads, "image tower"),
        context_length=int(context), vocab_size=int(vocab), text_width=int(text_width),
        text_layers=text_layers, text_heads=_heads(text_width, hints.text_heads, "text tower"),
        activation=activation)


class _Tensors:
    """Takes tensors by name as float32, remembering which were used."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.used = tensors, set()

    def shape(self, key: str, ndim: int) -> tuple[int, ...]:
        if key not in self.tensors:
            raise CLIPImportError(f"unsupported CLIP layout: no tensor {key}")
        shape = tuple(self.tensors[key].shape)
        if len(shape) != ndim:
            raise CLIPImportError(f"tensor {key} has shape {list(shape)}, expected {ndim} axes")
        return shape

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise CLIPImportError(f"unsupported CLIP layout: no tensor {key}")
        self.used.add(key)
        return np.asarray(self.tensors[key], dtype=np.float32)

    def linear(self, key: str) -> dict[str, np.ndarray]:
        return {"kernel": self(f"{key}.weight").T, "bias": self(f"{key}.bias")}

    def norm(self, key: str) -> dict[str, np.ndarray]:
        return {"scale": self(f"{key}.weight"), "bias": self(f"{key}.bias")}

    def check_all_used(self):
        left = [k for k in self.tensors if k not in self.used and not _IGNORED.search(k)]
        if left:
            raise CLIPImportError(f"unsupported CLIP layout: {len(left)} tensors this importer "
                                  f"does not understand, e.g. {', '.join(left[:3])}")


# ---- conversion ---------------------------------------------------------------------------


def fold_pixel_normalisation(kernel, positional, mean, std):
    """(kernel [p, p, 3, W], positional [N+1, W]) for [-1, 1] pictures, from those of a patch
    embedding that reads (x01 - mean) / std. With x01 = (x + 1) / 2 the input is
    x / (2 std) + (0.5 - mean) / std, and the constant term adds the same vector to each patch."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
        raise CLIPImportError(f"pixel mean {mean.tolist()} / std {std.tolist()} must be three "
                              "numbers each, std positive")
    k = kernel.astype(np.float64)
    offset = np.einsum("hwcd,c->d", k, (0.5 - mean) / std)
    positional = positional.astype(np.float64).copy()
    positional[1:] += offset
    return ((k / (2.0 * std)[None, None, :, None]).astype(np.float32),
            positional.astype(np.float32))


def _block(t: _Tensors, prefix: str, layout: str) -> dict:
    if layout == "openai":
        return {"ln_1": t.norm(f"{prefix}.ln_1"), "ln_2": t.norm(f"{prefix}.ln_2"),
                "attn": {"qkv": {"kernel": t(f"{prefix}.attn.in_proj_weight").T,
                                 "bias": t(f"{prefix}.attn.in_proj_bias")},
                         "out": t.linear(f"{prefix}.attn.out_proj")},
                "c_fc": t.linear(f"{prefix}.mlp.c_fc"), "c_proj": t.linear(f"{prefix}.mlp.c_proj")}
    attn = f"{prefix}.self_attn"
    return {"ln_1": t.norm(f"{prefix}.layer_norm1"), "ln_2": t.norm(f"{prefix}.layer_norm2"),
            "attn": {"qkv": {"kernel": np.concatenate(
                                 [t(f"{attn}.{n}_proj.weight").T for n in "qkv"], axis=1),
                             "bias": np.concatenate([t(f"{attn}.{n}_proj.bias") for n in "qkv"])},
                     "out": t.linear(f"{attn}.out_proj")},
            "c_fc": t.linear(f"{prefix}.mlp.fc1"), "c_proj": t.linear(f"{prefix}.mlp.fc2")}


# Where each layout keeps the pieces that both share.
_NAMES = {
    "openai": dict(conv="visual.conv1.weight", cls="visual.class_embedding",
                   vpos="visual.positional_embedding", ln_pre="visual.ln_pre",
                   ln_post="visual.ln_post", vblock="visual.transformer.resblocks",
                   tok="token_embedding.weight", tpos="positional_embedding",
                   tblock="transformer.resblocks", ln_final="ln_final"),
    "hf": dict(conv="vision_model.embeddings.patch_embedding.weight",
               cls="vision_model.embeddings.class_embedding",
               vpos="vision_model.embeddings.position_embedding.weight",
               ln_pre="vision_model.pre_layrnorm", ln_post="vision_model.post_layernorm",
               vblock="vision_model.encoder.layers",
               tok="text_model.embeddings.token_embedding.weight",
               tpos="text_model.embeddings.position_embedding.weight",
               tblock="text_model.encoder.layers", ln_final="text_model.final_layer_norm"),
}


def convert(layout: str, tensors: dict[str, np.ndarray], config: clip_lib.CLIPConfig,
            mean=OPENAI_MEAN, std=OPENAI_STD) -> dict:
    """dalle_jax CLIP parameters (nested dict of float32 arrays) from a checkpoint's tensors."""
    t, n = _Tensors(tensors), _NAMES[layout]
    try:
        if layout == "openai":  # parameters used as x @ proj
            proj, text_proj = t("visual.proj"), t("text_projection")
        else:  # nn.Linear weights, [out, in]
            proj, text_proj = t("visual_projection.weight").T, t("text_projection.weight").T
        kernel, vpos = fold_pixel_normalisation(t(n["conv"]).transpose(2, 3, 1, 0),
                                                t(n["vpos"]), mean, std)
        visual = {"patch_embedding": {"kernel": kernel}, "class_embedding": t(n["cls"]),
                  "positional_embedding": vpos, "ln_pre": t.norm(n["ln_pre"]),
                  "transformer": {f"block_{i}": _block(t, f"{n['vblock']}.{i}", layout)
                                  for i in range(config.vision_layers)},
                  "ln_post": t.norm(n["ln_post"]), "proj": {"kernel": proj}}
        text = {"token_embedding": {"embedding": t(n["tok"])},
                "positional_embedding": t(n["tpos"]),
                "transformer": {f"block_{i}": _block(t, f"{n['tblock']}.{i}", layout)
                                for i in range(config.text_layers)},
                "ln_final": t.norm(n["ln_final"]), "text_projection": {"kernel": text_proj}}
        # logit_bias serves only the sigmoid loss; files without one get the model's initial
        # value (SigLIP's -10).
        bias = t("logit_bias").reshape(()) if "logit_bias" in tensors else -10.0
        params = {"visual": visual, "text": text, "logit_scale": t("logit_scale").reshape(()),
                  "logit_bias": np.asarray(bias, np.float32)}
    except CLIPImportError:
        raise
    except ValueError as e:  # tensors of mismatched shapes: a corrupt or foreign file
        raise CLIPImportError(f"tensors of the {layout} layout do not fit together: "
                              f"{str(e).splitlines()[0][:160]}") from e
    t.check_all_used()
    _check_shapes(params, config)
    return params


def _check_shapes(params: dict, config: clip_lib.CLIPConfig):
    model = clip_lib.CLIP(variant=config.as_variant(), image_size=config.image_size,
                          context_length=config.context_length)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, config.image_size, config.image_size, 3)),
                              jnp.zeros((1, config.context_length), jnp.int32))["params"]
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    want = jax.tree.map(lambda x: tuple(x.shape), expected)
    if got != want:
        raise CLIPImportError("converted parameters do not fit the inferred model "
                              f"{config.as_variant()} (a layout this importer misreads)")


def import_file(src: str, hints: Hints = Hints()) -> tuple[dict, clip_lib.CLIPConfig, dict]:
    """(params, config, info) from a checkpoint file or a directory holding one. Explicit
    `hints` win over config files found beside the weights."""
    path = locate(src)
    side = side_hints(os.path.dirname(os.path.abspath(path)))
    hints = Hints(**{f.name: getattr(hints, f.name) if getattr(hints, f.name) is not None
                     else getattr(side, f.name) for f in dataclasses.fields(Hints)})
    layout, tensors = detect_layout(read_tensors(path))
    config = infer_config(layout, tensors, hints)
    mean, std = hints.mean or OPENAI_MEAN, hints.std or OPENAI_STD
    params = convert(layout, tensors, config, mean, std)
    info = {"layout": layout, "source": os.path.basename(path), "pixel_mean": list(mean),
            "pixel_std": list(std)}
    return params, config, info


# ---- the checkpoint ------------------------------------------------------------------------


def save(directory: str, params: dict, config: clip_lib.CLIPConfig, info: dict | None = None):
    """Writes the parameters and the config as step 0 of an Orbax checkpoint in `directory`."""
    if os.path.exists(directory) and not (os.path.isdir(directory) and not os.listdir(directory)):
        raise CLIPImportError(f"{directory} exists and is not an empty directory; choose a new "
                              "--out directory")
    checkpointer = Checkpointer(directory, max_to_keep=1, async_save=False)
    meta = {"family": FAMILY, "variant": config.as_variant(), "image_size": config.image_size,
            "context_length": config.context_length, "clip_config": dataclasses.asdict(config),
            **(info or {})}
    checkpointer.save(0, {"params": params}, meta=meta, force=True)
    checkpointer.close()


def restore(directory: str) -> tuple[dict, dict]:
    """(params as NumPy arrays, meta) of a directory written by `save`."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"no imported CLIP at {directory} (not a directory)")
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        state, meta = checkpointer.restore(None)
    finally:
        checkpointer.close()
    if meta.get("family") != FAMILY:
        raise CheckpointError(f"{directory} holds a {meta.get('family')!r} checkpoint, not an "
                              "imported CLIP (python -m dalle_jax.clip_import)")
    return state["params"], meta


def frozen_params(clip_config) -> dict:
    """The imported CLIP named by a stage config's `import_from`, fitted to the config: its
    model must be the imported one; a shorter context keeps the first positions of the text
    positional embedding (the text tower is causal, so later ones never matter)."""
    directory = clip_config.import_from
    params, meta = restore(directory)
    stored = clip_lib.CLIPConfig(**{**meta["clip_config"], **{  # JSON made the tuples lists
        k: tuple(tuple(s) for s in meta["clip_config"].get(k, ())) for k in clip_lib.TUPLE_FIELDS}})
    length = clip_config.data.context_length
    try:
        wanted = clip_lib.CLIPConfig.from_variant(clip_config.model.variant,
                                                  image_size=clip_config.data.image_size,
                                                  context_length=stored.context_length)
    except ValueError:
        wanted = None
    if wanted != stored or not 2 <= length <= stored.context_length:
        raise CLIPImportError(
            f"clip.import_from={directory} holds CLIP {meta['variant']} at "
            f"{stored.image_size} px; set clip.model.variant={meta['variant']} "
            f"clip.data.image_size={stored.image_size} and clip.data.context_length at most "
            f"{stored.context_length}")
    params["text"]["positional_embedding"] = params["text"]["positional_embedding"][:length]
    return params


# ---- command line ---------------------------------------------------------------------------


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dalle_jax.clip_import",
        description="Import published CLIP weights (OpenAI .pt, OpenCLIP .pt/.safetensors, "
        "Hugging Face CLIPModel .safetensors) as a dalle_jax CLIP checkpoint.")
    parser.add_argument("src", help="the weights file, or a directory holding model.safetensors "
                        "/ open_clip_model.safetensors (with its config JSON files)")
    parser.add_argument("--out", required=True, help="a new directory for the checkpoint")
    parser.add_argument("--text-heads", type=int, help="default: config file, else width/64")
    parser.add_argument("--vision-heads", type=int, help="default: config file, else width/64")
    parser.add_argument("--activation", choices=list(clip_lib.ACTIVATIONS),
                        help="default: config file, else quick_gelu (OpenAI's; OpenCLIP "
                        "models not named -quickgelu use gelu)")
    parser.add_argument("--mean", type=_triple, help="pixel mean R,G,B (default OpenAI's)")
    parser.add_argument("--std", type=_triple, help="pixel std R,G,B (default OpenAI's)")
    args = parser.parse_args(argv)
    try:
        params, config, info = import_file(args.src, Hints(
            args.text_heads, args.vision_heads, args.activation, args.mean, args.std))
        save(args.out, params, config, info)
    except (CLIPImportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    variant = config.as_variant()
    print(f"imported {info['layout']} CLIP {variant} ({config.image_size} px, context "
          f"{config.context_length}, {config.embed_dim}-d embeddings, {config.activation}) "
          f"from {args.src} into {args.out}")
    print(f"use it as the frozen CLIP: clip.import_from={os.path.abspath(args.out)} "
          f"clip.model.variant={variant} clip.data.image_size={config.image_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
