"""The paper's benchmark: whole models (``model_bench``, what ``runlora bench`` runs) and single
layers (``layer_bench``), timed with arms interleaved round by round."""
