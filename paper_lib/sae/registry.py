"""Architecture registry: name -> SAE class, and `make_sae` to build one from a config."""

from __future__ import annotations

from paper_lib.sae.base import ARCHITECTURES, READ_ONLY, SAE, SAEConfig
from paper_lib.sae.batchtopk import BatchTopKSAE
from paper_lib.sae.jumprelu import JumpReLUSAE
from paper_lib.sae.matryoshka import MatryoshkaSAE
from paper_lib.sae.mlp import MLPSAE
from paper_lib.sae.relu import ReLUSAE
from paper_lib.sae.topafa import TopAFASAE
from paper_lib.sae.topk import TopKSAE

REGISTRY: dict[str, type[SAE]] = {
    cls.architecture: cls
    for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, MatryoshkaSAE, TopAFASAE, MLPSAE, JumpReLUSAE)
}
assert sorted(REGISTRY) == sorted(ARCHITECTURES + READ_ONLY)


def make_sae(cfg: SAEConfig) -> SAE:
    """Instantiate the architecture named by cfg.architecture."""
    try:
        cls = REGISTRY[cfg.architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; "
                         f"choose one of {', '.join(sorted(REGISTRY))}") from None
    return cls(cfg)
