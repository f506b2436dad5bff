"""paper_lib: the logic behind the notebooks that reproduce four sparse-autoencoder papers.

Modules: config (notebook parameters), data (synthetic, corpus, LM, harvest), sae
(architectures + save/load), train (the one trainer), metrics, inference (ITO, sparse
coding), scaling (power-law fits), plots, widgets, claims, reproduce (Papermill driver),
bench (GPU benchmark).
"""

__version__ = "0.1.0"
