"""refine_jax: describe an image by successive refinement with one weight-shared detailer."""
