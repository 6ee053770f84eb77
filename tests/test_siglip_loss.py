"""SigLIP and CLIP losses against float64 references written here from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.losses import ClipLoss, SigLIPLoss, clip_loss, siglip_loss
from med3dvlm.training.optim import split_decay


def reference_siglip(
    x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """-(1/|B|) sum_ij log sigmoid(z_ij (exp(t') x_i.y_j + b)), z = +1 on the diagonal, -1 elsewhere."""
    z = 2 * torch.eye(x.shape[0], dtype=torch.float64) - 1
    logits = t_prime.exp() * x @ y.T + b
    return -torch.log(torch.sigmoid(z * logits)).sum() / x.shape[0]


def reference_clip(x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor) -> torch.Tensor:
    logits = t_prime.exp() * x @ y.T
    diagonal = logits.diagonal()
    image_to_text = (torch.logsumexp(logits, dim=1) - diagonal).mean()
    text_to_image = (torch.logsumexp(logits, dim=0) - diagonal).mean()
    return (image_to_text + text_to_image) / 2


def embeddings(
    batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    # Texts correlated with their images, so positives and negatives both matter.
    y = F.normalize(x + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    return x.to(dtype), y.to(dtype)


def value_and_grads(fn, x, y, *scalars):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, *scalars)]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 10, 64])
@pytest.mark.parametrize("t_prime, b", [(math.log(10.0), -10.0), (1.3, 0.7), (3.0, -2.5)])
def test_siglip_matches_reference_values_and_gradients(chunk_size, t_prime, b):
    x, y = embeddings(10, 6, seed=1)
    scalars = (torch.tensor([t_prime], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
    expected, expected_grads = value_and_grads(reference_siglip, x, y, *scalars)
    got, got_grads = value_and_grads(lambda *a: siglip_loss(*a, chunk_size=chunk_size), x, y, *scalars)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(("image", "text", "log_scale", "bias"), got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"gradient wrt {name}")


def test_siglip_hand_computed_value():
    # Two orthogonal pairs, x_i = y_i, t = 10, b = -10: positives score 0 and negatives -10.
    x = torch.eye(2, 4)
    loss = siglip_loss(x, x, torch.tensor(math.log(10.0)), torch.tensor(-10.0))
    expected = (2 * math.log(2.0) + 2 * math.log1p(math.exp(-10.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_siglip_module_parameters_and_defaults():
    loss = SigLIPLoss()
    params = dict(loss.named_parameters())
    assert set(params) == {"log_scale", "bias"}
    assert params["log_scale"].item() == pytest.approx(math.log(10.0))
    assert params["bias"].item() == pytest.approx(-10.0)
    assert loss.distributed == "gather" and loss.chunk_size is None
    decay, no_decay = split_decay(loss)
    assert decay == [] and set(no_decay) == {"log_scale", "bias"}


def test_siglip_module_equals_functional_and_learns_its_scalars():
    x, y = embeddings(12, 8, seed=2, dtype=torch.float32)
    module = SigLIPLoss(init_log_scale=1.0, init_bias=-3.0, chunk_size=5)
    loss = module(x, y)
    torch.testing.assert_close(loss, siglip_loss(x, y, torch.tensor(1.0), torch.tensor(-3.0)))
    loss.backward()
    assert module.log_scale.grad.abs().item() > 0 and module.bias.grad.abs().item() > 0


def test_siglip_float32_matches_float64_reference():
    x, y = embeddings(32, 16, seed=3)
    scalars = (torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    expected = reference_siglip(x, y, *scalars)
    got = siglip_loss(x.float(), y.float(), *(s.float() for s in scalars))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_siglip_ignores_autocast_and_returns_low_precision_gradients():
    x, y = embeddings(16, 8, seed=4, dtype=torch.bfloat16)
    x.requires_grad_(True)
    module = SigLIPLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, module(x.float(), y.float()))
    loss.backward()
    assert x.grad.dtype == torch.bfloat16


def test_siglip_rejects_mismatched_embeddings_and_bad_settings():
    with pytest.raises(ValueError, match=r"image \(4, 8\) and text \(3, 8\)"):
        siglip_loss(torch.randn(4, 8), torch.randn(3, 8), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="distributed='ring'"):
        SigLIPLoss(distributed="ring")
    with pytest.raises(ValueError, match="chunk_size=0"):
        SigLIPLoss(chunk_size=0)


def test_clip_matches_reference_values_and_gradients():
    x, y = embeddings(9, 5, seed=5)
    t_prime = torch.tensor([1.7], dtype=torch.float64)
    expected, expected_grads = value_and_grads(reference_clip, x, y, t_prime)
    got, got_grads = value_and_grads(clip_loss, x, y, t_prime)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_clip_module_defaults_and_scale_clamp():
    module = ClipLoss()
    assert module.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    x, y = embeddings(6, 4, seed=6, dtype=torch.float32)
    with torch.no_grad():
        module.log_scale.fill_(10.0)
    torch.testing.assert_close(module(x, y), clip_loss(x, y, torch.tensor(math.log(100.0))))
    with pytest.raises(ValueError, match="same shape"):
        module(x, y[:5])
