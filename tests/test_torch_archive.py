"""Reading PyTorch files without PyTorch: equal to torch.load, and safe against hostile pickles."""

import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from dalle_jax import torch_archive as ta

# torch 2.13 deprecates torch.jit, which the reference files are written with.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:torch.tensor results are registered")]


def _write_archive(path, payload: bytes, storages=None, byteorder="little", script=False):
    """A zip laid out as torch.save writes it (archive/data.pkl, archive/data/<key>, ...)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", byteorder)
        z.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        if script:
            z.writestr("archive/code/__torch__.py", "class M(Module):\n  pass\n")
            z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    return str(path)


def _rebuild_tensor_v2(*args):  # pickled under this module's name, renamed to torch's below
    raise AssertionError("never called")


class _Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class FloatStorage:  # pickled under this module's name, renamed to torch's below
    pass


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, {})

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


def _torch_like_pickle(obj) -> bytes:
    """A pickle of `obj` naming torch's globals, written without torch."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", FloatStorage, o.key, "cpu", o.numel)
            return None
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    here = b"c" + __name__.encode() + b"\n"
    return (buf.getvalue()
            .replace(here + b"_rebuild_tensor_v2\n", b"ctorch._utils\n_rebuild_tensor_v2\n")
            .replace(here + b"FloatStorage\n", b"ctorch\nFloatStorage\n"))


class _RunsCode:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("script", [False, True])
def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, script):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _RunsCode(f"touch {marker}")}, protocol=2)
    path = _write_archive(tmp_path / "evil.pt", payload, script=script)
    with pytest.raises(ta.UnsafeFileError, match=r"refused to load global (posix|os|nt)\.system"):
        ta.load(path)
    assert not marker.exists()
    # The same pickle really would have run the command: proof the test is meaningful.
    pickle.loads(payload)
    assert marker.exists()


def test_module_pickles_and_builtins_are_refused(tmp_path):
    payload = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    with pytest.raises(ta.UnsafeFileError, match="builtins.eval"):
        ta.load(_write_archive(tmp_path / "eval.pt", payload))
    # TorchScript class names are accepted only in TorchScript archives.
    payload = b"\x80\x02c__torch__.m\nM\n)\x81}b."
    with pytest.raises(ta.UnsafeFileError, match="__torch__.m.M"):
        ta.load(_write_archive(tmp_path / "s.pt", payload))
    assert isinstance(ta.read(_write_archive(tmp_path / "s2.pt", payload, script=True)),
                      ta.ScriptObject)


def test_views_are_bounds_checked_and_byte_order_honoured(tmp_path):
    values = np.arange(6, dtype=np.float32)
    ok = _Tensor(_Storage("0", 6), 1, (2, 2), (1, 2))  # elements 1, 3 / 2, 4
    path = _write_archive(tmp_path / "be.pt", _torch_like_pickle({"x": ok}),
                          {"0": values.astype(">f4").tobytes()}, byteorder="big")
    np.testing.assert_array_equal(ta.load(path)["x"], [[1, 3], [2, 4]])
    bad_views = [((2, 3), (3, 1), 1),        # runs past the end
                 ((7,), (1,), 0),              # longer than the storage
                 ((2,), (-1,), 3),             # negative stride
                 ((10 ** 6, 10 ** 6), (0, 0), 0)]  # a 1e12-element broadcast of 6 floats
    for size, stride, offset in bad_views:
        bad = _Tensor(_Storage("0", 6), offset, size, stride)
        path = _write_archive(tmp_path / "oob.pt", _torch_like_pickle({"x": bad}),
                              {"0": values.tobytes()})
        with pytest.raises(ta.TorchArchiveError):
            ta.load(path)
    # A storage file shorter than its declared size.
    path = _write_archive(tmp_path / "short.pt", _torch_like_pickle({"x": ok}),
                          {"0": values[:3].tobytes()})
    with pytest.raises(ta.TorchArchiveError, match="holds 12 bytes, needs 24"):
        ta.load(path)


def test_not_torch_files_give_one_line_errors(tmp_path):
    with pytest.raises(ta.TorchArchiveError, match="no such file"):
        ta.load(str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ta.TorchArchiveError, match="not a PyTorch file"):
        ta.load(str(tmp_path / "text.pt"))
    path = _write_archive(tmp_path / "trunc.pt", pickle.dumps({"a": 1}, protocol=2)[:-3])
    with pytest.raises(ta.TorchArchiveError, match="cannot read archive/data.pkl"):
        ta.load(path)


def _state(torch):
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3),
                                 torch.nn.Linear(4, 5))
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    return {
        "model": module.state_dict(),
        "half": torch.randn(3, 2).half(),
        "bf16": torch.randn(5).bfloat16(),
        "ints": torch.tensor([1, -2, 3], dtype=torch.int32),
        "bytes": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "long": torch.tensor(2 ** 40),
        "transposed": base.t(),            # non-contiguous view
        "window": base[1:3, 2:5],          # offset and strides into a shared storage
        "base": base,
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "nested": [torch.ones(2), {"deep": torch.zeros(1, 2)}],
        "step": 7,
    }


def _to_numpy(torch, t):
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def test_torch_save_files_equal_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    state = _state(torch)
    path = str(tmp_path / "state.pt")
    torch.save(state, path)
    ours = ta.load(path)
    expected = {}

    def walk(tree, prefix):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for k, v in items:
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, torch.Tensor):
                expected[name] = _to_numpy(torch, v)
            elif isinstance(v, (dict, list)):
                walk(v, name)
    walk(torch.load(path), "")
    assert list(ours) == list(expected)
    assert "model.1.num_batches_tracked" in ours
    for name, want in expected.items():
        assert ours[name].dtype == want.dtype and ours[name].shape == want.shape, name
        np.testing.assert_array_equal(ours[name], want, err_msg=name)
    assert ours["long"] == 2 ** 40
    assert ours["bf16"].dtype == ml_dtypes.bfloat16
    # The raw tree keeps the non-tensor entries.
    assert ta.read(path)["step"] == 7


def test_legacy_format_is_refused_with_a_clear_message(tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "legacy.pt")
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ta.TorchArchiveError, match="legacy"):
        ta.load(path)


class _Scripted:
    """Defined in a file so that torch.jit.script can read its source."""

    @staticmethod
    def module(torch):
        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
                self.norm = torch.nn.BatchNorm2d(4)
                self.head = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
                self.register_buffer("scale", torch.tensor([0.5, 2.0]).half())

            def forward(self, x):
                y = self.norm(self.conv(x)).mean((2, 3))
                return self.head(y) * self.scale.float() + torch.tensor([1.0, 2.0])
        return Block()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archives_equal_their_state_dict(tmp_path, how):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = _Scripted.module(torch).eval()
    with torch.no_grad():
        module.norm.running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 5, 5)
    jitted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, x)
    path = str(tmp_path / f"{how}.pt")
    torch.jit.save(jitted, path)
    ours = ta.load(path, constants=True)
    state = torch.jit.load(path).state_dict()
    assert set(state) <= set(ours)
    for name, value in state.items():
        np.testing.assert_array_equal(ours[name], _to_numpy(torch, value), err_msg=name)
    if how == "trace":  # the traced constant torch.tensor([1., 2.]) lands in constants.pkl
        assert any(np.array_equal(v, [1.0, 2.0]) for k, v in ours.items()
                   if k.startswith("constants."))
    tree = ta.read(path)
    assert isinstance(tree, ta.ScriptObject) and isinstance(tree["head"], ta.ScriptObject)
