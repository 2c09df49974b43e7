"""Reads a PyTorch state dict saved by `torch.save` in its legacy (non-zip) format, without torch, and
without running any code from the file.

A pickle can call any importable function while it loads, so a weights file is read by an unpickler that
accepts only the few names a tensor state dict needs (an ordered dict, the tensor rebuilder, the storage
types) and refuses any other. The legacy format is five pickles (a magic number, the format version,
the writer's byte order and type sizes, the state dict whose tensors name their storages by key, the
list of storage keys), then each storage in that order: its element count (int64, little-endian), then
its raw elements.
"""

import collections
import pickle

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER.
FORMAT_VERSION = 1001  # torch.serialization's PROTOCOL_VERSION.
_STORAGE_TYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class TorchFileError(ValueError):
    """The file is not a legacy PyTorch state dict this reader accepts; the message says why."""


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _TensorRef:
    """A tensor as the pickle describes it: a view (offset, size, stride) of a storage read later."""

    def __init__(self, storage, offset, size, stride, *unused):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a tensor state dict; anything else is refused by name."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        raise TorchFileError(f"refused to load {module}.{name}: a tensor state dict has no such object")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise TorchFileError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _, numel = pid[:5]
        return (str(key), storage_type.dtype, int(numel))


def read_state_dict(path):
    """{name: numpy array} of the legacy `torch.save` state dict in `path` (TorchFileError if not one)."""
    with open(path, "rb") as file:
        try:
            header = [_Unpickler(file).load() for _ in range(3)]
            state = _Unpickler(file).load()
            keys = _Unpickler(file).load()
        except TorchFileError:
            raise
        except Exception as error:  # pickle raises many kinds on a file that is not one.
            raise TorchFileError(f"not a legacy PyTorch file ({type(error).__name__}: {error})") from None
        magic, version, system = header
        if magic != MAGIC or version != FORMAT_VERSION or not isinstance(system, dict):
            raise TorchFileError("not a legacy PyTorch file (no torch.save header)")
        if not system.get("little_endian", False):
            raise TorchFileError("written on a big-endian machine: not supported")
        if not isinstance(state, dict) or not all(isinstance(value, _TensorRef) for value in state.values()):
            raise TorchFileError("not a state dict of tensors")
        wanted = {value.storage[0]: value.storage for value in state.values()}
        storages = {}
        for key in keys:
            _, dtype, numel = wanted.get(key, (key, None, 0))
            if dtype is None:
                raise TorchFileError(f"storage {key} is not used by any tensor")
            count = int(np.frombuffer(_read(file, 8), "<i8")[0])
            if count != numel:
                raise TorchFileError(f"storage {key} holds {count} elements, its tensors say {numel}")
            storages[key] = np.frombuffer(_read(file, count * dtype.itemsize), dtype)
        if file.read(1):
            raise TorchFileError("has bytes after its last storage")
    return {name: _tensor(name, ref, storages) for name, ref in state.items()}


def _read(file, size):
    data = file.read(size)
    if len(data) != size:
        raise TorchFileError("is truncated")
    return data


def _tensor(name, ref, storages):
    """A copy of the tensor's view of its storage, after checking the view stays inside it (numpy's
    as_strided does not)."""
    flat = storages.get(ref.storage[0])
    if flat is None:
        raise TorchFileError(f"{name}: its storage is missing")
    if len(ref.size) != len(ref.stride) or min(ref.stride, default=0) < 0 or ref.offset < 0:
        raise TorchFileError(f"{name}: invalid size {ref.size} or stride {ref.stride}")
    if 0 not in ref.size:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= len(flat):
            raise TorchFileError(f"{name}: its view reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset:] if ref.size else flat[ref.offset:ref.offset + 1], ref.size,
        [stride * flat.itemsize for stride in ref.stride],
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="))
