"""Slot files: a slot's kept state (engine/slot_cache.py) on disk, versioned and self-describing.

Layout (little-endian):
    magic   8 bytes  b"QATSLOT\\0"
    version u32      FORMAT_VERSION
    hlen    u32      length of the header
    header  hlen     UTF-8 JSON (below)
    digest  32 bytes sha256 of the header bytes
    data             the sections the header lists, in order, back to back

Header: `format`, `version`, `qatserve` (the writer's version, for people), `model` (architecture,
vocabulary size and a fingerprint of the weights), `cache` (K/V types, block size, layer windows, and
per KV-owning layer its group, head count, head dims, row widths, storage dtypes and Hadamard rotation
sizes), `n_tokens`, `n_reuse` (positions whose K/V the file holds: whole blocks, a prefix of the tokens),
`blocks` (per layer group, the block indices present), and `sections`: [name, bytes, sha256] of "tokens"
(int32) then "k.L" / "v.L" for each KV-owning layer L (its blocks' rows in the cache's storage format).

Reading trusts nothing in the file. The file is opened without following symlinks and must be a regular
file no larger than the largest state this cache can hold; the header must describe exactly this model
and cache (anything else names the field that differs); every count is bounded by the slot's capacity;
the section list must be exactly the one computed from those counts, the file exactly that long, every
checksum right, every token id in the vocabulary and every K/V value finite. Only then is a `SlotImage`
returned, and only that is ever written into the cache.

The fingerprint hashes the GGUF's metadata (vocabulary arrays aside), its tensor table and the first and
last 4 KiB of every tensor: a different model, quantisation or fine-tune of the same shapes changes it,
at the cost of reading ~1 MiB instead of hashing the whole file (seconds per GB).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qatserve import __version__
from qatserve.engine.slot_cache import SlotImage
from qatserve.errors import RequestError
from qatserve.quant.kernels import kv_quant

MAGIC = b"QATSLOT\x00"
FORMAT_VERSION = 1
HEADER_MAX = 1 << 20  # bytes of JSON header (a real one is a few KiB)
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_SAMPLE = 4096  # bytes hashed at each end of every tensor for the fingerprint
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.uint8: "u8"}


class SlotFileError(RequestError):
    """A slot file that cannot be read, or describes another model, cache or a state that does not fit."""


def model_fingerprint(gguf) -> str:
    """sha256 over the GGUF's metadata (not the vocabulary arrays), tensor table and both ends of every tensor."""
    h = hashlib.sha256()
    for key in sorted(gguf.metadata):
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        value = gguf.metadata[key]
        # numpy's repr elides long arrays ("..."): hash their bytes instead
        h.update(key.encode() + b"=" + (value.tobytes() if isinstance(value, np.ndarray)
                                        else repr(value).encode("utf-8", "replace")) + b"\n")
    for name in sorted(gguf.tensors):
        t = gguf.tensors[name]
        h.update(f"{name}:{int(t.ggml_type)}:{t.ne}:{t.nbytes}\n".encode())
        data = gguf.tensor_bytes(name)
        h.update(data[:_SAMPLE].tobytes())
        h.update(data[-_SAMPLE:].tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheIdentity:
    """What a slot file must match: this model and this cache's layout, and the capacity of one slot."""

    model: dict
    cache: dict
    n_vocab: int
    n_ctx_slot: int
    group_max_blocks: tuple[int, ...]  # blocks one sequence may hold per layer group

    @classmethod
    def of(cls, engine, gguf) -> "CacheIdentity":
        cache = engine.cache
        cfg = engine.model.config
        layers = []
        for st in cache.layers:
            if st is None:
                continue
            layers.append({"layer": st.layer, "group": st.group, "n_kv": st.n_kv, "dk": st.dk, "dv": st.dv,
                           "k_width": st.k.shape[-1], "v_width": st.v.shape[-1],
                           "k_dtype": _DTYPE_NAMES[st.k.dtype], "v_dtype": _DTYPE_NAMES[st.v.dtype],
                           "rot_k": st.rot_k, "rot_v": st.rot_v})
        opts = cache.options
        return cls(
            model={"arch": cfg.arch, "n_vocab": cfg.n_vocab, "fingerprint": model_fingerprint(gguf)},
            cache={"type_k": opts.type_k, "type_v": opts.type_v, "block_size": cache.block_size,
                   "group_windows": list(cache.group_windows), "layers": layers},
            n_vocab=cfg.n_vocab, n_ctx_slot=cache.n_ctx_seq,
            group_max_blocks=tuple(p.n_blocks // cache.n_seq for p in cache.pools))

    @property
    def block_size(self) -> int:
        return self.cache["block_size"]

    def sections(self, n_tokens: int, blocks: list[list[int]]) -> list[tuple[str, int]]:
        """(name, bytes) of every data section of a state with these counts, in file order."""
        out = [("tokens", 4 * n_tokens)]
        for L in self.cache["layers"]:
            rows = len(blocks[L["group"]]) * self.block_size
            out.append((f"k.{L['layer']}", rows * L["n_kv"] * _row_bytes(L, "k")))
            out.append((f"v.{L['layer']}", rows * L["n_kv"] * _row_bytes(L, "v")))
        return out

    def max_file_size(self) -> int:
        full = [list(range(n)) for n in self.group_max_blocks]
        return _PREFIX.size + HEADER_MAX + _DIGEST + sum(n for _, n in self.sections(self.n_ctx_slot, full))


def _row_bytes(layer: dict, which: str) -> int:
    return layer[f"{which}_width"] * _ITEMSIZE[layer[f"{which}_dtype"]]


_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1}
_TORCH_DTYPES = {name: dt for dt, name in _DTYPE_NAMES.items()}


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous tensor (no copy)."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, dtype=np.uint8)


# -- writing ----------------------------------------------------------------------------------------

def encode_parts(image: SlotImage, ident: CacheIdentity) -> list:
    """The file as a list of buffers (header first), without copying the K/V data."""
    tokens = np.asarray(image.tokens, dtype="<i4")
    data = [("tokens", tokens.view(np.uint8))]
    for L in ident.cache["layers"]:
        data.append((f"k.{L['layer']}", _as_bytes(image.k[L["layer"]])))
        data.append((f"v.{L['layer']}", _as_bytes(image.v[L["layer"]])))
    expected = ident.sections(len(image.tokens), image.blocks)
    assert [(n, b.nbytes) for n, b in data] == expected, "slot image does not match the cache layout"
    header = {"format": "qatserve-slot", "version": FORMAT_VERSION, "qatserve": __version__,
              "model": ident.model, "cache": ident.cache, "n_tokens": len(image.tokens),
              "n_reuse": image.n_reuse, "blocks": image.blocks,
              "sections": [[n, b.nbytes, hashlib.sha256(b).hexdigest()] for n, b in data]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)), raw, hashlib.sha256(raw).digest(),
            *(b for _, b in data)]


