"""Importing published CLIP weights: parity with the reference implementations, file formats,
the command, and the round trip into a pipeline as the frozen CLIP.

References, built with random weights (nothing is downloaded): OpenAI's `clip/model.py` from
the `clip-anytorch==2.6.0` wheel, loaded by file path (the package's __init__ would import
torchvision), and transformers' `CLIPModel`. The published shapes B/32, B/16 and L/14 are kept
at their widths, heads and patch sizes with depth cut to 2 layers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os

import jax
import numpy as np
import pytest

from dalle_jax import clip_import, safetensors
from dalle_jax.models import clip
from dalle_jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch")

CAPTIONS = ["a photo of a dog", "a large red circle in the top left of a white background"]
MEAN = np.asarray(clip_import.OPENAI_MEAN, np.float32)
STD = np.asarray(clip_import.OPENAI_STD, np.float32)
# A tiny CLIP for the file-format and round-trip tests (heads by OpenAI's width / 64 rule).
TINY = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_heads=1,
            text_width=64, text_heads=1)


# ---- references -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _openai_module():
    try:
        path = importlib.metadata.distribution("clip-anytorch").locate_file("clip/model.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the reference needs: pip install --no-deps clip-anytorch==2.6.0")
    spec = importlib.util.spec_from_file_location("_clip_reference_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _perturb(model, seed):
    """Random weights everywhere: LayerNorm scales and biases start at 1 and 0, where a
    swapped or dropped mapping would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 and "class_embedding" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def openai_reference(c: dict, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = _openai_module().CLIP(c["embed_dim"], c["image_size"], layers, c["vision_width"],
                                  c["patch_size"], 77, 49408, c["text_width"], c["text_heads"],
                                  layers)
    return _perturb(model, seed)


def hf_reference(c: dict, layers: int = 2, seed: int = 0, act: str = "quick_gelu"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=c["text_width"], intermediate_size=4 * c["text_width"],
                         num_attention_heads=c["text_heads"], num_hidden_layers=layers,
                         max_position_embeddings=77, vocab_size=49408, hidden_act=act,
                         eos_token_id=49407),
        vision_config=dict(hidden_size=c["vision_width"], intermediate_size=4 * c["vision_width"],
                           num_attention_heads=c["vision_heads"], num_hidden_layers=layers,
                           image_size=c["image_size"], patch_size=c["patch_size"],
                           hidden_act=act),
        projection_dim=c["embed_dim"])
    return _perturb(transformers.CLIPModel(config), seed)


def _inputs(image_size: int, seed: int = 0):
    images01 = np.random.default_rng(seed).random((2, image_size, image_size, 3), np.float32)
    return images01, Tokenizer()(CAPTIONS, context_length=77)


def reference_embeds(model, images01, tokens):
    """Unnormalised (image, text) embeddings of either reference, on normalised pixels."""
    pixels = torch.from_numpy(((images01 - MEAN) / STD).transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            return (model.get_image_features(pixel_values=pixels).pooler_output.numpy(),
                    model.get_text_features(input_ids=ids).pooler_output.numpy())
        return model.encode_image(pixels).numpy(), model.encode_text(ids).numpy()


@functools.lru_cache(maxsize=None)
def _encoder(variant: str, image_size: int, context_length: int):
    model = clip.CLIP(variant=variant, image_size=image_size, context_length=context_length)
    return jax.jit(lambda p, x, t: model.apply(
        {"params": p}, x, t, method=lambda m, x, t: (m.visual(x)[0], m.text(t)[0])))


def our_embeds(params, config: clip.CLIPConfig, images01, tokens):
    """Unnormalised embeddings of the imported model, on [-1, 1] pixels."""
    fn = _encoder(config.as_variant(), config.image_size, tokens.shape[1])
    return tuple(np.asarray(e) for e in fn(params, 2.0 * images01 - 1.0, tokens))


def assert_parity(ours, reference, tol=1e-4):
    for a, b in zip(ours, reference):
        rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
        assert rel.max() < tol, rel


def check_against(model, params, config):
    images01, tokens = _inputs(config.image_size)
    assert_parity(our_embeds(params, config, images01, tokens),
                  reference_embeds(model, images01, tokens))
    logit_scale = model.logit_scale.detach().numpy()
    np.testing.assert_allclose(params["logit_scale"], logit_scale, rtol=1e-6)


def _published(variant):
    return {k: v for k, v in clip.VARIANTS[variant].items() if k in (
        "embed_dim", "image_size", "patch_size", "vision_width", "vision_heads", "text_width",
        "text_heads")}


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


# ---- parity with the references, published shapes ----------------------------------------


SHAPES = [pytest.param("B/32"), pytest.param("B/16", marks=pytest.mark.slow),
          pytest.param("L/14", marks=pytest.mark.slow)]


@pytest.mark.parametrize("variant", SHAPES)
def test_openai_layout_parity(variant):
    model = openai_reference(_published(variant))
    layout, tensors = clip_import.detect_layout(_state_dict(model))
    assert layout == "openai"
    config = clip_import.infer_config(layout, tensors)
    assert config == clip.CLIPConfig.from_variant(variant, vision_layers=2, text_layers=2)
    check_against(model, clip_import.convert(layout, tensors, config), config)


@pytest.mark.parametrize("variant", SHAPES)
def test_hf_layout_parity(variant):
    model = hf_reference(_published(variant))
    layout, tensors = clip_import.detect_layout(_state_dict(model))
    assert layout == "hf"
    config = clip_import.infer_config(layout, tensors)  # heads by width / 64, as published
    assert config == clip.CLIPConfig.from_variant(variant, vision_layers=2, text_layers=2)
    check_against(model, clip_import.convert(layout, tensors, config), config)


# ---- file formats (a tiny CLIP) -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_openai():
    return openai_reference(TINY, layers=1, seed=1)


def test_torch_save_state_dict_and_training_checkpoint(tiny_openai, tmp_path):
    plain, nested = tmp_path / "ViT-tiny.pt", tmp_path / "epoch_1.pt"
    torch.save(tiny_openai.state_dict(), plain)
    # OpenCLIP's training checkpoints: the state dict under "state_dict", DDP's "module." names.
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in
                                           tiny_openai.state_dict().items()}}, nested)
    for path in (plain, nested):
        params, config, info = clip_import.import_file(str(path))
        assert info["layout"] == "openai" and config.text_heads == 1
        check_against(tiny_openai, params, config)


