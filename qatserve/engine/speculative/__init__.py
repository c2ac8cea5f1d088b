"""Lossless speculative decoding: drafters behind one interface (drafter.py), verification (verify.py),
per-slot block control (controller.py), the engine-facing glue (speculator.py), flags (flags.py)."""

from qatserve.engine.speculative.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
