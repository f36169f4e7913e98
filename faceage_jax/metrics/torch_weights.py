"""A PyTorch state dict (`torch.save` file) read into NumPy arrays, without torch.

A `.pth` file is a pickle, and a general unpickle runs whatever code the file
names. This reader admits only what a state dict of plain tensors needs:
`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and the typed
storage classes, each mapped to a NumPy stand-in here; any other global in the
file is refused with `UnsafeWeightsError`. Both of torch.save's formats are read:
the zip archive (PyTorch >= 1.6: `<name>/data.pkl` plus one file per storage)
and the legacy stream (magic number, protocol, system info, the pickle, its
storage keys, then each storage as an int64 element count and its bytes).
"""

import collections
import pathlib
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeWeightsError(pickle.UnpicklingError):
    """The file names a global that a state dict of tensors does not need."""


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2's stand-in: a strided view of the storage.

    A view, not a copy: the legacy format's storage bytes come after the pickle,
    and are read into the storages once it is loaded. `load_state_dict` copies.
    """
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
        raise pickle.UnpicklingError(f"bad tensor layout: size {size}, stride {stride}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if all(size) and last >= len(storage):
        # as_strided does not check: a crafted file would read memory past the storage.
        raise pickle.UnpicklingError(
            f"tensor of size {size}, stride {stride} at {offset} overruns its storage "
            f"of {len(storage)} elements"
        )
    return np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=tuple(size),
        strides=[s * storage.dtype.itemsize for s in stride],
        writeable=False,
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeWeightsError(
            f"refusing to load {module}.{name}: a file of PyTorch weights needs only "
            "tensors (this reader never runs code a file names)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeWeightsError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeWeightsError(f"unexpected storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _load_zip(path: pathlib.Path):
    with zipfile.ZipFile(path) as archive:
        (pickle_name,) = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        prefix = pickle_name[: -len("data.pkl")]
        names = set(archive.namelist())
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
            raise pickle.UnpicklingError(f"{path}: big-endian tensors are not supported")
        storages = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                data = archive.read(f"{prefix}data/{key}")
                storages[key] = np.frombuffer(data, dtype, count=numel)
            return storages[key]

        with archive.open(pickle_name) as file:
            return _RestrictedUnpickler(file, load_storage).load()


def _load_legacy(path: pathlib.Path):
    with open(path, "rb") as file:
        if _RestrictedUnpickler(file, None).load() != LEGACY_MAGIC_NUMBER:
            raise pickle.UnpicklingError(f"{path} is not a torch.save file")
        if _RestrictedUnpickler(file, None).load() != LEGACY_PROTOCOL_VERSION:
            raise pickle.UnpicklingError(f"{path}: unknown torch.save protocol version")
        _RestrictedUnpickler(file, None).load()  # System info: endianness, type sizes.
        storages = {}

        def load_storage(key, dtype, numel):
            return storages.setdefault(key, np.empty(numel, dtype))

        result = _RestrictedUnpickler(file, load_storage).load()
        for key in _RestrictedUnpickler(file, None).load():
            (numel,) = struct.unpack("<q", file.read(8))
            storage = storages[str(key)]
            if numel != storage.size:
                raise pickle.UnpicklingError(f"storage {key}: {numel} elements, not {storage.size}")
            storage[:] = np.frombuffer(file.read(numel * storage.dtype.itemsize), storage.dtype)
    return result


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{key: array} of a `torch.save(state_dict)` file, either format; never runs its code."""
    path = pathlib.Path(path)
    try:
        state = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except UnsafeWeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, struct.error) as error:
        raise pickle.UnpicklingError(
            f"{path} could not be read as a torch.save file of tensors ({error})"
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(value, np.ndarray) for value in state.values()
    ):
        raise pickle.UnpicklingError(f"{path} holds no state dict of tensors")
    return {str(key): np.array(value) for key, value in state.items()}


def save_npz(state_dict: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
    """The state dict as an .npz (no pickle at all), for `np.load(allow_pickle=False)`."""
    with open(path, "wb") as file:
        np.savez(file, **state_dict)
