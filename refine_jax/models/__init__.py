"""The Flax modules: the refinement captioner, its autoregressive baseline, the matching model and
their shared layers. A config's model is built by its kind (`model_kinds.build_model`)."""
