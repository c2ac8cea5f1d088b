"""`qatserve audit`: KL-divergence and perplexity of a model against a reference, as llama-perplexity.

The figures are those of llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp,
build b1-0c1e570), computed the same way so that they compare 1:1:
- The whole text is tokenised once with BOS (when the vocabulary adds one; EOS-adding vocabularies are
  refused, as there), after dropping one trailing newline (llama.cpp's -f does). It is cut into
  n_chunk = min(--chunks, len // n_ctx) chunks of n_ctx tokens (at least 2 * n_ctx tokens needed); each
  chunk is scored from an empty cache with its first token replaced by BOS, and only positions
  first = n_ctx/2 .. n_ctx-2 count, each predicting the next token of the original text.
- The reference's log-probs are stored as llama.cpp stores them (`encode_logprobs`): per row a float32
  scale and minimum and 16-bit codes of logit - min over [max - 16, max]; KLD, PPL(base) and the base
  top-1 come from these codes, never from the raw reference logits, exactly as in llama.cpp.
- Per row, in llama.cpp's float/double mix (`kld_rows`): nll = max + log(sum exp) - logit[tok] in
  float32; KLD = sum over tokens with base log-prob > -16 of p_base * (log p_base - log p), summed in
  double; Δp = p(tok) - p_base(tok). Sums are float64; uncertainties use llama.cpp's formulas
  (`mean_and_uncertainty`, `covariance`); the median and percentiles use its float32 interpolation.
- "Flips" (not in llama.cpp): positions where exactly one of model and reference has the actual next
  token as its top-1 (right -> wrong, wrong -> right): answers that change, not mere top-1 disagreement.

Reference files (`--save-ref`, and `--ref FILE`) use llama.cpp's `--kl-divergence-base` format byte for
byte: b"_logits_", int32 n_ctx, n_vocab, n_chunk, int32 tokens[n_chunk * n_ctx], then per chunk
(n_ctx - 1 - n_ctx/2) rows of uint16[2 * ceil(n_vocab / 2) + 4]. So a file saved here feeds
`llama-perplexity --kl-divergence` and one it saved feeds `qatserve audit`. Size: 2 bytes per vocabulary
entry per scored token (half of float32; Gemma 3, 20 chunks of 512: 2.7 GB); it is what the exact KLD
needs, where a top-k file would change the figures.

Deviation: llama.cpp prints no summary below 100 scored tokens; we print it with a note.
"""

from qatserve.audit.kld import AuditReport, KLDAccumulator, encode_logprobs, kld_rows, row_width
from qatserve.audit.logprob_file import MAGIC, RefFile, RefWriter, is_logprob_file
from qatserve.audit.run import KV_TYPES, make_setup, plot_kld, run_audit, run_audit_cli, score_tokens

__all__ = ["AuditReport", "KLDAccumulator", "encode_logprobs", "kld_rows", "row_width", "MAGIC", "RefFile",
           "RefWriter", "is_logprob_file", "KV_TYPES", "make_setup", "plot_kld", "run_audit", "run_audit_cli",
           "score_tokens"]
