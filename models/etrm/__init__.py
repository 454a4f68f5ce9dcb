"""Encoder-conditioned TRM (ETRM): arch configs, the model and its family."""
