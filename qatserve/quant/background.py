"""Building every matmul kernel of a model on a worker thread while the caller does other start-up work.

Why it pays: onnxruntime releases the GIL while it builds a session (graph, kernel creation, MLAS weight
prepacking) and the repacking is mostly whole-array numpy, so this work runs on the second core beside
the caller's pure-Python work (tokenizer, HTTP stack imports), which holds the GIL. The kernels are the
same ones `QuantLinear.prepare` builds on first use; only when they are built changes.
"""

from __future__ import annotations

import threading
import time

import torch

from .linear import QuantLinear


class KernelBuild:
    """Starts at once; `wait()` returns the worker's seconds (or raises what a kernel build raised),
    `cancel()` stops it after the kernel in progress. The thread is not a daemon: the interpreter never
    exits under a running onnxruntime build (a daemon thread killed inside C++ code can abort the process)."""

    def __init__(self, model: torch.nn.Module):
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        # Biggest first (the output head is about half of the default model's work): it is the one that
        # most needs the overlap, and whatever is left at the end is small.
        self._todo = sorted(layers, key=lambda m: m.in_features * m.out_features, reverse=True)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="qatserve-kernels")
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            for layer in self._todo:
                if self._stop.is_set():
                    return
                layer.prepare()
        except BaseException as e:  # handed to wait(): the caller decides how to report it
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0

    def wait(self) -> float:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.seconds

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()
