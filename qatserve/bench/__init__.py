"""Benchmark support: synthetic model files in the layout of released models (`synth`, `shapes`)."""