@pytest.mark.filterwarnings("ignore")  # tracing's TracerWarnings, jit.save's deprecation
def test_torchscript_archive(tiny_openai, tmp_path):
    """OpenAI's release is TorchScript; a traced model's archive holds the same tensors."""
    tokens = _inputs(32)[1]
    traced = torch.jit.trace(tiny_openai, (torch.zeros(1, 3, 32, 32), torch.from_numpy(
        tokens[:1].astype(np.int64))), check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    params, config, _ = clip_import.import_file(str(tmp_path / "ViT-tiny.pt"))
    check_against(tiny_openai, params, config)


def test_openclip_safetensors(tiny_openai, tmp_path):
    pytest.importorskip("safetensors.torch")
    from safetensors.torch import save_file
    half = {k: v.half().contiguous() for k, v in tiny_openai.state_dict().items()}
    save_file(half, tmp_path / "open_clip_model.safetensors")  # float16, as published
    params, config, info = clip_import.import_file(str(tmp_path))
    assert info["source"] == "open_clip_model.safetensors"
    tiny_openai_half = openai_reference(TINY, layers=1, seed=1)
    tiny_openai_half.load_state_dict({k: v.float() for k, v in half.items()})
    check_against(tiny_openai_half, params, config)


def test_hugging_face_directory_with_config(tmp_path):
    """save_pretrained's model.safetensors + config.json: the config supplies head counts that
    width / 64 would get wrong and the exact GELU that OpenAI's QuickGELU would not match."""
    model = hf_reference(dict(TINY, text_heads=2, vision_heads=4), layers=1, seed=2, act="gelu")
    model.save_pretrained(tmp_path)
    params, config, info = clip_import.import_file(str(tmp_path))
    assert (info["layout"], config.text_heads, config.vision_heads, config.activation) == \
        ("hf", 2, 4, "gelu")
    check_against(model, params, config)
    # Without the config the guesses differ, and so do the embeddings.
    wrong = clip_import.import_file(str(tmp_path / "model.safetensors"),
                                    clip_import.Hints(text_heads=1, vision_heads=1,
                                                      activation="quick_gelu"))
    images01, tokens = _inputs(32)
    with pytest.raises(AssertionError):
        assert_parity(our_embeds(wrong[0], wrong[1], images01, tokens),
                      reference_embeds(model, images01, tokens))


# ---- the safetensors reader -------------------------------------------------------------------


def test_safetensors_reader_matches_the_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    import ml_dtypes
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
               "f16": rng.standard_normal((7,)).astype(np.float16),
               "f64": rng.standard_normal((2, 2, 2)),
               "bf16": rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16),
               "i64": rng.integers(-9, 9, (6,)), "u8": rng.integers(0, 255, (3,), np.uint8),
               "bool": rng.random((5,)) > 0.5, "scalar": np.array(3.5, np.float32),
               "empty": np.zeros((0, 4), np.float32)}
    path = str(tmp_path / "t.safetensors")
    st_numpy.save_file(tensors, path, metadata={"format": "np"})
    ours, theirs = safetensors.load(path), st_numpy.load_file(path)
    assert set(ours) == set(theirs) == set(tensors)
    for k in tensors:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        np.testing.assert_array_equal(ours[k], theirs[k])
    assert safetensors.metadata(path) == {"format": "np"}


