"""A trained pipeline in one file: the configs, the parameters and a format version.

The file is a NumPy `.npz` read with `allow_pickle=False`, so loading one never runs code from
it. Entry `__meta__` is UTF-8 JSON: {"format_version", "configs", "dtypes", "sparse"}; every
other entry is one parameter array under its '/'-joined path. bfloat16 arrays are stored as
their uint16 bit patterns (`dtypes` names the real type).

Sparse rows: a token-embedding table holds a row for each of CLIP's 49,408 tokens, but a model
trained on a small vocabulary (shapes) has only ever moved the rows of the tokens it saw; the
others are still their random initial values, which carry no meaning. `export(...,
keep_rows={path: ids})` stores just those rows, and loading puts zeros in the others, so the
shipped shapes model is a few MB instead of 25. `known_tokens(meta, path)` lists the ids kept,
so the Pipeline can warn about words the model never saw.
"""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np

FORMAT_VERSION = 1
# The configs a pipeline of each generator needs (dalle_jax.pipeline builds its models from them).
SECTIONS = {"gan": ("clip", "prior", "decoder"), "unclip": ("clip", "prior", "decoder")}


class BundleError(ValueError):
    """A missing, foreign or corrupt model file. Its message is one line, for the user."""


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, path))
        else:
            out[path] = np.asarray(jax.device_get(v))
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def export(path: str, configs: dict, params: dict, dtype: str = "float32",
           keep_rows: dict[str, np.ndarray] | None = None):
    """Writes `params` (a nested dict of arrays) and `configs` (JSON-able) to `path`."""
    flat = _flatten(params)
    arrays, dtypes, sparse = {}, {}, {}
    for k, v in flat.items():
        if keep_rows and k in keep_rows:
            ids = np.asarray(sorted(set(int(i) for i in keep_rows[k])), np.int32)
            sparse[k] = {"rows": int(v.shape[0])}
            arrays[f"{k}#ids"] = ids
            v = v[ids]
        if v.dtype.kind == "f" and dtype == "bfloat16":
            v = v.astype(ml_dtypes.bfloat16)
        dtypes[k] = str(v.dtype)
        arrays[k] = v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v
    meta = {"format_version": FORMAT_VERSION, "configs": configs, "dtypes": dtypes,
            "sparse": sparse}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = f"{path}.tmp.npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:  # no half-written file left beside the model (a full disk, ^C)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _describe_directory(path: str) -> str:
    """Why a directory is not a model file, in the user's terms (one line)."""
    from dalle_jax.config import saved_meta
    meta = saved_meta(path)
    if meta is not None:
        return (f"{path} is a {meta.get('family')} training run, not a text-to-image model: "
                "give the model.npz that a pipeline run (train.py --config "
                "configs/shapes_gan.py) writes in its workdir")
    if any(os.path.isdir(os.path.join(path, s, "checkpoints")) for s in ("clip", "prior",
                                                                          "decoder")):
        return (f"{path} is a pipeline run with no model.npz yet: train.py writes it when the "
                "last stage finishes (rerun the same command to finish)")
    if os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        return (f"{path} is one step of a training checkpoint, not a model file: give the "
                "model.npz in the run's workdir")
    return f"{path} is a directory, not a model file"


def load(path: str) -> tuple[dict, dict]:
    """(meta, params as float32 numpy arrays). `path` is a model file or a training workdir
    holding one (model.npz). Raises BundleError with one line."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model.npz")):
            raise BundleError(_describe_directory(path))
        path = os.path.join(path, "model.npz")
    if not os.path.isfile(path):
        raise BundleError(f"no model file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "__meta__" not in f.files:
                raise BundleError(f"{path} is not a dalle_jax model (no __meta__ entry)")
            meta = json.loads(bytes(f["__meta__"]).decode())
            if not isinstance(meta, dict):
                raise BundleError(f"{path} is not a dalle_jax model (__meta__ is not an object)")
            if meta.get("format_version") != FORMAT_VERSION:
                raise BundleError(f"{path} has model format {meta.get('format_version')}; this "
                                  f"dalle_jax reads format {FORMAT_VERSION}")
            if not all(isinstance(meta.get(k), dict) for k in ("configs", "dtypes", "sparse")):
                raise BundleError(f"{path} is not a dalle_jax model (its __meta__ entry lacks "
                                  "configs, dtypes or sparse)")
            generator = meta["configs"].get("generator", "gan")
            missing = [s for s in SECTIONS.get(generator, ()) if
                       not isinstance(meta["configs"].get(s), dict)]
            if missing:
                raise BundleError(f"{path} is not a whole {generator} pipeline: no "
                                  f"{', '.join(missing)} config")
            flat = {}
            for k, dt in meta["dtypes"].items():
                v = f[k]
                if dt == "bfloat16":
                    v = v.view(ml_dtypes.bfloat16)
                v = v.astype(np.float32) if v.dtype.kind == "f" or dt == "bfloat16" else v
                if k in meta["sparse"]:
                    full = np.zeros((meta["sparse"][k]["rows"], *v.shape[1:]), v.dtype)
                    full[f[f"{k}#ids"]] = v
                    meta["sparse"][k]["ids"] = f[f"{k}#ids"].tolist()
                    v = full
                flat[k] = v
    except BundleError:
        raise
    except Exception as e:  # zip, JSON, key and dtype errors all mean: not a usable file
        raise BundleError(f"cannot read model file {path}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
    return meta, _unflatten(flat)


def known_tokens(meta: dict, path: str) -> set[int] | None:
    """Token ids whose embedding rows were kept (None: all of them)."""
    sparse = meta.get("sparse", {}).get(path)
    return None if sparse is None else set(sparse["ids"])


def convert(src: str, dst: str, dtype: str = "bfloat16"):
    """Rewrites a model file with its floating-point arrays in `dtype` (sparse rows kept)."""
    meta, params = load(src)
    keep = {k: np.asarray(v["ids"]) for k, v in meta.get("sparse", {}).items()}
    export(dst, meta["configs"], params, dtype, keep)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(prog="python -m dalle_jax.bundle",
                                     description="Rewrite a model file in another precision.")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    try:
        convert(args.src, args.dst, args.dtype)
    except BundleError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.dst}: {e.strerror or e}")
    print(f"{args.dst}: {os.path.getsize(args.dst) / 2 ** 20:.1f} MiB")
