import math

import pytest
import torch

from halfv_export.graphs.tme import kl_last_token, truncated_entropy


def plus_minus_basis(k: int, dim: int) -> torch.Tensor:
    """Rows ±e_1..±e_k: zero mean, Gram spectrum = k equal eigenvalues (2 each), the rest 0."""
    eye = torch.eye(dim)[:k]
    return torch.cat([eye, -eye]) * 3.0


# 2k rows: n < D takes the ZZᵀ path, n >= D the ZᵀZ path
@pytest.mark.parametrize("k,dim", [(1, 40), (2, 40), (7, 40), (1, 2), (7, 10), (30, 300), (30, 45)])
def test_k_equal_eigenvalues_give_ln_k(k, dim):
    assert truncated_entropy(plus_minus_basis(k, dim)) == pytest.approx(math.log(k), abs=1e-9)


def test_truncation_keeps_top_k_only():
    z = plus_minus_basis(80, 200)  # 80 equal eigenvalues, k = 50 keeps 50 of them
    assert truncated_entropy(z, k=50) == pytest.approx(math.log(50), abs=1e-9)
    assert truncated_entropy(z, k=4) == pytest.approx(math.log(4), abs=1e-9)


@pytest.mark.parametrize("n,dim", [(10, 64), (200, 16)])
def test_rank_one_gives_zero(n, dim):
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(n, 1, generator=g), torch.randn(1, dim, generator=g)
    z = u @ v + torch.randn(1, dim, generator=g)  # a constant row offset is removed by centring
    assert truncated_entropy(z) == pytest.approx(0.0, abs=1e-6)


def test_unequal_spectrum_is_between_bounds_and_clip_quirk_changes_it():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 32, generator=g) * torch.linspace(0.1, 3, 32)
    h = truncated_entropy(z)
    assert 0 < h < math.log(32)
    # the reference's elementwise Gram clipping is available, and is not the same quantity
    assert truncated_entropy(z, clip_gram=True) != pytest.approx(h, abs=1e-3)


def test_zero_matrix_is_nan():
    assert math.isnan(truncated_entropy(torch.zeros(5, 8)))


def test_kl_is_zero_for_identical_and_positive_otherwise():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(kl_last_token(a, a)[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(kl_last_token(a, a.flip(-1))[0]) > 0.1
