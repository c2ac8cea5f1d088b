"""Turns named GGUF tensors into modules (QuantLinear, QuantEmbedding) and float vectors, checking shapes.

Quantised weights stay in their GGUF blocks; only 1-D tensors (norms) are dequantised to float32.
"""

from __future__ import annotations

import torch

from qatserve.errors import ModelError
from qatserve.formats.gguf_reader import GGUFFile, TensorInfo
from qatserve.quant.blocks import dequantize
from qatserve.quant.linear import QuantEmbedding, QuantLinear


class WeightLoader:
    """Hands out the tensors of one GGUF file by name, each checked against the shape the model expects."""

    def __init__(self, gguf: GGUFFile, backend: str = "auto"):
        self.gguf = gguf
        self.backend = backend
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

    def unused(self) -> list[str]:
        """Tensors present in the file that no module took (a sign of an unsupported variant)."""
        return [n for n in self.gguf.tensors if n not in self.used]
