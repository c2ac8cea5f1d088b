"""Reference log-prob files in llama.cpp's `--kl-divergence-base` format, byte for byte.

b"_logits_", int32 n_ctx, n_vocab, n_chunk, int32 tokens[n_chunk * n_ctx] (the text's tokens, before
any BOS replacement), then per chunk (n_ctx - 1 - n_ctx/2) rows of uint16[row_width(n_vocab)]
(kld.encode_logprobs). Files written here feed `llama-perplexity --kl-divergence` and vice versa.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qatserve.audit.kld import row_width
from qatserve.errors import RequestError

MAGIC = b"_logits_"


def is_logprob_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class RefFile:
    """A llama.cpp `--kl-divergence-base` file, read lazily (the rows stay on disk, memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            head = np.fromfile(self.path, dtype=np.uint8, count=20)
        except OSError as e:
            raise RequestError(f"cannot read reference {path}: {e.strerror or e}") from None
        if len(head) < 20 or head[:8].tobytes() != MAGIC:
            raise RequestError(f"{path}: not a log-prob file (no {MAGIC!r} header)")
        self.n_ctx, self.n_vocab, self.n_chunk = (int(v) for v in head[8:20].view("<i4"))
        if self.n_ctx < 3 or self.n_vocab < 1 or self.n_chunk < 1:
            raise RequestError(f"{path}: bad header (n_ctx {self.n_ctx}, n_vocab {self.n_vocab}, n_chunk {self.n_chunk})")
        self.rows = self.n_ctx - 1 - self.n_ctx // 2
        self.width = row_width(self.n_vocab)
        tok_bytes = 4 * self.n_chunk * self.n_ctx
        need = 20 + tok_bytes + 2 * self.n_chunk * self.rows * self.width
        if size < need:
            raise RequestError(f"{path}: truncated: {size} bytes, its header needs {need}")
        self.tokens = np.fromfile(self.path, dtype="<i4", count=self.n_chunk * self.n_ctx, offset=20)
        if self.tokens.min() < 0 or self.tokens.max() >= self.n_vocab:
            raise RequestError(f"{path}: token ids outside the vocabulary of {self.n_vocab}")
        self._rows = np.memmap(self.path, dtype="<u2", mode="r", offset=20 + tok_bytes,
                               shape=(self.n_chunk, self.rows, self.width))

    def chunk(self, i: int) -> np.ndarray:
        """uint16 [rows, width] of chunk i."""
        return np.asarray(self._rows[i])


class RefWriter:
    """Writes the same format; becomes visible at `path` only when `close()` succeeds."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        try:
            self.fh = open(self.tmp, "wb")
            n_chunk = len(tokens) // n_ctx
            self.fh.write(MAGIC + np.array([n_ctx, n_vocab, n_chunk], "<i4").tobytes())
            self.fh.write(np.asarray(tokens, "<i4").tobytes())
        except OSError as e:
            self.abort()
            raise RequestError(f"cannot write {path}: {e.strerror or e}") from None

    def add(self, rows: np.ndarray) -> None:
        try:
            self.fh.write(np.ascontiguousarray(rows, "<u2").tobytes())
        except OSError as e:
            self.abort()
            raise RequestError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        try:
            self.fh.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise RequestError(f"cannot write {self.path}: {e.strerror or e}") from None

    def abort(self) -> None:
        if getattr(self, "fh", None) is not None:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)
