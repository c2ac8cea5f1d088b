"""Bounded, little-endian parsing of GGUF primitives and KV values over a read-only buffer (an mmap).

Every read checks the bytes it needs against the bytes left *before* touching them, and every count
or length is bounded by the bytes left (and a cap) *before* any loop or allocation, so a hostile file
costs at most O(header size) time and memory. Errors are `GGUFError`s naming the field and offset.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from gguf import GGUFValueType

from qatserve.errors import GGUFError

MAX_KEY_LEN = 65535  # bytes; keys are printable ASCII
MAX_TENSOR_NAME_LEN = 255  # bytes; ggml itself allows 63, we are a little more lenient
MAX_ARRAY_LEN = 1 << 28  # elements; a numeric array of this size is still bounded by the file size too
MAX_STRING_ARRAY_LEN = 1 << 24  # strings; ~64x the largest vocabularies in use (262144)

# struct format, numpy dtype and byte size per scalar type. BOOL is one byte that must be 0 or 1.
SCALAR_FORMATS: dict[GGUFValueType, tuple[str, str, int]] = {
    GGUFValueType.UINT8: ("<B", "<u1", 1),
    GGUFValueType.INT8: ("<b", "<i1", 1),
    GGUFValueType.UINT16: ("<H", "<u2", 2),
    GGUFValueType.INT16: ("<h", "<i2", 2),
    GGUFValueType.UINT32: ("<I", "<u4", 4),
    GGUFValueType.INT32: ("<i", "<i4", 4),
    GGUFValueType.FLOAT32: ("<f", "<f4", 4),
    GGUFValueType.BOOL: ("<B", "<u1", 1),
    GGUFValueType.UINT64: ("<Q", "<u8", 8),
    GGUFValueType.INT64: ("<q", "<i8", 8),
    GGUFValueType.FLOAT64: ("<d", "<f8", 8),
}
INTEGER_TYPES = frozenset(
    t for t in SCALAR_FORMATS if t not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64, GGUFValueType.BOOL)
)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def value_type(raw: int, what: str, offset: int) -> GGUFValueType:
    """Map a raw u32 to a GGUFValueType, or raise naming `what`."""
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise GGUFError(f"{what} at offset {offset}: unknown value type {raw}") from None


def type_name(t: GGUFValueType | tuple) -> str:
    """Human name of a declared type: 'UINT32' or 'ARRAY[FLOAT32]'."""
    if isinstance(t, tuple):
        return f"{t[0].name}[{t[1].name}]"
    return t.name


class Cursor:
    """A read position in a buffer of known size; all reads are bounds-checked."""

    __slots__ = ("buf", "size", "pos")

    def __init__(self, buf, size: int, pos: int = 0) -> None:
        self.buf = buf
        self.size = size
        self.pos = pos

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise GGUFError(
                f"truncated {what} at offset {self.pos}: need {n} bytes, only {self.size - self.pos} left"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str, cap: int | None = None) -> bytes:
        """A u64 length followed by that many bytes; the length is checked before reading."""
        at = self.pos
        n = self.u64(f"{what} length")
        if cap is not None and n > cap:
            raise GGUFError(f"{what} at offset {at}: length {n} exceeds the cap of {cap} bytes")
        if n > self.size - self.pos:
            raise GGUFError(
                f"{what} at offset {at}: length {n} exceeds the {self.size - self.pos} bytes left in the file"
            )
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b if isinstance(b, bytes) else bytes(b)

    def utf8(self, what: str, cap: int | None = None) -> str:
        at = self.pos
        b = self.raw_string(what, cap)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at offset {at}: invalid UTF-8 at byte {e.start} of the string") from None

    def key(self, what: str) -> str:
        """A KV key: 1..MAX_KEY_LEN bytes of printable ASCII."""
        at = self.pos
        b = self.raw_string(what, MAX_KEY_LEN)
        if not b:
            raise GGUFError(f"{what} at offset {at}: empty key")
        if not all(0x20 <= c < 0x7F for c in b):
            raise GGUFError(f"{what} at offset {at}: key {b[:64]!r} is not printable ASCII")
        return b.decode("ascii")

    def scalar(self, t: GGUFValueType, what: str) -> Any:
        fmt, _, size = SCALAR_FORMATS[t]
        at = self.pos
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        if t is GGUFValueType.BOOL:
            if v > 1:
                raise GGUFError(f"{what} at offset {at}: BOOL byte is {v}, expected 0 or 1")
            return bool(v)
        return v

    def value(self, t: GGUFValueType, what: str) -> tuple[Any, GGUFValueType | tuple]:
        """Parse one KV value of declared type `t`; returns (value, declared type as in metadata_types)."""
        if t is GGUFValueType.STRING:
            return self.utf8(what), t
        if t is GGUFValueType.ARRAY:
            return self.array(what)
        return self.scalar(t, what), t

    def array(self, what: str) -> tuple[Any, tuple]:
        at = self.pos
        et = value_type(self.u32(f"{what} array element type"), f"{what} array element type", at)
        if et is GGUFValueType.ARRAY:
            raise GGUFError(f"{what} at offset {at}: arrays of arrays are not supported")
        count_at = self.pos
        n = self.u64(f"{what} array count")
        declared = (GGUFValueType.ARRAY, et)
        if et is GGUFValueType.STRING:
            # Each string costs at least its 8-byte length, so bound the count before looping.
            if n > MAX_STRING_ARRAY_LEN or n > self.left // 8:
                raise GGUFError(
                    f"{what} at offset {count_at}: array count {n} of STRING exceeds "
                    f"min(cap {MAX_STRING_ARRAY_LEN}, {self.left} bytes left / 8)"
                )
            return self._strings(n, what), declared
        _, dtype, size = SCALAR_FORMATS[et]
        if n > MAX_ARRAY_LEN or n > self.left // size:
            raise GGUFError(
                f"{what} at offset {count_at}: array count {n} of {et.name} exceeds "
                f"min(cap {MAX_ARRAY_LEN}, {self.left} bytes left / {size})"
            )
        # A copy (bounded by the header size) so the array does not pin the mmap open after close().
        arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        if et is GGUFValueType.BOOL:
            if n and int(arr.max()) > 1:
                bad = int(np.argmax(arr > 1))
                raise GGUFError(f"{what}[{bad}] at offset {self.pos + bad}: BOOL byte is {arr[bad]}, expected 0 or 1")
            arr = arr.view(np.bool_)
        self.pos += n * size
        arr.setflags(write=False)
        return arr, declared

    def _strings(self, n: int, what: str) -> list[str]:
        """n length-prefixed UTF-8 strings. The hot path of a 262k vocabulary: a lean pass first; anything
        wrong in it (truncation, bad UTF-8) is found again, and named, by the checked pass below."""
        out = None
        if 0 <= n <= (self.size - self.pos) // 8:  # each string takes 8 bytes at least: else the checked pass names it
            try:
                out = self._strings_joined(n)
            except (struct.error, UnicodeDecodeError, ValueError, OverflowError):  # a length past any offset
                out = None
        return out if out is not None else self._strings_checked(n, what)

    def _strings_joined(self, n: int) -> list[str] | None:
        """The lean pass: one Python loop over the lengths only, then every string decoded by one
        `decode` and one `split` (creating 262k str objects one by one was most of a vocabulary's parse
        time). Each string's 8-byte length becomes one NUL separator: "\0s0\0s1...". The result equals a
        string-by-string decode (NUL is never part of a multi-byte sequence, so a string invalid alone is
        invalid here too); None where a string holds a NUL (the split would be wrong) or runs past the end."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        starts = [0] * n
        for i in range(n):  # a length past the buffer makes the next unpack raise (struct.error)
            starts[i] = pos
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            return None
        if not n:
            return []
        first = starts[0]
        region = np.frombuffer(buf, np.uint8, pos - first, first)
        keep = np.ones(region.size, bool)
        at = np.asarray(starts, np.int64) - first
        keep[(at[:, None] + np.arange(7)).ravel()] = False  # the length's first 7 bytes go...
        joined = region.copy()
        joined[at + 7] = 0  # ...and its last becomes the separator
        parts = joined[keep].tobytes().decode("utf-8").split("\0")
        if len(parts) != n + 1:
            return None
        self.pos = pos
        del parts[0]
        return parts

    def _strings_checked(self, n: int, what: str) -> list[str]:
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(n):
            if size - pos < 8:
                raise GGUFError(f"truncated {what}[{i}] length at offset {pos}: need 8 bytes, {size - pos} left")
            (ln,) = unpack(buf, pos)
            if ln > size - pos - 8:
                raise GGUFError(
                    f"{what}[{i}] at offset {pos}: length {ln} exceeds the {size - pos - 8} bytes left in the file"
                )
            b = buf[pos + 8 : pos + 8 + ln]
            if not isinstance(b, bytes):
                b = bytes(b)
            try:
                append(b.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise GGUFError(f"{what}[{i}] at offset {pos}: invalid UTF-8 at byte {e.start} of the string") from None
            pos += 8 + ln
        self.pos = pos
        return out
