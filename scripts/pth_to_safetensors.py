#!/usr/bin/env python3
"""Convert a legacy PyTorch ``.pth`` state_dict into a ``.safetensors`` file.

Usage:
    python3 scripts/pth_to_safetensors.py IN.pth OUT.safetensors

Only the Python 3 standard library is used; torch is never imported.

Supported input: the legacy (pre-zip, torch < 1.6 default) serialization
format, which is a concatenation of

    pickle(magic number 0x1950a86a20f9469cfc6c)
    pickle(protocol version, 1001)
    pickle(sys_info: {'little_endian': ..., 'type_sizes': ...})
    pickle(the object)          # tensors are torch._utils._rebuild_tensor_v2(
                                #   storage, offset, size, stride, ...), storages
                                #   are persistent ids ('storage', StorageType,
                                #   key, location, numel, view_metadata)
    pickle([storage keys])      # in the order their data follows
    for each key: <int64 LE element count> <raw element data>

The object must be a mapping of name -> tensor (an ``OrderedDict`` state_dict;
a ``{'state_dict': {...}}`` or ``{'model': {...}}`` wrapper is unwrapped).
Non-contiguous tensors (arbitrary strides, storage offsets, shared storages)
are materialised as contiguous row-major data; 0-d tensors become shape [].

Output is byte-deterministic for a given input: the JSON header keeps the
state_dict order, ``"__metadata__": {"format": "pt"}``, no whitespace, padded
with spaces to a multiple of 8; tensor data is laid out by decreasing element
size (stable, i.e. state_dict order within a size) so that every tensor is
aligned to its element size and the data regions are gap-free.
"""

import collections
import io
import json
import os
import pickle
import struct
import sys

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# legacy storage class name -> (safetensors dtype, element size in bytes)
STORAGE_DTYPES = {
    "DoubleStorage": ("F64", 8),
    "FloatStorage": ("F32", 4),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
}

# memoryview formats used only to move elements of a given byte size around
_MV_FORMAT = {1: "B", 2: "H", 4: "I", 8: "Q"}


class ConvertError(Exception):
    pass


class StorageType:
    def __init__(self, name):
        if name not in STORAGE_DTYPES:
            raise ConvertError("unsupported storage type torch.%s" % name)
        self.name = name
        self.dtype, self.itemsize = STORAGE_DTYPES[name]


class Storage:
    """A (root) storage whose bytes are filled in after the object pickle."""

    def __init__(self, stype, key, numel):
        self.stype = stype
        self.key = key
        self.numel = numel
        self.data = None  # bytes, set when the storage section is read


class StorageView:
    """Old-style storage view: a slice of a root storage (in elements)."""

    def __init__(self, root, offset, numel):
        self.root = root
        self.offset = offset
        self.numel = numel
        self.stype = root.stype


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


