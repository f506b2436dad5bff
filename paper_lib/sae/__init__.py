"""SAE architectures (one module each), the registry, and SAELens-format save/load."""

from paper_lib.sae.base import ARCHITECTURES, SAE, SAEConfig, SAEOutput
from paper_lib.sae.io import load_sae, save_sae
from paper_lib.sae.registry import REGISTRY, make_sae

__all__ = ["ARCHITECTURES", "REGISTRY", "SAE", "SAEConfig", "SAEOutput", "load_sae",
           "make_sae", "save_sae"]
