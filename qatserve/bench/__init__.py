"""Benchmarks: `qatserve bench` (lanes.py, measure.py, runner.py, report.py, plot.py, command.py) and
synthetic model files in the layout of released models (`synth`, `shapes`)."""

# The reference workload users report: a 1150-token prompt and 2000 generated tokens (issue 7). Kept here,
# import-free, because the CLI parser shows them as defaults.
REF_PROMPT, REF_GEN = 1150, 2000
