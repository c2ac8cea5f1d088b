"""onnxruntime `com.microsoft.MatMulNBits` backend: GGUF blocks repacked exactly into its layout.

MatMulNBits (CPU, ORT >= 1.20) computes y = x @ W^T with W[n, k] = scale[n, k // B] * (code[n, k] - zp),
codes of `bits` (4 or 8) bits packed LSB-first along k, zp = 2^(bits-1) when no zero_points input is given.
Every GGUF weight format here is w = s * q + c for an integer code q per value, a float scale s per block
and an optional float offset c per block (the "min" of Q4_1 / Q5_1 / Q4_K / Q5_K), so:

    code = q + (2^(bits-1) - q_mid)      # integer shift into the default zero point, exact
    x @ W^T = MatMulNBits(x) + blocksum(x) @ C^T   # C[n, k-block] = c + s*q_mid, a K/32-wide dense matmul

That keeps the kernel on its fast uint8-default-zero-point path and is exact up to float rounding
of the matmul (no re-quantisation). Formats and their mapping:

| GGUF | bits | block | code | offset |
|---|---|---|---|---|
| Q4_0 | 4 | 32 | q | - |
| Q4_1 | 4 | 32 | q | m + 8d |
| Q5_0 | 8 | 32 | q + 112 | - |
| Q5_1 | 8 | 32 | q + 112 | m + 16d |
| Q8_0 | 8 | 32 | q ^ 0x80 | - |
| Q4_K | 4 | 32 | q | 8·d·sc - dmin·m |
| Q5_K | 8 | 32 | q + 112 | 16·d·sc - dmin·m |
| Q6_K | 8 | 16 | q + 96 | - |

All repacking is vectorised numpy over whole matrices (no per-block Python loops).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from gguf import GGMLQuantizationType as T

# accuracy_level for MatMulNBits: 4 quantises activations to int8 per block (llama.cpp's CPU path does
# the same with Q8_0/Q8_K activations); 0 keeps float activations (exact up to fp32 rounding, but its
# 8-bit kernel dequantises B per call: ~40x slower at batch 1). See benchmarks/cpu_matmul.py.
ACCURACY_LEVEL = 4

# Matrices with at least this many weights get an intra-op pool of set_cpu_threads(n) threads (the
# hand-off cost is amortised); smaller ones single-threaded sessions (quant/linear.py says why).
BIG_MATRIX = 8 * 1024 * 1024

# qtype -> bytes per block, values per block (GGUF layout)
_BLOCK = {T.Q4_0: (18, 32), T.Q4_1: (20, 32), T.Q5_0: (22, 32), T.Q5_1: (24, 32), T.Q8_0: (34, 32),
          T.Q4_K: (144, 256), T.Q5_K: (176, 256), T.Q6_K: (210, 256)}
SUPPORTED = frozenset(_BLOCK)
# qtype -> (bits, block) of its MatMulNBits layout (table above); equal layouts can be concatenated.
LAYOUT = {T.Q4_0: (4, 32), T.Q4_1: (4, 32), T.Q4_K: (4, 32), T.Q5_0: (8, 32), T.Q5_1: (8, 32),
          T.Q8_0: (8, 32), T.Q5_K: (8, 32), T.Q6_K: (8, 16)}


@dataclass
class NBitsWeights:
    """One matrix in MatMulNBits layout. N = out_features, K = in_features."""

    bits: int
    block: int
    K: int
    N: int
    packed: np.ndarray             # uint8 [N, K // block, block * bits // 8]
    scales: np.ndarray             # float32 [N * K // block]
    offsets: np.ndarray | None     # float32 [K // 32, N]: C^T, per-32-block additive term (None: no min)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block -> float32 [n, 1] (one strided pass when aligned)."""
    if at % 2 == 0 and blocks.shape[1] % 2 == 0 and blocks.flags.c_contiguous:
        return blocks.view(np.float16)[:, at // 2 : at // 2 + 1].astype(np.float32)
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _nib32(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> [n, 32] (legacy layout: value j < 16 = low nibble of byte j, j >= 16 = high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """uint8 [n, 4] (little-endian uint32) -> uint8 [n, 32] of bit j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 12] (Q4_K/Q5_K packed 6-bit scales and mins) -> (sc, m) uint8 [n, 8] (get_scale_min_k4)."""
    lo, hi = sc[:, 0:4], sc[:, 4:8]
    top = sc[:, 8:12]
    s = np.concatenate([lo & 63, (top & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([hi & 63, (top >> 4) | ((hi >> 6) << 4)], axis=1)
    return s, m


def _unpack(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """uint8 [n_blocks, type_size] -> (codes uint8 [n_sub, block], scale f32 [n_sub], offset f32 [n_32] | None,
    bits, block). n_sub counts MatMulNBits blocks; offsets are per 32 values, in value order."""
    n = blocks.shape[0]
    if qtype == T.Q8_0:
        return blocks[:, 2:] ^ np.uint8(0x80), _f16(blocks, 0)[:, 0], None, 8, 32
    if qtype == T.Q4_0:
        return _nib32(blocks[:, 2:]), _f16(blocks, 0)[:, 0], None, 4, 32
    if qtype == T.Q4_1:
        d, m = _f16(blocks, 0)[:, 0], _f16(blocks, 2)[:, 0]
        return _nib32(blocks[:, 4:]), d, m + np.float32(8) * d, 4, 32
    if qtype == T.Q5_0:
        q = _nib32(blocks[:, 6:]) | (_bits32(blocks[:, 2:6]) << 4)
        return q + np.uint8(112), _f16(blocks, 0)[:, 0], None, 8, 32
    if qtype == T.Q5_1:
        d, m = _f16(blocks, 0)[:, 0], _f16(blocks, 2)[:, 0]
        q = _nib32(blocks[:, 8:]) | (_bits32(blocks[:, 4:8]) << 4)
        return q + np.uint8(112), d, m + np.float32(16) * d, 8, 32
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _k_scales(blocks[:, 4:16])
        s = d * sc.astype(np.float32)                     # [n, 8]: per-32 scale d*sc (one rounding, as ggml)
        mm = dmin * mn.astype(np.float32)                 # [n, 8]: per-32 min dmin*m
        qs = blocks[:, -128:].reshape(n, 4, 32)           # chunk j: low nibbles -> sub 2j, high -> sub 2j+1
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
        if qtype == T.Q4_K:
            return q.reshape(n * 8, 32), s.reshape(-1), (np.float32(8) * s - mm).reshape(-1), 4, 32
        qh = np.unpackbits(blocks[:, 16:48], axis=1, bitorder="little").reshape(n, 32, 8)  # [l, bit]
        q = q | (qh.transpose(0, 2, 1) << 4)              # sub-block j takes bit j of qh[l]
        return (q + np.uint8(112)).reshape(n * 8, 32), s.reshape(-1), (np.float32(16) * s - mm).reshape(-1), 8, 32
    if qtype == T.Q6_K:
        ql = blocks[:, 0:128].reshape(n, 2, 2, 32)       # [half, l-group(0: ql[l], 1: ql[l+32]), l]
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks, 208)
        lo = np.stack([ql & 0x0F, ql >> 4], axis=2)       # [n, half, nib, grp, l]: value 32*(2*nib+grp)+l
        shift = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 2, 2, 1)
        hi = (qh[:, :, None] >> shift) & 3                # qh bit pair 2*(2*nib+grp)
        q = (lo | (hi << 4)) + np.uint8(96)               # q - 32 == code - 128
        return q.reshape(n * 16, 16), (d * sc).reshape(-1), None, 8, 16
    raise NotImplementedError(f"no MatMulNBits mapping for {qtype!r}")


def repack(raw: np.ndarray, qtype, in_features: int, out_features: int) -> NBitsWeights:
    """GGUF rows (uint8, out_features * row_bytes) -> MatMulNBits initializers; exact codes and scales."""
    qtype = T(qtype)
    size, per = _BLOCK[qtype]
    if in_features % per:
        raise ValueError(f"{qtype.name}: in_features {in_features} not a multiple of {per}")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, size)
    if blocks.shape[0] != out_features * in_features // per:
        raise ValueError(f"{qtype.name}: raw holds {blocks.shape[0]} blocks, want {out_features}x{in_features}")
    codes, scales, offsets, bits, block = _unpack(blocks, qtype)
    N, K = out_features, in_features
    codes = codes.reshape(N, K // block, block)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes
    offs = None if offsets is None else np.ascontiguousarray(offsets.reshape(N, K // 32).T)
    return NBitsWeights(bits, block, K, N, np.ascontiguousarray(packed, dtype=np.uint8),
                        np.ascontiguousarray(scales, dtype=np.float32), offs)


def build_model(w: NBitsWeights, accuracy_level: int):
    """ONNX graph X [M, K] -> Y [M, N]; weights are graph inputs fed as session initializers (no copy)."""
    from onnx import TensorProto, helper

    def ext(name, arr):
        # Declared with external data; the bytes come from memory via add_external_initializers.
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", name
        return t

    nodes = [helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y0" if w.offsets is not None else "Y"],
                              domain="com.microsoft", K=w.K, N=w.N, bits=w.bits, block_size=w.block,
                              accuracy_level=accuracy_level)]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", w.K])]
    inits = [ext("B", w.packed), ext("S", w.scales)]
    if w.offsets is not None:
        # Per-block min: sum_k x_k * c_blk(k) = (sum of x over each 32-block) @ C^T, a K/32-wide matmul.
        inits += [ext("C", w.offsets), helper.make_tensor("shape", TensorProto.INT64, [3], [0, w.K // 32, 32]),
                  helper.make_tensor("axes", TensorProto.INT64, [1], [2])]
        # MLAS's MatMul takes a GEMV path at M = 1 whose rounding differs from M >= 2 (kernels/dense.py);
        # the row sums are stacked twice so that a lone row is computed exactly as in a batch.
        inits += [helper.make_tensor("zero", TensorProto.INT64, [1], [0])]
        nodes += [helper.make_node("Reshape", ["X", "shape"], ["Xb"]),
                  helper.make_node("ReduceSum", ["Xb", "axes"], ["Xs"], keepdims=0),
                  helper.make_node("Concat", ["Xs", "Xs"], ["Xs2"], axis=0),
                  helper.make_node("MatMul", ["Xs2", "C"], ["Yc2"]),
                  helper.make_node("Shape", ["X"], ["M"], start=0, end=1),
                  helper.make_node("Slice", ["Yc2", "zero", "M", "zero"], ["Yc"]),
                  helper.make_node("Add", ["Y0", "Yc"], ["Y"])]
    graph = helper.make_graph(nodes, "quant_linear", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", w.N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def make_session(w: NBitsWeights, accuracy_level: int, threads: int) -> ort.InferenceSession:
    """One CPU session for one matrix. Weights are handed over as OrtValues (ORT prepacks them at load)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Tiny graph: optimisers find nothing to fuse and cost load time.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads > 1:
        # Spinning pool threads would steal one of 2 cores from torch work between our calls.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    values = {"B": w.packed, "S": w.scales}
    if w.offsets is not None:
        values["C"] = w.offsets
    keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in values.values()]
    so.add_external_initializers(list(values), keep)
    sess = ort.InferenceSession(build_model(w, accuracy_level).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    sess._qat_keep = keep  # OrtValues borrow numpy memory; keep them alive with the session
    return sess


def concat(ws: list[NBitsWeights]) -> NBitsWeights:
    """Stack matrices sharing K, bits and block along N (e.g. q|k|v, gate|up): one kernel call for all."""
    w0 = ws[0]
    if any((w.K, w.bits, w.block) != (w0.K, w0.bits, w0.block) for w in ws):
        raise ValueError("concat needs equal in_features, bits and block size")
    offs = None
    if any(w.offsets is not None for w in ws):
        offs = np.concatenate([w.offsets if w.offsets is not None else np.zeros((w.K // 32, w.N), np.float32)
                               for w in ws], axis=1)
    return NBitsWeights(w0.bits, w0.block, w0.K, sum(w.N for w in ws),
                        np.concatenate([w.packed for w in ws]), np.concatenate([w.scales for w in ws]), offs)


# Sessions started before the model that will use them exists: the server queues the output head's (about
# half of the default model's kernel work) and the other matrices no layer fuses, and one worker thread
# builds them in that order while torch is being imported. Keyed by the weight's memory (the mapped GGUF
# bytes) and everything the session depends on, so a layer over the same bytes with the same settings takes
# it and anything else builds its own.
class _EarlyBuild:
    __slots__ = ("args", "done", "result")

    def __init__(self, args: tuple):
        self.args = args                    # (raw, qtype, in_features, out_features, accuracy_level, threads)
        self.done = threading.Event()
        self.result = None                  # the session, or the exception its build raised


_early: dict[tuple, _EarlyBuild] = {}
_early_queue: list[_EarlyBuild] = []
_early_worker: threading.Thread | None = None
_early_lock = threading.Lock()


def _early_key(raw: np.ndarray, qtype, in_features: int, out_features: int, accuracy_level: int,
               threads: int) -> tuple:
    return (raw.__array_interface__["data"][0], raw.nbytes, int(qtype), int(in_features), int(out_features),
            int(accuracy_level), int(threads))


def _early_run() -> None:
    global _early_worker
    while True:
        with _early_lock:
            if not _early_queue:
                _early_worker = None
                return
            item = _early_queue.pop(0)
        raw, qtype, in_features, out_features, accuracy_level, threads = item.args
        try:
            item.result = make_session(repack(raw, qtype, in_features, out_features), accuracy_level, threads)
        except BaseException as e:  # the layer builds its own instead, and that reports the error
            item.result = e
        item.done.set()


def build_early(raw: np.ndarray, qtype, in_features: int, out_features: int, *, threads: int,
                accuracy_level: int = ACCURACY_LEVEL) -> None:
    """Queue repacking `raw` and building its session for the one early worker thread (started on demand;
    it exits when the queue is empty); `take_early` collects it. The thread is not a daemon: the
    interpreter never exits under a running onnxruntime build."""
    global _early_worker
    key = _early_key(raw, qtype, in_features, out_features, accuracy_level, threads)
    with _early_lock:
        if key in _early:
            return
        item = _early[key] = _EarlyBuild((raw, qtype, in_features, out_features, accuracy_level, threads))
        _early_queue.append(item)
        if _early_worker is None:
            _early_worker = threading.Thread(target=_early_run, name="qatserve-early-kernel")
            _early_worker.start()


def take_early(raw: np.ndarray, qtype, in_features: int, out_features: int, accuracy_level: int,
               threads: int) -> ort.InferenceSession | None:
    """The session `build_early` queued for exactly this weight and these settings (waiting for it to be
    built), or None."""
    with _early_lock:
        item = _early.pop(_early_key(raw, qtype, in_features, out_features, accuracy_level, threads), None)
    if item is None:
        return None
    item.done.wait()
    return item.result if isinstance(item.result, ort.InferenceSession) else None


def drop_early() -> None:
    """Forget early sessions no layer took, releasing their memory: queued builds are not run, the one
    in progress is waited for."""
    with _early_lock:
        _early.clear()
        for item in _early_queue:
            item.done.set()  # result None: whoever waits on it builds its own
        _early_queue.clear()
        worker = _early_worker
    if worker is not None:
        worker.join()
