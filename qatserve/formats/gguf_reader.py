"""A validating, memory-mapped, lazy GGUF reader for files we do not trust.

`open_gguf(path)` parses and checks the whole header (magic, version, KV pairs, tensor infos, layout of the
data section) before it creates any view of tensor data; tensor bytes are then read lazily as read-only
numpy views of the mmap. Anything malformed raises `GGUFError` naming the field/key/tensor and the byte
offset. Work and memory are O(header size): counts and lengths are bounded by the bytes left before loops.

Choices (documented here because callers rely on them):
- Supported: little-endian GGUF versions 2 and 3. Big-endian files and legacy GGML/GGJT are rejected.
- `metadata_types[key]` is a `GGUFValueType` for scalars/strings, and the tuple
  `(GGUFValueType.ARRAY, element_type)` for arrays.
- Numeric arrays in `metadata` are read-only numpy arrays *copied* out of the header (bounded by the
  header size) so they never keep the file mapped; BOOL arrays are `np.bool_`. String arrays are `list[str]`.
- BOOL values must be the byte 0 or 1.
- Tensor data: offsets must be multiples of the alignment and appear in file order with non-decreasing,
  non-overlapping byte ranges (gaps are allowed); every tensor must lie wholly inside the file.
- Tokenizer checks that belong to the file: tokens is ARRAY[STRING], scores ARRAY[FLOAT32] and token_type
  ARRAY[INT32] of len(tokens), bos/eos ids integers in [0, len(tokens)).
- `tensor_bytes` raises KeyError for an unknown name and GGUFError after `close()`.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from qatserve.errors import GGUFError
from qatserve.formats.gguf_values import (
    INTEGER_TYPES,
    MAX_TENSOR_NAME_LEN,
    Cursor,
    type_name,
    value_type,
)

__all__ = ["TensorInfo", "GGUFFile", "open_gguf", "SUPPORTED_VERSIONS", "DEFAULT_ALIGNMENT"]

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16
MAX_DIMS = 4
INT64_MAX = (1 << 63) - 1
HEADER_SIZE = 24  # magic u32, version u32, n_tensors u64, n_kv u64
# Smallest possible entries, used to bound the counts before looping:
# KV = key length u64 + 1-byte key + type u32 + 1-byte value; tensor info = name length u64 + 1-byte name
# + n_dims u32 + one u64 dim + type u32 + offset u64.
MIN_KV_SIZE = 8 + 1 + 4 + 1
MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8

_MAGIC = GGUF_MAGIC.to_bytes(4, "little")  # b"GGUF"
_LEGACY_MAGICS = {b"lmgg": "GGML", b"fmgg": "GGMF", b"tjgg": "GGJT", b"algg": "GGLA"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry, validated against the file."""

    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # GGUF order (ne[0] = contiguous row length)
    shape: tuple[int, ...]  # torch order = tuple(reversed(ne))
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A parsed, validated GGUF file backed by a read-only mmap. Build it with `open_gguf`."""

    def __init__(
        self,
        path: str,
        mm: mmap.mmap | None,
        version: int,
        alignment: int,
        data_offset: int,
        metadata: dict[str, Any],
        metadata_types: dict[str, GGUFValueType | tuple],
        tensors: dict[str, TensorInfo],
    ) -> None:
        self.path = path
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        self.metadata_types = metadata_types
        self.tensors = tensors
        self._mm = mm

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Read-only uint8 view of exactly `tensors[name].nbytes` bytes of the mmap (no copy)."""
        t = self.tensors[name]
        if self._mm is None:
            if t.nbytes == 0:  # pragma: no cover - dims >= 1 make this unreachable
                return np.empty(0, dtype=np.uint8)
            raise GGUFError(f"{self.path}: file is closed; cannot read tensor {name!r}")
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def get(self, key: str, default: Any = None) -> Any:
        """metadata[key], or `default` when the key is absent."""
        return self.metadata.get(key, default)

    def close(self) -> None:
        """Release the mapping. Views from `tensor_bytes` that are still alive keep it mapped until they die."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # exported views exist; the mapping is freed when the last one is collected

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} keys, "
            f"{len(self.tensors)} tensors, data_offset={self.data_offset})"
        )


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open, validate and mmap a GGUF file. Raises GGUFError on anything wrong (including OS errors)."""
    spath = os.fspath(path)
    if isinstance(spath, bytes):
        spath = os.fsdecode(spath)
    try:
        # O_NONBLOCK so a FIFO path cannot hang us; we reject non-regular files right after.
        fd = os.open(spath, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise GGUFError(f"{spath}: cannot open: {e.strerror or e}") from None
    mm = None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise GGUFError(f"{spath}: is {kind}")
        size = st.st_size
        if size < HEADER_SIZE:
            head = os.read(fd, HEADER_SIZE)
            _check_magic(head[:4], spath)  # a clear message for e.g. a short non-GGUF file
            raise GGUFError(
                f"{spath}: truncated header at offset 0: file is {size} bytes, the GGUF header needs {HEADER_SIZE}"
            )
        try:
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise GGUFError(f"{spath}: cannot mmap: {e}") from None
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)  # the mapping keeps its own reference to the file
    try:
        return _parse(spath, mm, size)
    except BaseException:
        mm.close()
        raise