class StateDict(collections.OrderedDict):
    """OrderedDict stand-in that tolerates BUILD state (e.g. ``_metadata``)."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            for k, v in state.items():
                setattr(self, k, v)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return Tensor(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride):
    return Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """For the magic / version / sys_info pickles: no globals allowed."""

    def find_class(self, module, name):
        raise ConvertError("unexpected global %s.%s in header" % (module, name))


class _ObjectUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.storages = {}  # key -> Storage (root storages only)
        self.views = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return StateDict
        if module == "torch._utils":
            if name == "_rebuild_tensor_v2":
                return _rebuild_tensor_v2
            if name == "_rebuild_tensor":
                return _rebuild_tensor
            if name == "_rebuild_parameter":
                return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        raise ConvertError("unsupported object in checkpoint: %s.%s" % (module, name))

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise ConvertError("unsupported persistent id %r" % (pid,))
        if len(pid) == 6:
            _, stype, key, _location, numel, view_metadata = pid
        elif len(pid) == 5:
            _, stype, key, _location, numel = pid
            view_metadata = None
        else:
            raise ConvertError("malformed storage persistent id %r" % (pid,))
        if not isinstance(stype, StorageType):
            raise ConvertError("storage %s has unsupported type %r" % (key, stype))
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = Storage(stype, key, int(numel))
        if view_metadata is None:
            return root
        view_key, voffset, vnumel = view_metadata
        view = self.views.get(view_key)
        if view is None:
            view = self.views[view_key] = StorageView(root, int(voffset), int(vnumel))
        return view


def _read_exact(f, n, what):
    b = f.read(n)
    if len(b) != n:
        raise ConvertError("%s: truncated checkpoint while reading %s" % (f.name, what))
    return b


def load_legacy(path):
    """Return (ordered list of (name, Tensor), little_endian flag)."""
    with open(path, "rb") as f:
        head = f.read(6)
        if head[:4] == b"PK\x03\x04":
            raise ConvertError(
                "%s is a zip-format (torch>=1.6) checkpoint; only the legacy "
                "pickle format is supported (re-save it with "
                "torch.save(..., _use_new_zipfile_serialization=False))" % path)
        if len(head) < 2 or head[0] != 0x80:
            raise ConvertError("%s is not a PyTorch checkpoint (no pickle header)" % path)
        f.seek(0)
        try:
            magic = _HeaderUnpickler(f).load()
        except ConvertError:
            raise
        except Exception:
            raise ConvertError("%s is not a PyTorch checkpoint (unreadable pickle header)" % path)
        if magic != MAGIC_NUMBER:
            raise ConvertError(
                "%s is not a legacy PyTorch checkpoint (bad magic number)" % path)
        try:
            version = _HeaderUnpickler(f).load()
            sys_info = _HeaderUnpickler(f).load()
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError("%s: corrupt checkpoint header (%s)" % (path, e))
        if version != PROTOCOL_VERSION:
            raise ConvertError("%s: unsupported legacy protocol version %r" % (path, version))
        little_endian = True
        if isinstance(sys_info, dict):
            little_endian = bool(sys_info.get("little_endian", True))

        up = _ObjectUnpickler(f)
        try:
            obj = up.load()
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError("%s: cannot unpickle the checkpoint object (%s)" % (path, e))
        try:
            keys = _HeaderUnpickler(f).load()
        except Exception as e:
            raise ConvertError("%s: cannot read the storage key list (%s)" % (path, e))
        if not isinstance(keys, list):
            raise ConvertError("%s: malformed storage key list" % path)

        for key in keys:
            st = up.storages.get(key)
            if st is None:
                raise ConvertError("%s: storage %r in key list was never referenced" % (path, key))
            (count,) = struct.unpack("<q" if little_endian else ">q",
                                     _read_exact(f, 8, "storage %s size" % key))
            if count != st.numel:
                raise ConvertError("%s: storage %s has %d elements, expected %d"
                                   % (path, key, count, st.numel))
            data = _read_exact(f, count * st.stype.itemsize, "storage %s data" % key)
            if not little_endian and st.stype.itemsize > 1:
                data = _byteswap(data, st.stype.itemsize)
            st.data = data
        for key, st in up.storages.items():
            if st.data is None:
                raise ConvertError("%s: no data for storage %r" % (path, key))

    if isinstance(obj, dict) and not _all_tensors(obj):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise ConvertError("%s: checkpoint holds a %s, not a state_dict"
                           % (path, type(obj).__name__))
    items = []
    for name, value in obj.items():
        if not isinstance(name, str):
            raise ConvertError("%s: non-string key %r in state_dict" % (path, name))
        if not isinstance(value, Tensor):
            raise ConvertError("%s: entry %r is a %s, not a tensor"
                               % (path, name, type(value).__name__))
        items.append((name, value))
    return items


def _all_tensors(d):
    return len(d) > 0 and all(isinstance(v, Tensor) for v in d.values())


def _byteswap(data, itemsize):
    mv = memoryview(data).cast(_MV_FORMAT[itemsize])
    import array
    a = array.array(_MV_FORMAT[itemsize])
    if a.itemsize != itemsize:  # pragma: no cover - exotic platforms
        raise ConvertError("cannot byte-swap %d-byte elements on this platform" % itemsize)
    a.frombytes(mv.tobytes())
    a.byteswap()
    return a.tobytes()


def materialise(name, t):
    """Return the tensor's elements as contiguous row-major bytes."""
    st = t.storage
    base = 0
    if isinstance(st, StorageView):
        base = st.offset
        limit = st.numel
        root = st.root
        if base < 0 or base + limit > root.numel:
            raise ConvertError("tensor %s: storage view lies outside its storage" % name)
    else:
        limit = st.numel
        root = st
    itemsize = root.stype.itemsize
    size, stride = t.size, t.stride
    if len(size) != len(stride):
        raise ConvertError("tensor %s: size %r and stride %r differ in rank" % (name, size, stride))
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ConvertError("tensor %s: negative size or stride" % name)
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        return b""
    # bounds check (in elements, relative to the (view) storage)
    last = t.offset + sum((s - 1) * d for s, d in zip(size, stride))
    if t.offset < 0 or last >= limit:
        raise ConvertError("tensor %s: offset/strides reach outside its storage" % name)
    start = base + t.offset

    # drop size-1 dims, then merge dims that are contiguous with each other
    dims = [(s, d) for s, d in zip(size, stride) if s != 1]
    merged = []
    for s, d in dims:
        if merged and merged[-1][1] == s * d:
            ps, _ = merged[-1]
            merged[-1] = (ps * s, d)
        else:
            merged.append((s, d))
    if not merged:  # 0-d or all-ones shape: a single element
        merged = [(1, 1)]

    mv = memoryview(root.data).cast(_MV_FORMAT[itemsize]) if itemsize in _MV_FORMAT else None
    if mv is None:
        raise ConvertError("tensor %s: unsupported element size %d" % (name, itemsize))
    if len(merged) == 1 and merged[0][1] == 1:
        n = merged[0][0]
        return mv[start:start + n].tobytes()

    inner_n, inner_d = merged[-1]
    outer = merged[:-1]
    out = io.BytesIO()
    idx = [0] * len(outer)
    while True:
        off = start + sum(i * d for i, (_, d) in zip(idx, outer))
        out.write(mv[off:off + (inner_n - 1) * inner_d + 1:inner_d].tobytes())
        # increment the odometer over the outer dims
        k = len(outer) - 1
        while k >= 0:
            idx[k] += 1
            if idx[k] < outer[k][0]:
                break
            idx[k] = 0
            k -= 1
        if k < 0:
            break
    return out.getvalue()


