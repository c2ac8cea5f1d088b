"""Turns named GGUF tensors into modules (QuantLinear, QuantEmbedding) and float vectors, checking shapes.

Quantised weights stay in their GGUF blocks; only 1-D tensors (norms) are dequantised to float32.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from qatserve.errors import ModelError
from qatserve.formats.gguf_reader import GGUFFile, TensorInfo
from qatserve.models.common import numerics_for
from qatserve.quant.blocks import dequantize
from qatserve.quant.linear import QuantEmbedding, QuantLinear


class WeightLoader:
    """Hands out the tensors of one GGUF file by name, each checked against the shape the model expects."""

    def __init__(self, gguf: GGUFFile, backend: str = "auto", numerics: str | None = None):
        self.gguf = gguf
        self.backend = backend
        # Non-matmul numerics for the models built from this loader (models.common.Numerics):
        # "ggml" or "torch"; None follows the backend ("ggml" backend -> llama.cpp's numerics).
        self.numerics = numerics_for(numerics or backend)
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def _info(self, name: str, ne: tuple[int, ...]) -> TensorInfo:
        info = self.gguf.tensors.get(name)
        if info is None:
            raise ModelError(f"missing required tensor {name!r}")
        if tuple(info.ne) != tuple(ne):
            raise ModelError(f"tensor {name!r}: expected shape {list(ne)}, got {list(info.ne)}")
        self.used.add(name)
        return info

    def linear(self, name: str, in_features: int, out_features: int) -> QuantLinear:
        """A [out, in] weight (GGUF ne = (in, out)) as a QuantLinear over the mapped blocks."""
        info = self._info(name, (in_features, out_features))
        raw = self.gguf.tensor_bytes(name).reshape(out_features, -1)
        return QuantLinear(raw, info.ggml_type, in_features, out_features, backend=self.backend)

    def expert_linears(self, name: str, n_expert: int, in_features: int, out_features: int) -> list[QuantLinear]:
        """A stack of expert weights [n_expert, out, in] (GGUF ne = (in, out, n_expert)): one QuantLinear each."""
        info = self._info(name, (in_features, out_features, n_expert))
        raw = self.gguf.tensor_bytes(name).reshape(n_expert * out_features, -1)
        return [
            QuantLinear(raw[e * out_features : (e + 1) * out_features], info.ggml_type, in_features, out_features,
                        backend=self.backend)
            for e in range(n_expert)
        ]

    def embedding(self, name: str, n_vocab: int, dim: int) -> QuantEmbedding:
        info = self._info(name, (dim, n_vocab))
        raw = self.gguf.tensor_bytes(name).reshape(n_vocab, -1)
        return QuantEmbedding(raw, info.ggml_type, n_vocab, dim)

    def vector(self, name: str, n: int) -> torch.Tensor:
        info = self._info(name, (n,))
        return dequantize(self.gguf.tensor_bytes(name), info.ggml_type, (n,)).contiguous()

    def index_vector(self, name: str, n: int) -> torch.Tensor:
        """An integer tensor [n] (I32/I64, or F32/F16 holding whole numbers) as int64, e.g. a permutation."""
        info = self._info(name, (n,))
        raw = self.gguf.tensor_bytes(name)
        if info.ggml_type in (T.I32, T.I64):
            return torch.from_numpy(raw.view(np.int32 if info.ggml_type == T.I32 else np.int64).astype(np.int64))
        values = dequantize(raw, info.ggml_type, (n,)).double()
        if not bool((values == values.round()).all()):
            raise ModelError(f"tensor {name!r}: expected integers")
        return values.long()

    def unused(self) -> list[str]:
        """Tensors present in the file that no module took (a sign of an unsupported variant)."""
        return [n for n in self.gguf.tensors if n not in self.used]