def _check_magic(magic: bytes, path: str) -> None:
    if len(magic) < 4:
        return
    if magic == _MAGIC:
        return
    if magic == _MAGIC[::-1]:
        raise GGUFError(f"{path}: magic at offset 0 is {magic!r}: a byte-swapped (big-endian) GGUF; only little-endian is supported")
    if magic in _LEGACY_MAGICS or magic[::-1] in _LEGACY_MAGICS:
        raise GGUFError(f"{path}: magic at offset 0 is {magic!r}: a legacy GGML-family file, not GGUF")
    raise GGUFError(f"{path}: bad magic at offset 0: {magic!r}, expected {_MAGIC!r}")


def _parse(path: str, mm: mmap.mmap, size: int) -> GGUFFile:
    c = Cursor(mm, size, 0)
    _check_magic(mm[0:4], path)
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = ""
        if swapped in SUPPORTED_VERSIONS or swapped == 1:
            hint = f" (byte-swapped {swapped}: a big-endian GGUF; only little-endian is supported)"
        raise GGUFError(
            f"{path}: unsupported GGUF version {version} at offset 4{hint}; supported versions: "
            + ", ".join(map(str, SUPPORTED_VERSIONS))
        )
    n_tensors = c.u64("n_tensors")
    n_kv = c.u64("n_kv")
    left = size - HEADER_SIZE
    if n_kv > left // MIN_KV_SIZE:
        raise GGUFError(f"{path}: n_kv = {n_kv} at offset 16 exceeds {left} bytes left / {MIN_KV_SIZE} bytes per KV")
    if n_tensors > left // MIN_TENSOR_INFO_SIZE:
        raise GGUFError(
            f"{path}: n_tensors = {n_tensors} at offset 8 exceeds {left} bytes left / "
            f"{MIN_TENSOR_INFO_SIZE} bytes per tensor info"
        )
    if n_kv * MIN_KV_SIZE + n_tensors * MIN_TENSOR_INFO_SIZE > left:
        raise GGUFError(f"{path}: n_kv = {n_kv} (offset 16) and n_tensors = {n_tensors} (offset 8) need more than the {left} bytes left")

    try:
        metadata, types, kv_offsets = _read_kvs(c, n_kv)
        alignment = _alignment(metadata, types, kv_offsets)
        _check_tokenizer(metadata, types, kv_offsets)
        tensors, data_offset = _read_tensor_infos(c, n_tensors, alignment, size)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    return GGUFFile(path, mm, version, alignment, data_offset, metadata, types, tensors)