@pytest.mark.parametrize("damage", ["short", "header_length", "not_json", "offsets", "dtype"])
def test_safetensors_reader_refuses_corrupt_files(tmp_path, damage):
    import json
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    body = np.arange(4, dtype="<f4").tobytes()
    if damage == "offsets":
        header["w"]["data_offsets"] = [0, 32]
    if damage == "dtype":
        header["w"]["dtype"] = "C64"
    raw = json.dumps(header).encode()
    if damage == "not_json":
        raw = b"{" + raw[2:]
    data = len(raw).to_bytes(8, "little") + raw + body
    if damage == "short":
        data = data[:5]
    if damage == "header_length":
        data = (10 ** 9).to_bytes(8, "little") + data[8:]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(safetensors.SafetensorsError) as e:
        safetensors.load(str(path))
    assert "\n" not in str(e.value)


# ---- variant strings ---------------------------------------------------------------------------


def test_variant_strings_name_imported_shapes():
    config = clip.CLIPConfig.from_variant("B/16, vision_layers=2,activation=gelu")
    assert (config.vision_layers, config.text_layers, config.activation) == (2, 12, "gelu")
    assert config.as_variant() == "B/16,vision_layers=2,activation=gelu"
    for name in clip.VARIANTS:
        assert clip.CLIPConfig.from_variant(name, image_size=336).as_variant() == name
    for bad, message in [("B/16,depth=2", "field among"), ("B/16,text_layers", "field=value"),
                         ("B/16,activation=relu", "quick_gelu, gelu"), ("X/1,text_layers=1",
                                                                         "valid: B/32")]:
        with pytest.raises(ValueError, match=message):
            clip.CLIPConfig.from_variant(bad)


# ---- the command and the round trip -------------------------------------------------------


def test_command_refuses_what_is_not_a_clip_checkpoint(tmp_path, capsys):
    st_numpy = pytest.importorskip("safetensors.numpy")
    st_numpy.save_file({"layer.weight": np.zeros((2, 2), np.float32)},
                       str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    resnet = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
              "visual.layer1.0.conv1.weight": torch.zeros(1)}
    torch.save(resnet, tmp_path / "RN50.pt")
    for name, message in [("other.safetensors", "not a CLIP checkpoint"),
                          ("notes.txt", "not a CLIP checkpoint"), ("RN50.pt", "ResNet CLIP"),
                          ("missing.pt", "no such file")]:
        assert clip_import.main([str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_unknown_tensors_are_refused_not_dropped(tiny_openai):
    """An OpenCLIP variant with parts this model lacks (LayerScale here) must not import as a
    different model."""
    tensors = _state_dict(tiny_openai)
    tensors["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(64, np.float32)
    layout, tensors = clip_import.detect_layout(tensors)
    config = clip_import.infer_config(layout, tensors)
    with pytest.raises(clip_import.CLIPImportError, match="does not understand.*ls_1.gamma"):
        clip_import.convert(layout, tensors, config)


def test_round_trip_into_the_pipeline(tiny_openai, tmp_path, capsys):
    """Reference weights -> command -> Orbax checkpoint -> the stages' frozen CLIP -> model
    file -> Pipeline: text and image vectors equal the reference's."""
    from dalle_jax import config as config_lib
    from dalle_jax.pipeline import Pipeline
    from dalle_jax.train import stages

    torch.save(tiny_openai.state_dict(), tmp_path / "ViT-tiny.pt")
    out = str(tmp_path / "clip")
    assert clip_import.main([str(tmp_path / "ViT-tiny.pt"), "--out", out]) == 0
    hint = capsys.readouterr().out.splitlines()[-1]
    overrides = hint.split(": ", 1)[1].split()
    assert f"clip.import_from={out}" in overrides
    # Writing over it is refused.
    assert clip_import.main([str(tmp_path / "ViT-tiny.pt"), "--out", out]) == 2
    assert "not an empty directory" in capsys.readouterr().err

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load(os.path.join(root, "configs", "shapes_gan.py"))
    with config.clip.unlocked():
        config.clip.import_from = ""
    config = config_lib.apply_overrides(config, overrides + ["clip.data.context_length=16"])
    params = stages.frozen_clip(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work" / "clip")  # nothing was trained
    model_file = str(tmp_path / "model.npz")
    stages.export(model_file, config, params, {}, {})
    pipe = Pipeline.load(model_file)

    images01, tokens = _inputs(32)
    ref_image, ref_text = reference_embeds(tiny_openai, images01, tokens)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(pipe.encode_text(CAPTIONS), unit(ref_text), atol=1e-5)
    pictures = np.round(images01 * 255).astype(np.uint8)
    ref_image = reference_embeds(tiny_openai, pictures / np.float32(255), tokens)[0]
    np.testing.assert_allclose(pipe.encode_images(pictures), unit(ref_image), atol=1e-5)

    # A config whose CLIP is not the imported one is one clear line.
    wrong = config_lib.apply_overrides(config, ["clip.model.variant=tiny"])
    with pytest.raises(clip_import.CLIPImportError, match="set clip.model.variant=micro"):
        stages.frozen_clip(wrong, str(tmp_path / "work"))
