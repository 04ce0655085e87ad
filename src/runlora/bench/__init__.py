"""The paper's benchmark: whole models (``model_bench``, what ``runlora bench`` runs) and single
layers (``layer_bench``), on shared parts below them: ``harness`` (arms timed interleaved, round
by round), ``memory`` (bytes saved for backward, peak memory) and ``report`` (CSV, JSON, tables,
plots). The benches import the parts, never the other way round."""
