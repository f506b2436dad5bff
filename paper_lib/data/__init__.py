"""Activation sources: synthetic ground truth, the embedded corpus and LM, harvesting."""
