"""Reads PyTorch files (`torch.save` and `torch.jit.save` archives) without PyTorch and without
running code from them.

A PyTorch file is a zip archive: `<name>/data.pkl` (a pickle of the saved object) and one raw
little- or big-endian buffer per storage under `<name>/data/<key>` (`<name>/byteorder` says
which). A TorchScript archive has the same layout, plus `code/` (the model's TorchScript
source, never executed here) and `constants.pkl` (tensor constants, storages under
`constants/`). Its pickle rebuilds module objects (`__torch__.<module> <Class>`) from a dict of
attributes: parameters, buffers, submodules and plain values.

Unpickling can call any importable function, so a pickle from an untrusted file is read with
an unpickler whose `find_class` knows only the few globals a tensor needs, mapped to our own
rebuild functions that return NumPy arrays; any other global raises `UnsafeFileError` before
anything is called. TorchScript module classes become inert `ScriptObject`s (a name and a dict).
Tensor views (storage offset and strides) are checked against their storage's size before they
are read, and tensors that share a storage read the one buffer. The pre-1.6 non-zip format is
refused.

Layout facts from PyTorch's `torch/serialization.py` and `torch/_utils.py` (BSD-3-Clause).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["TorchArchiveError", "UnsafeFileError", "ScriptObject", "load", "read",
           "flatten"]


class TorchArchiveError(ValueError):
    """A missing, corrupt or unsupported PyTorch file. Its message is one line, for the user."""


class UnsafeFileError(TorchArchiveError):
    """A pickle that asks for a global outside the tensor whitelist (it could run code)."""


# torch.<Name>Storage -> element dtype. The typed-storage class names are what torch.save still
# writes into each storage's persistent id.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# A view may repeat its storage's elements (stride 0, as torch's expand) at most this many times
# over, so a small file cannot ask for an arbitrarily large array.
MAX_VIEW_REPEAT = 64

# Helpers TorchScript's pickler uses for typed lists and containers; each returns its input.
_SCRIPT_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist",
                         "build_tensorlist", "build_genericlist"}


@dataclass
class ScriptObject:
    """A TorchScript module or class instance as plain data: its qualified class name (e.g.
    `__torch__.torch.nn.modules.conv.Conv2d`) and its attributes in saved order."""
    qualname: str
    attrs: dict = field(default_factory=dict)

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise TorchArchiveError(f"{self.qualname} has state of type {type(state).__name__}, "
                                    "expected a dict of attributes")
        self.attrs.update(state)

    def __getitem__(self, name):
        return self.attrs[name]


@dataclass(frozen=True)
class _StorageRef:
    dtype: np.dtype
    key: str
    numel: int


class _TensorType:
    """Stands for torch.Tensor / torch.nn.Parameter where a pickle names the tensor class."""


def _script_class(qualname: str):
    """A class per TorchScript name, so that the pickle's NEWOBJ (`cls.__new__(cls)`, which
    skips `__init__`) yields a ScriptObject that knows its name."""

    def new(cls, *_args):
        obj = object.__new__(cls)
        ScriptObject.__init__(obj, qualname)
        return obj

    return type("ScriptObject", (ScriptObject,), {"__new__": new,
                                                  "__init__": lambda self, *_args: None})


def _identity(value, *_):
    return value


def _restore_type_tag(value, _type_str):
    return value


def _rebuild_parameter(data, _requires_grad, _backward_hooks, *_state):
    return data


def _rebuild_from_type_v2(func, _new_type, args, _state):
    return func(*args)


class _Unpickler(pickle.Unpickler):
    """Resolves globals against a whitelist and storages against the archive's buffers."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, storage_dir: str,
                 byteorder: str, script: bool, path: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._dir = archive, prefix, storage_dir
        self._byteorder, self._script, self._path = byteorder, script, path
        self._buffers: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if module == "torch._utils" and name in ("_rebuild_parameter",
                                                 "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
            return _TensorType
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            if name not in STORAGE_DTYPES:
                raise TorchArchiveError(f"{self._path}: unsupported tensor type torch.{name}")
            return STORAGE_DTYPES[name]
        if self._script and module == "torch.jit._pickle":
            if name in _SCRIPT_LIST_BUILDERS:
                return _identity
            if name == "restore_type_tag":
                return _restore_type_tag
        if self._script and (module == "__torch__" or module.startswith("__torch__.")):
            return _script_class(f"{module}.{name}")
        raise UnsafeFileError(f"{self._path}: refused to load global {module}.{name} (only "
                              "tensors and plain containers are read from PyTorch files)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], np.dtype) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise TorchArchiveError(f"{self._path}: malformed storage reference {str(pid)[:80]}")
        return _StorageRef(pid[1], pid[2], pid[4])

    def _buffer(self, ref: _StorageRef) -> np.ndarray:
        if ref.key in self._buffers:
            buffer = self._buffers[ref.key]
            if buffer.dtype != ref.dtype or buffer.size < ref.numel:
                raise TorchArchiveError(f"{self._path}: storage {ref.key} is read as two types")
            return buffer
        name = f"{self._prefix}{self._dir}/{ref.key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise TorchArchiveError(f"{self._path}: missing storage {name}") from None
        nbytes = ref.numel * ref.dtype.itemsize
        if info.file_size < nbytes:
            raise TorchArchiveError(f"{self._path}: storage {name} holds {info.file_size} bytes, "
                                    f"needs {nbytes}")
        with self._archive.open(name) as f:
            raw = f.read(nbytes)
        if ref.dtype == np.bool_:
            buffer = np.frombuffer(raw, np.uint8) != 0
        else:
            dtype = ref.dtype.newbyteorder(">" if self._byteorder == "big" else "<")
            buffer = np.frombuffer(raw, dtype).astype(ref.dtype, copy=False)
        self._buffers[ref.key] = buffer
        return buffer

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, *_rest):
        if not isinstance(storage, _StorageRef):
            raise TorchArchiveError(f"{self._path}: a tensor without a storage")
        size, stride = tuple(size), tuple(stride)
        if not (all(isinstance(v, int) for v in (storage_offset, *size, *stride))
                and len(size) == len(stride) and storage_offset >= 0
                and min(size + stride, default=0) >= 0):
            raise TorchArchiveError(f"{self._path}: malformed tensor view size={size} "
                                    f"stride={stride} offset={storage_offset}")
        buffer = self._buffer(storage)
        if 0 in size:
            return np.zeros(size, storage.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise TorchArchiveError(f"{self._path}: tensor view reaches element {last} of a "
                                    f"storage of {storage.numel}")
        if int(np.prod(size, dtype=object)) > MAX_VIEW_REPEAT * max(storage.numel, 1):
            raise TorchArchiveError(f"{self._path}: tensor view of size {size} repeats its "
                                    f"storage of {storage.numel} elements too often")
        item = buffer.itemsize
        view = np.lib.stride_tricks.as_strided(
            buffer[storage_offset:], size, tuple(s * item for s in stride), writeable=False)
        return np.array(view)  # a contiguous copy that owns its memory


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise TorchArchiveError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise TorchArchiveError(f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, "
                                    "which is not read; re-save it with a current torch.save")
        raise TorchArchiveError(f"{path} is not a PyTorch file (not a zip archive)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchArchiveError(f"cannot open {path}: {e}") from e


def read(path: str, constants: bool = False) -> Any:
    """The object saved in a PyTorch file, with tensors as NumPy arrays, TorchScript modules as
    `ScriptObject`s and dicts/lists/tuples/scalars as themselves. With `constants=True` a
    TorchScript archive gives `(data, constants_tuple)`. Raises TorchArchiveError (or its
    subclass UnsafeFileError)."""
    with _open_zip(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchArchiveError(f"{path} is a zip archive but not a PyTorch file "
                                    "(no <name>/data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        script = any(n.startswith(f"{prefix}code/") for n in names) or \
            f"{prefix}constants.pkl" in names
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise TorchArchiveError(f"{path}: unknown byte order {byteorder[:20]!r}")

        def unpickle(member: str, storage_dir: str):
            unpickler = _Unpickler(archive.read(member), archive, prefix, storage_dir,
                                   byteorder, script, path)
            try:
                return unpickler.load()
            except TorchArchiveError:
                raise
            except Exception as e:  # a truncated or corrupt pickle: one line, not a traceback
                message = str(e).splitlines()[0][:160] if str(e) else ""
                raise TorchArchiveError(f"{path}: cannot read {member}: "
                                        f"{type(e).__name__}: {message}") from e

        data = unpickle(pickles[0], "data")
        if not constants:
            return data
        member = f"{prefix}constants.pkl"
        return data, (unpickle(member, "constants") if member in names else ())


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array in a nested tree of dicts, lists, tuples and ScriptObjects, under
    '.'-joined names (for a state dict or a TorchScript module: the state-dict names)."""
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, np.ndarray):
        out[prefix] = tree
        return out
    if isinstance(tree, ScriptObject):
        items = tree.attrs.items()
    elif isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return out
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def load(path: str, constants: bool = False) -> dict[str, np.ndarray]:
    """A PyTorch file's tensors as `{state-dict name: array}`. For a `torch.save` of a state
    dict these are its keys; for nested dicts the keys joined with '.'; for a TorchScript
    archive the module's `state_dict()` names, plus `constants.<i>` for its tensor constants
    when `constants=True`. bfloat16 comes back as `ml_dtypes.bfloat16`."""
    if constants:
        data, consts = read(path, constants=True)
        return {**flatten(data), **flatten(list(consts), "constants")}
    return flatten(read(path))
