"""ITO, sparse coding and the inference cost model on hand-checkable cases."""

import pytest
import torch

from paper_lib import metrics
from paper_lib.inference import inference_flops, refine_codes, sparse_coding


def test_ito_recovers_code_with_orthonormal_dictionary():
    """With D = I and no L1, the optimum is z = max(x, 0)."""
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    z = refine_codes(x, torch.zeros(2, 3), torch.eye(3), None, l1=0.0, steps=500, lr=0.05)
    assert torch.allclose(z, x.clamp_min(0), atol=1e-3)


def test_ito_l1_soft_threshold():
    """D = I, loss ||x - z||^2 + l1 z: the optimum is z = max(x - l1/2, 0)."""
    x = torch.tensor([[1.0, 0.1]])
    z = refine_codes(x, torch.zeros(1, 2), torch.eye(2), None, l1=0.4, steps=2000, lr=0.01)
    assert torch.allclose(z, torch.tensor([[0.8, 0.0]]), atol=2e-2)


def test_ito_support_is_respected():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    support = torch.tensor([[True, False, True]])
    z = refine_codes(x, torch.ones(1, 3), torch.eye(3), None, 0.0, 300, 0.05, support=support)
    assert z[0, 1] == 0 and abs(z[0, 2] - 3) < 1e-2


def test_sparse_coding_recovers_a_simple_dictionary():
    """Codes on orthogonal atoms: the learned dictionary matches up to permutation."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.eye(4)[:3] @ torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    codes = torch.zeros(400, 3)
    codes[torch.arange(400), torch.randint(0, 3, (400,), generator=g)] = \
        torch.rand(400, generator=g) + 0.5
    sc = sparse_coding(codes @ atoms, 3, l1=0.01, steps=1500, lr=0.03, seed=0)
    assert metrics.dictionary_mcc(atoms, sc.dictionary) > 0.99


def test_inference_flops_hand_values():
    """M = 8, N = 16: SAE 2*8*16 = 256; MLP(32) 2*(8*32 + 32*16) = 1536;
    ITO 10 steps = 256 + 10*(4*128 + 160) = 6976."""
    assert inference_flops("sae", 8, 16) == 256
    assert inference_flops("mlp", 8, 16, hidden=32) == 1536
    assert inference_flops("ito", 8, 16, steps=10) == 6976
    assert inference_flops("sparse_coding", 8, 16, steps=10) == 6720
    with pytest.raises(ValueError, match="unknown method"):
        inference_flops("magic", 8, 16)
