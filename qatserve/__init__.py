"""qatserve: inference for quantization-aware-trained GGUF language models."""

__version__ = "0.1.0"
