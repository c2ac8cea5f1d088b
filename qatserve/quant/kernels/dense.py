"""Row-invariant dense float32 matmul on the CPU (onnxruntime MatMul, i.e. MLAS sgemm).

Why not torch.matmul: the engine promises that a sequence's tokens are the same whether it runs alone or
batched with others (and with or without a prefix-cache hit or a speculative draft). That needs every
op that mixes rows to give each row bit-identical results whatever the number of rows. Measured with
torch 2.13 (MKL): F.linear rows differ at 1e-5 between M < 8 and M >= 8, and bmm rows differ for some
(batch, M) pairs with 2 threads. MLAS splits work over M and N only and runs one K loop per output, so
its rows are identical for every M >= 2 and any thread count (checked for M in 2..1200 on the real
shapes, tests/unit/test_row_invariance.py); M = 1 takes a GEMV path with another summation order, so a
single row is duplicated to M = 2.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch


def _session(weight: np.ndarray, threads: int) -> ort.InferenceSession:
    from onnx import TensorProto, helper

    k, n = weight.shape
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=weight.shape)
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "W"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads > 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    keep = [ort.OrtValue.ortvalue_from_numpy(weight)]
    so.add_external_initializers(["W"], keep)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess._qat_keep = (keep, weight)  # the session borrows this memory
    return sess


class DenseMatmul:
    """y = x @ W for a fixed float32 W [K, N]; each row of y is bit-identical whatever the row count."""

    def __init__(self, weight: torch.Tensor | np.ndarray, threads: int = 1):
        w = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
        self.weight = np.ascontiguousarray(w, dtype=np.float32)
        if self.weight.ndim != 2:
            raise ValueError(f"DenseMatmul needs a 2-D weight, got shape {self.weight.shape}")
        self.k, self.n = self.weight.shape
        self._run = _session(self.weight, threads)._sess.run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x float [..., K] -> float32 [..., N]."""
        lead = x.shape[:-1]
        a = x.detach().to(torch.float32).contiguous().numpy().reshape(-1, self.k)
        m = a.shape[0]
        if m == 0:
            return torch.zeros(*lead, self.n)
        if m == 1:
            a = np.concatenate([a, a])
        y = self._run(["Y"], {"X": a}, None)[0][:m]
        return torch.from_numpy(np.ascontiguousarray(y)).reshape(*lead, self.n)