def write(directory: Path, name: str, image: SlotImage, ident: CacheIdentity) -> int:
    """Write the image as directory/name (a temporary file renamed over it, so a reader never sees half a
    file and a symlink planted under that name is replaced, never followed). Returns the bytes written."""
    target = directory / name
    _refuse_non_regular(target, missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        n = 0
        with os.fdopen(fd, "wb") as f:
            for part in encode_parts(image, ident):
                f.write(part)
                n += part.nbytes if isinstance(part, np.ndarray) else len(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n


def _refuse_non_regular(path: Path, missing_ok: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return
        raise SlotFileError(f"no slot file {path.name!r}") from None
    if stat.S_ISLNK(st.st_mode):
        raise SlotFileError(f"{path.name!r} is a symbolic link; slot files must be regular files")
    if not stat.S_ISREG(st.st_mode):
        raise SlotFileError(f"{path.name!r} is not a regular file")


# -- reading ----------------------------------------------------------------------------------------

def read(directory: Path, name: str, ident: CacheIdentity) -> tuple[SlotImage, int]:
    """The validated image of directory/name and the bytes read; SlotFileError (naming what is wrong)
    for anything that is not a state this cache can hold."""
    path = directory / name
    _refuse_non_regular(path, missing_ok=False)
    try:
        # O_NOFOLLOW: a symlink swapped in after the check above still fails; O_NONBLOCK: a FIFO does not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SlotFileError(f"cannot open slot file {name!r}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SlotFileError(f"{name!r} is not a regular file")
        limit = ident.max_file_size()
        if st.st_size > limit:
            raise SlotFileError(f"{name!r} has {st.st_size} bytes, more than any state of this cache "
                                f"({limit} bytes): not a slot file of this server")
        return _parse(f, name, st.st_size, ident), st.st_size


def _exact(f, n: int, name: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SlotFileError(f"{name!r} is truncated: {what} needs {n} bytes, {len(data)} left")
    return data


def _parse(f, name: str, size: int, ident: CacheIdentity) -> SlotImage:
    magic, version, hlen = _PREFIX.unpack(_exact(f, _PREFIX.size, name, "the file prefix"))
    if magic != MAGIC:
        raise SlotFileError(f"{name!r} is not a qatserve slot file (bad magic)")
    if version != FORMAT_VERSION:
        raise SlotFileError(f"{name!r} has slot file format {version}; this server reads {FORMAT_VERSION}")
    if hlen > HEADER_MAX or _PREFIX.size + hlen + _DIGEST > size:
        raise SlotFileError(f"{name!r}: header length {hlen} does not fit the file ({size} bytes)")
    raw = _exact(f, hlen, name, "the header")
    if hashlib.sha256(raw).digest() != _exact(f, _DIGEST, name, "the header checksum"):
        raise SlotFileError(f"{name!r}: header checksum mismatch (corrupted file)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SlotFileError(f"{name!r}: the header is not valid JSON") from None
    n_tokens, n_reuse, blocks, sections = _check_header(header, name, ident)
    data_size = sum(n for _, n, _ in sections)
    if _PREFIX.size + hlen + _DIGEST + data_size != size:
        raise SlotFileError(f"{name!r} has {size} bytes; its header describes "
                            f"{_PREFIX.size + hlen + _DIGEST + data_size} (truncated or padded)")
    tokens_raw = _section(f, name, sections[0], torch.empty(n_tokens, dtype=torch.int32))
    tokens = tokens_raw.tolist()
    bad = [t for t in tokens if not 0 <= t < ident.n_vocab]
    if bad:
        raise SlotFileError(f"{name!r}: token id {bad[0]} is outside the vocabulary (0..{ident.n_vocab - 1})")
    k, v = {}, {}
    it = iter(sections[1:])
    bs = ident.block_size
    for L in ident.cache["layers"]:
        rows = len(blocks[L["group"]]) * bs
        for which, out in (("k", k), ("v", v)):
            t = torch.empty((rows, L["n_kv"], L[f"{which}_width"]), dtype=_TORCH_DTYPES[L[f"{which}_dtype"]])
            _section(f, name, next(it), t)
            kind = ident.cache[f"type_{which}"]
            values = kv_quant.dequantize_kv(t, kind, (rows, L["n_kv"], L["dk" if which == "k" else "dv"]))
            if not bool(torch.isfinite(values).all()):
                raise SlotFileError(f"{name!r}: layer {L['layer']} {which.upper()} holds non-finite values")
            out[L["layer"]] = t
    return SlotImage(tokens, n_reuse, blocks, k, v)


def _section(f, name: str, section: tuple[str, int, str], into: torch.Tensor) -> torch.Tensor:
    """Read one section into `into` (its size already checked against the section's), verify its sha256."""
    sec_name, nbytes, digest = section
    buf = _as_bytes(into) if into.numel() else np.empty(0, dtype=np.uint8)
    assert buf.nbytes == nbytes
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise SlotFileError(f"{name!r} is truncated in section {sec_name}")
        got += n
    if hashlib.sha256(view).hexdigest() != digest:
        raise SlotFileError(f"{name!r}: checksum mismatch in section {sec_name} (corrupted file)")
    return into


def _int(v, what: str, name: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise SlotFileError(f"{name!r}: {what} must be an integer in {lo}..{hi}, got {str(v)[:40]}")
    return v


def _check_header(h, name: str, ident: CacheIdentity):
    """The header's counts, each checked against this cache; the section list it must have."""
    if not isinstance(h, dict) or h.get("format") != "qatserve-slot" or h.get("version") != FORMAT_VERSION:
        raise SlotFileError(f"{name!r}: not a qatserve slot header (format/version)")
    model = h.get("model")
    if not isinstance(model, dict):
        raise SlotFileError(f"{name!r}: the header has no model description")
    for key, want in ident.model.items():
        if model.get(key) != want:
            raise SlotFileError(f"{name!r} was saved from another model: {key} {str(model.get(key))[:80]!r} "
                                f"!= this server's {str(want)[:80]!r}")
    cache = h.get("cache")
    if not isinstance(cache, dict):
        raise SlotFileError(f"{name!r}: the header has no cache description")
    for key, want in ident.cache.items():
        if cache.get(key) != want:
            what = "layer shapes" if key == "layers" else key
            raise SlotFileError(f"{name!r} was saved with another KV cache: {what} {str(cache.get(key))[:120]} "
                                f"!= this server's {str(want)[:120]}")
    bs = ident.block_size
    n_tokens = _int(h.get("n_tokens"), "n_tokens", name, 0, ident.n_ctx_slot)
    n_reuse = _int(h.get("n_reuse"), "n_reuse", name, 0, n_tokens)
    if n_reuse % bs:
        raise SlotFileError(f"{name!r}: n_reuse {n_reuse} is not a whole number of {bs}-token blocks")
    n_blk = n_reuse // bs
    blocks = h.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != len(ident.group_max_blocks):
        raise SlotFileError(f"{name!r}: blocks must list {len(ident.group_max_blocks)} layer groups")
    for g, (idx, window) in enumerate(zip(blocks, ident.cache["group_windows"])):
        if not isinstance(idx, list) or len(idx) > ident.group_max_blocks[g]:
            raise SlotFileError(f"{name!r}: layer group {g} may hold at most {ident.group_max_blocks[g]} blocks")
        for j, i in enumerate(idx):
            _int(i, f"block index of group {g}", name, 0, max(n_blk - 1, 0))
            if j and i <= idx[j - 1]:
                raise SlotFileError(f"{name!r}: block indices of group {g} must ascend")
        if len(idx) > n_blk or (window == 0 and idx != list(range(n_blk))):
            raise SlotFileError(f"{name!r}: layer group {g} must hold blocks 0..{n_blk - 1}")
    sections = h.get("sections")
    expected = ident.sections(n_tokens, blocks)
    if not isinstance(sections, list) or len(sections) != len(expected):
        raise SlotFileError(f"{name!r}: expected {len(expected)} data sections")
    out = []
    for sec, (want_name, want_bytes) in zip(sections, expected):
        if (not isinstance(sec, list) or len(sec) != 3 or sec[0] != want_name or type(sec[1]) is not int
                or sec[1] != want_bytes or not isinstance(sec[2], str) or len(sec[2]) != 64):
            raise SlotFileError(f"{name!r}: section {str(sec)[:80]} should be {want_name} of {want_bytes} bytes")
        out.append((want_name, want_bytes, sec[2]))
    return n_tokens, n_reuse, blocks, out