def write_safetensors(items, out_path):
    # data layout: decreasing itemsize (stable) => aligned, gap-free regions
    order = sorted(range(len(items)),
                   key=lambda i: -_storage_root(items[i][1]).stype.itemsize)
    offsets = {}
    pos = 0
    blobs = []
    for i in order:
        name, t = items[i]
        data = materialise(name, t)
        expected = _storage_root(t).stype.itemsize
        for s in t.size:
            expected *= s
        assert len(data) == expected, name
        offsets[name] = (pos, pos + len(data))
        pos += len(data)
        blobs.append(data)
    header = collections.OrderedDict()
    header["__metadata__"] = {"format": "pt"}
    for name, t in items:
        header[name] = collections.OrderedDict([
            ("dtype", _storage_root(t).stype.dtype),
            ("shape", list(t.size)),
            ("data_offsets", list(offsets[name])),
        ])
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)

    tmp = out_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for b in blobs:
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(out_path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return pos


def _storage_root(t):
    st = t.storage
    return st.root if isinstance(st, StorageView) else st


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        sys.stderr.write("usage: %s IN.pth OUT.safetensors\n" % os.path.basename(argv[0]))
        return 2
    src, dst = argv[1], argv[2]
    try:
        items = load_legacy(src)
        nbytes = write_safetensors(items, dst)
    except ConvertError as e:
        sys.stderr.write("pth_to_safetensors: error: %s\n" % e)
        return 1
    except OSError as e:
        sys.stderr.write("pth_to_safetensors: error: %s: %s\n"
                         % (e.filename or src, e.strerror or e))
        return 1
    print("pth_to_safetensors: wrote %d tensors (%d data bytes) to %s"
          % (len(items), nbytes, dst))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
