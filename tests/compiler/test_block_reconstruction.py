"""The block reconstruction's loss weighs every token alike."""

import pytest

torch = pytest.importorskip("torch")

from tforge.compiler import block_reconstruction  # noqa: E402


def test_a_massive_token_does_not_hide_the_others_errors() -> None:
    """A decoder's residual stream holds a token a hundred times larger than the rest (SmolLM2's
    first token from block 11 on); the next norm rescales it, so its size must not decide the
    loss: the same 10% error on every ordinary token counts the same with or without it."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(1, 64, 32, generator=gen)
    noisy = target + 0.1 * target.norm(dim=-1, keepdim=True) / 32**0.5 * torch.randn(1, 64, 32, generator=gen)
    others = float(block_reconstruction._relative_error(noisy[:, 1:], target[:, 1:]))
    assert 0.005 < others < 0.02

    massive = target.clone()
    massive[0, 0] *= 300.0
    out = noisy.clone()
    out[0, 0] = massive[0, 0]  # the massive token exact, the others as noisy as before
    with_massive = float(block_reconstruction._relative_error(out, massive))
    assert with_massive == pytest.approx(others * 63 / 64, rel=1e-5)
    # a whole-tensor relative error would have seen almost none of it
    whole = ((out - massive) ** 2).mean() / (massive**2).mean()
    assert float(whole) < 0.01 * with_massive