def _read_kvs(c: Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    metadata: dict[str, Any] = {}
    types: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    for i in range(n_kv):
        at = c.pos
        key = c.key(f"KV #{i} key")
        if key in metadata:
            raise GGUFError(f"duplicate key {key!r} (KV #{i}) at offset {at}")
        tat = c.pos
        t = value_type(c.u32(f"key {key!r} value type"), f"key {key!r} value type", tat)
        value, declared = c.value(t, f"key {key!r} value")
        metadata[key], types[key], offsets[key] = value, declared, tat
    return metadata, types, offsets


def _alignment(metadata: dict[str, Any], types: dict[str, Any], offsets: dict[str, int]) -> int:
    key = "general.alignment"
    if key not in metadata:
        return DEFAULT_ALIGNMENT
    at = offsets[key]
    if types[key] is not GGUFValueType.UINT32:
        raise GGUFError(f"key {key!r} at offset {at}: type {type_name(types[key])}, expected UINT32")
    a = metadata[key]
    if a == 0 or a & (a - 1) or a > MAX_ALIGNMENT:
        raise GGUFError(f"key {key!r} at offset {at}: {a} is not a power of two in [1, {MAX_ALIGNMENT}]")
    return a


def _check_tokenizer(metadata: dict[str, Any], types: dict[str, Any], offsets: dict[str, int]) -> None:
    """Tokenizer facts checkable from the file alone (model-level checks live in the model builder)."""
    n_vocab = None
    tok = "tokenizer.ggml.tokens"
    if tok in metadata:
        if types[tok] != (GGUFValueType.ARRAY, GGUFValueType.STRING):
            raise GGUFError(f"key {tok!r} at offset {offsets[tok]}: expected ARRAY[STRING], got {type_name(types[tok])}")
        n_vocab = len(metadata[tok])
    for key, elem in (("tokenizer.ggml.scores", GGUFValueType.FLOAT32), ("tokenizer.ggml.token_type", GGUFValueType.INT32)):
        if key not in metadata:
            continue
        want = (GGUFValueType.ARRAY, elem)
        if types[key] != want:
            raise GGUFError(f"key {key!r} at offset {offsets[key]}: expected {type_name(want)}, got {type_name(types[key])}")
        if n_vocab is not None and len(metadata[key]) != n_vocab:
            raise GGUFError(
                f"key {key!r} at offset {offsets[key]}: expected {n_vocab} entries (len of {tok!r}), got {len(metadata[key])}"
            )
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if key not in metadata:
            continue
        if types[key] not in INTEGER_TYPES:
            raise GGUFError(f"key {key!r} at offset {offsets[key]}: expected an integer type, got {type_name(types[key])}")
        v = metadata[key]
        if v < 0 or (n_vocab is not None and v >= n_vocab):
            bound = f"[0, {n_vocab})" if n_vocab is not None else ">= 0"
            raise GGUFError(f"key {key!r} at offset {offsets[key]}: token id {v} out of range, expected {bound}")


def _read_tensor_infos(c: Cursor, n_tensors: int, alignment: int, size: int) -> tuple[dict[str, TensorInfo], int]:
    raw: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        at = c.pos
        name = c.utf8(f"tensor #{i} name", MAX_TENSOR_NAME_LEN)
        if not name or not name.isprintable():
            raise GGUFError(f"tensor #{i} name at offset {at}: {name!r} is empty or not printable")
        if name in seen:
            raise GGUFError(f"duplicate tensor name {name!r} (tensor #{i}) at offset {at}")
        seen.add(name)
        what = f"tensor {name!r}"
        dat = c.pos
        n_dims = c.u32(f"{what} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{what} n_dims at offset {dat}: {n_dims}, expected 1..{MAX_DIMS}")
        ne = []
        n_elements = 1
        for d in range(n_dims):
            nat = c.pos
            n = c.u64(f"{what} ne[{d}]")
            if n < 1 or n > INT64_MAX:
                raise GGUFError(f"{what} ne[{d}] at offset {nat}: {n}, expected 1..{INT64_MAX}")
            n_elements *= n  # exact Python int: no overflow to hide behind
            if n_elements > INT64_MAX:
                raise GGUFError(f"{what} ne[{d}] at offset {nat}: element count {n_elements} overflows int64")
            ne.append(n)
        tat = c.pos
        traw = c.u32(f"{what} type")
        try:
            gtype = GGMLQuantizationType(traw)
        except ValueError:
            gtype = None
        if gtype is None or gtype not in GGML_QUANT_SIZES:
            raise GGUFError(f"{what} type at offset {tat}: unknown ggml type {traw}")
        block, type_size = GGML_QUANT_SIZES[gtype]
        if ne[0] % block:
            raise GGUFError(f"{what} ne[0] at offset {dat + 4}: {ne[0]} is not a multiple of the {gtype.name} block size {block}")
        nbytes = n_elements // block * type_size
        if nbytes > size:
            raise GGUFError(f"{what} at offset {at}: {nbytes} bytes of data exceed the file size {size}")
        oat = c.pos
        rel = c.u64(f"{what} offset")
        raw.append((name, gtype, tuple(ne), rel, nbytes, oat))

    data_offset = -(-c.pos // alignment) * alignment
    if n_tensors and data_offset > size:
        raise GGUFError(f"data section at offset {data_offset} (aligned to {alignment}) starts past end of file ({size} bytes)")
    tensors: dict[str, TensorInfo] = {}
    end = 0  # relative end of the previous tensor
    for name, gtype, ne, rel, nbytes, oat in raw:
        what = f"tensor {name!r} offset (field at {oat})"
        if rel % alignment:
            raise GGUFError(f"{what}: data offset {rel} is not a multiple of the alignment {alignment}")
        if rel < end:
            raise GGUFError(
                f"{what}: data offset {rel} overlaps or precedes the previous tensor, which ends at data offset {end}; "
                "tensors must be stored in file order without overlap"
            )
        absolute = data_offset + rel
        if absolute + nbytes > size:
            raise GGUFError(
                f"{what}: data [{absolute}, {absolute + nbytes}) runs past end of file ({size} bytes): truncated data section?"
            )
        end = rel + nbytes
        tensors[name] = TensorInfo(name, gtype, ne, tuple(reversed(ne)), absolute, nbytes)
    return tensors, data_offset
