"""Random-access reader for MosaicML Streaming "MDS" shards (Ettin's released phase data).

Reads the files directly, without torch or the `streaming` package (format: recipe §5.3):
  index.json     {"version": 2, "shards": [{"column_names", "column_encodings", "column_sizes",
                  "compression": null | "zstd[:level]", "raw_data": {"basename", "bytes"},
                  "zip_data": null | {"basename", "bytes"}, "samples", ...}]}
  shard file     uint32 n | uint32 offsets[n+1] (absolute) | JSON config | samples
  sample         uint32 byte length per variable-size column, then the columns' bytes,
                 columns in index order.
`input_ids` may be `ndarray:uint32` (1 byte (ndim << 2 | shape dtype code), the shape, values)
or bare `ndarray` (one more dtype byte first). A zstd shard is decompressed once into
`cache_dir` (written to a temporary name, then renamed) and read from there.

`MDSDocs(root)` serves every index.json under `root` (sorted paths) as one sequence of
1-D int32 id arrays, each shard file once (streaming's merge_index writes a root index.json
that lists its parts' shards again); errors name the shard file and sample.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np

_SHAPE_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)
_DTYPE_CODES = {8: np.uint8, 9: np.int8, 16: np.uint16, 17: np.int16, 18: np.float16,
                32: np.uint32, 33: np.int32, 34: np.float32, 64: np.uint64, 65: np.int64,
                66: np.float64}


class MDSError(ValueError):
    """A missing, corrupt or unsupported MDS file; names the file (and sample)."""


def decode_ndarray(data: memoryview, encoding: str, where: str) -> np.ndarray:
    """Decodes one column value of streaming's NDArray encodings: `ndarray` (dtype code and
    shape header), `ndarray:DTYPE` (shape header) or `ndarray:DTYPE:SHAPE` (fixed shape, e.g.
    `ndarray:uint32:100` or `...:2,3`: the raw values alone)."""
    parts = encoding.split(":")
    if len(parts) > 3 or parts[0] != "ndarray":
        raise MDSError(f"{where}: unsupported column encoding {encoding!r}")
    try:
        dtype = np.dtype(parts[1]) if len(parts) > 1 else None
        fixed_shape = (tuple(int(n) for n in parts[2].split(",")) if len(parts) == 3 else None)
    except (TypeError, ValueError):
        raise MDSError(f"{where}: unsupported column encoding {encoding!r}") from None
    if not len(data):
        raise MDSError(f"{where}: empty ndarray value")
    pos = 0
    if dtype is None:
        dtype = _DTYPE_CODES.get(data[0])
        if dtype is None:
            raise MDSError(f"{where}: unknown ndarray dtype code {data[0]}")
        pos = 1
    dtype = np.dtype(dtype).newbyteorder("<")
    if fixed_shape is not None:
        shape, start = fixed_shape, 0
    else:
        if len(data) <= pos:
            raise MDSError(f"{where}: ndarray value without a shape header")
        head = data[pos]
        ndim, shape_code = head >> 2, head & 3
        shape_dtype = np.dtype(_SHAPE_DTYPES[shape_code]).newbyteorder("<")
        start = pos + 1 + ndim * shape_dtype.itemsize
        if len(data) < start:
            raise MDSError(f"{where}: ndarray shape header cut short")
        shape = tuple(np.frombuffer(data, shape_dtype, count=ndim, offset=pos + 1))
    if (len(data) - start) % dtype.itemsize:
        raise MDSError(f"{where}: {len(data) - start} bytes of {dtype.name} values, not a "
                       f"multiple of {dtype.itemsize} (a corrupt shard?)")
    values = np.frombuffer(data, dtype, offset=start)
    if values.size != int(np.prod(shape)):
        raise MDSError(f"{where}: ndarray of shape {tuple(int(n) for n in shape)} but "
                       f"{values.size} values")
    return values.reshape(shape)


class _Shard:
    """One raw shard file, memory-mapped on first use."""

    def __init__(self, path: str, info: dict):
        self.path = path
        self.samples = int(info["samples"])
        self.names = list(info["column_names"])
        self.encodings = list(info["column_encodings"])
        self.sizes = list(info["column_sizes"])
        if "input_ids" not in self.names:
            raise MDSError(f"{path}: no input_ids column (columns: {self.names})")
        enc = self.encodings[self.names.index("input_ids")]
        if not enc.startswith("ndarray"):
            raise MDSError(f"{path}: input_ids encoded as {enc!r}; expected ndarray[:dtype]")
        self._mm = None

    def _map(self) -> np.ndarray:
        if self._mm is None:
            try:
                self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise MDSError(f"{self.path}: cannot open ({e})") from None
            n_header = 4 * (self.samples + 2)
            if self._mm.size < n_header:
                raise MDSError(f"{self.path}: {self._mm.size} bytes, too short for "
                               f"{self.samples} samples (truncated shard)")
            n = int(self._mm[:4].view("<u4")[0])
            if n != self.samples:
                raise MDSError(f"{self.path}: header says {n} samples, index.json {self.samples}")
            end = int(self._mm[n_header - 4:n_header].view("<u4")[0])
            if end > self._mm.size:
                raise MDSError(f"{self.path}: samples end at byte {end} but the file has "
                               f"{self._mm.size} (truncated shard)")
        return self._mm

    def input_ids(self, index: int) -> np.ndarray:
        mm = self._map()
        begin, end = mm[4 * (1 + index):4 * (3 + index)].view("<u4")
        where = f"{self.path}: sample {index}"
        if not begin <= end <= mm.size:
            raise MDSError(f"{where}: bad offsets {begin}..{end} (corrupt shard)")
        data = memoryview(mm[begin:end])
        variable = [j for j, s in enumerate(self.sizes) if s is None]
        lengths = np.frombuffer(data, "<u4", count=len(variable)).tolist()
        pos = 4 * len(variable)
        for j, name in enumerate(self.names):
            size = self.sizes[j] if self.sizes[j] is not None else lengths[variable.index(j)]
            if name == "input_ids":
                if pos + size > len(data):
                    raise MDSError(f"{where}: column input_ids runs past the sample (corrupt)")
                return decode_ndarray(data[pos:pos + size], self.encodings[j], where)
            pos += size
        raise AssertionError("unreachable: input_ids checked in __init__")

    def __getstate__(self):
        return dict(self.__dict__, _mm=None)


def _raw_path(index_dir: str, info: dict, cache_dir: str | None, index_path: str) -> str:
    raw = os.path.join(index_dir, info["raw_data"]["basename"])
    if os.path.exists(raw):
        return raw
    zipped = info.get("zip_data")
    if not zipped:
        raise MDSError(f"{raw}: missing (listed in {index_path})")
    zpath = os.path.join(index_dir, zipped["basename"])
    if not os.path.exists(zpath):
        raise MDSError(f"{zpath}: missing (listed in {index_path})")
    algo = (info.get("compression") or "").split(":")[0]
    if algo != "zstd":
        raise MDSError(f"{zpath}: compression {info.get('compression')!r} not supported (zstd only)")
    target_dir = cache_dir or index_dir
    os.makedirs(target_dir, exist_ok=True)
    # A merged index (streaming's merge_index) names shards inside part folders ("part0/...").
    flat_name = info["raw_data"]["basename"].replace("/", "_")
    target = os.path.join(target_dir, f"{hashlib.sha1(os.path.abspath(zpath).encode()).hexdigest()[:12]}-"
                          f"{flat_name}") if cache_dir else raw
    if not os.path.exists(target):
        import zstandard
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            with open(zpath, "rb") as src, open(tmp, "wb") as dst:
                zstandard.ZstdDecompressor().copy_stream(src, dst)
            os.replace(tmp, target)
        except zstandard.ZstdError as e:
            raise MDSError(f"{zpath}: corrupt zstd data ({e})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


class MDSDocs:
    """All samples of every index.json under `root`, as 1-D int32 id arrays (see module doc)."""

    def __init__(self, root: str, *, vocab_size: int | None = None, cache_dir: str | None = None):
        self.root = root
        self.vocab_size = vocab_size
        index_paths = ([root] if root.endswith("index.json") else
                       sorted(glob.glob(os.path.join(root, "**", "index.json"), recursive=True)))
        if not index_paths:
            raise MDSError(f"{root}: no index.json found (not an MDS dataset)")
        self._shards: list[_Shard] = []
        listed = set()   # shard files already read: a merged index.json repeats its parts'
        for index_path in index_paths:
            try:
                with open(index_path) as f:
                    index = json.load(f)
            except json.JSONDecodeError as e:
                raise MDSError(f"{index_path}:{e.lineno}: malformed JSON ({e.msg})") from None
            for info in index.get("shards", []):
                if info.get("format", "mds") != "mds":
                    raise MDSError(f"{index_path}: shard format {info.get('format')!r} is not mds")
                shard_file = os.path.realpath(os.path.join(os.path.dirname(index_path),
                                                           info["raw_data"]["basename"]))
                if shard_file in listed:
                    continue
                listed.add(shard_file)
                path = _raw_path(os.path.dirname(index_path), info, cache_dir, index_path)
                self._shards.append(_Shard(path, info))
        self._starts = np.concatenate([[0], np.cumsum([s.samples for s in self._shards],
                                                      dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.root}: sample {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        shard = self._shards[k]
        ids = shard.input_ids(index - int(self._starts[k])).reshape(-1)
        if ids.size and ids.dtype.kind == "i" and int(ids.min()) < 0:
            raise MDSError(f"{shard.path}: sample {index - int(self._starts[k])}: id "
                           f"{int(ids.min())} < 0")
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise MDSError(f"{shard.path}: sample {index - int(self._starts[k])}: id "
                           f"{int(ids.max())} >= vocab size {self.vocab_size}")
        return ids.astype(np.int32)
