"""Deterministic fuzzing of the GGUF reader: every mutated file must end in GGUFError or a safe open.

A small valid GGUF (several KV types, arrays, tokenizer, four tensor types) is written with gguf.GGUFWriter;
a trusted walker maps its header fields; then >= 2,000 seeded mutations (hostile values in every counted
field, random byte flips in the header, truncations, and mixtures) are opened. Any exception other than
GGUFError, a tensor view outside the file, or a case slower than 1 s fails the test.
"""

from __future__ import annotations

import random
import struct
import time

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V, GGUFWriter

from qatserve.errors import GGUFError
from qatserve.formats.gguf_reader import open_gguf

HOSTILE = [0, 1, 5, 13, 2**31, 2**32 - 1, 2**40, 2**62, 2**63, 2**64 - 1, -1, 9999]
SCALAR_SIZES = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4,
                V.BOOL: 1, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}


def _base_file(path) -> bytes:
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("f.u8", 7)
    w.add_int16("f.i16", -3)
    w.add_uint32("f.u32", 123456)
    w.add_float32("f.f32", 0.25)
    w.add_uint64("f.u64", 2**40)
    w.add_bool("f.bool", False)
    w.add_string("f.str", "fuzz ✓")
    w.add_array("f.arr_i32", [1, 2, 3, 4])
    w.add_array("f.arr_f32", [1.0, 2.0])
    w.add_token_list(["<unk>", "<s>", "</s>", "x", "yz"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0])
    w.add_token_types([2, 3, 3, 1, 1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(1)
    w.add_tensor("a.f32", rng.standard_normal((2, 8)).astype(np.float32))
    w.add_tensor("b.f16", rng.standard_normal((3, 4)).astype(np.float16))
    for name, qt, rows in [("c.q8_0", Q.Q8_0, 2), ("d.q4_0", Q.Q4_0, 3)]:
        blk, tsz = GGML_QUANT_SIZES[qt]
        w.add_tensor(name, rng.integers(0, 256, size=(rows, 64 // blk * tsz), dtype=np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _field_map(b: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every structural field of a *valid* file, and the end of its header."""
    fields = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    pos = 24

    def string(pos):
        fields.append((pos, 8))
        (n,) = struct.unpack_from("<Q", b, pos)
        return pos + 8 + n

    for _ in range(n_kv):
        pos = string(pos)
        fields.append((pos, 4))
        (t,) = struct.unpack_from("<I", b, pos)
        pos += 4
        if t == V.STRING:
            pos = string(pos)
        elif t == V.ARRAY:
            et, n = struct.unpack_from("<IQ", b, pos)
            fields += [(pos, 4), (pos + 4, 8)]
            pos += 12
            for _ in range(n):
                pos = string(pos) if et == V.STRING else pos + SCALAR_SIZES[V(et)]
        else:
            pos += SCALAR_SIZES[V(t)]
    for _ in range(n_tensors):
        pos = string(pos)
        (nd,) = struct.unpack_from("<I", b, pos)
        fields.append((pos, 4))
        pos += 4
        fields += [(pos + 8 * i, 8) for i in range(nd)]
        pos += 8 * nd
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields, pos


def _put(b: bytearray, off: int, width: int, value: int) -> None:
    b[off : off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _cases(base: bytes, seed: int = 20240611):
    fields, header_end = _field_map(base)
    rnd = random.Random(seed)
    # 1) every structural field x every hostile value
    for off, width in fields:
        for v in HOSTILE:
            b = bytearray(base)
            _put(b, off, width, v)
            if b != base:
                yield f"field@{off}={v}", bytes(b)
    # 2) random mixtures
    for i in range(1500):
        b = bytearray(base)
        kind = i % 4
        if kind in (0, 3):  # byte flips inside the header
            for _ in range(rnd.randint(1, 8)):
                b[rnd.randrange(header_end)] ^= rnd.randint(1, 255)
        if kind in (1, 3):  # hostile or random values in structural fields
            for _ in range(rnd.randint(1, 3)):
                off, width = rnd.choice(fields)
                _put(b, off, width, rnd.choice(HOSTILE + [rnd.getrandbits(8 * width)]))
        if kind == 2 or (kind == 3 and rnd.random() < 0.3):  # truncation, mostly in the header
            cut = rnd.randrange(header_end + 8) if rnd.random() < 0.8 else rnd.randrange(len(b))
            del b[cut:]
        if bytes(b) != base:
            yield f"mix#{i}/{kind}", bytes(b)


def test_fuzz_gguf_reader(tmp_path):
    base = _base_file(tmp_path / "base.gguf")
    with open_gguf(tmp_path / "base.gguf") as f:  # the seed file itself is valid
        assert len(f.tensors) == 4 and f.metadata["tokenizer.ggml.tokens"][4] == "yz"
    path = tmp_path / "case.gguf"
    n = n_err = 0
    worst = (0.0, "")
    failures: list[str] = []
    t_all = time.perf_counter()
    for label, blob in _cases(base):
        path.write_bytes(blob)
        n += 1
        t0 = time.perf_counter()
        try:
            with open_gguf(path) as f:
                for name, t in f.tensors.items():
                    assert f.data_offset <= t.offset and t.offset + t.nbytes <= len(blob), name
                    view = f.tensor_bytes(name)
                    assert view.size == t.nbytes and not view.flags.writeable
                    assert view.tobytes() == blob[t.offset : t.offset + t.nbytes]
                    del view
                for k, v in f.metadata.items():
                    assert f.metadata_types[k] is not None
                    if isinstance(v, np.ndarray):
                        assert not v.flags.writeable
        except GGUFError as e:
            n_err += 1
            assert str(e), label
        except Exception as e:  # anything else is a reader bug
            failures.append(f"{label}: {type(e).__name__}: {e}")
        dt = time.perf_counter() - t0
        worst = max(worst, (dt, label))
    total = time.perf_counter() - t_all
    assert not failures, f"{len(failures)} cases raised non-GGUFError:\n" + "\n".join(failures[:10])
    assert n >= 2000, n
    assert worst[0] < 1.0, f"slowest case {worst[1]} took {worst[0]:.3f}s"
    assert total < 45.0, f"{n} cases took {total:.1f}s"
    assert n_err >= n // 2, f"only {n_err}/{n} mutated cases raised GGUFError"
    print(f"{n} cases, {n_err} GGUFError, slowest {worst[0] * 1e3:.1f} ms ({worst[1]}), total {total:.1f}s")
