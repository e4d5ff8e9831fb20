"""Low-rank factors of a weight, plain and activation-aware, and the least-squares fit of a diagonal between them.

All factorizations here return ``W ≈ A @ diag(d) @ B`` with ``A: [out, r]``, ``d: [r]``, ``B: [r, in]`` — the
singular values stay in the middle, where DAM's diagonal "adhesive" sits.

* ``svd_factors``: truncated SVD of ``W`` (minimises ``||W - A diag(d) B||_F``).
* ``whitened_svd_factors``: truncated SVD of ``W S`` with ``S`` the Cholesky factor of the input Gram matrix
  ``X^T X = S S^T``, mapped back by ``S^{-1}`` (minimises the output error ``||X (W - A diag(d) B)^T||_F``; the
  SVD-LLM construction).
* ``fit_diagonal``: for fixed (e.g. quantized) ``A`` and ``B``, the ``d`` that minimises
  ``||X (R - A diag(d) B)^T||_F^2`` for a target ``R``. Writing ``H = X^T X``, the error is quadratic in ``d``:

      E(d) = tr(R H R^T) - 2 sum_k d_k a_k^T R H b_k + sum_kl d_k d_l (a_k^T a_l)(b_k^T H b_l)

  (``a_k``: column k of ``A``, ``b_k``: row k of ``B``), so ``d`` solves ``G d = c`` with
  ``G = (A^T A) ⊙ (B H B^T)`` and ``c_k = (A^T R H B^T)_kk``. ``G`` is a Gram matrix (Schur product of two
  positive semi-definite matrices), so the solution is a minimum; a small ridge keeps it well posed.
"""

from __future__ import annotations

import torch


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD: ``(A [out, r], d [r], B [r, in])`` with orthonormal ``A`` columns and ``B`` rows.

    Example:
        >>> a, d, b = svd_factors(torch.randn(6, 5), 2)
        >>> a.shape, d.shape, b.shape
        (torch.Size([6, 2]), torch.Size([2]), torch.Size([2, 5]))
    """
    _check_rank(w, rank)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :rank].float(), s[:rank].float(), vh[:rank].float()


def gram_factor(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of ``X^T X + damp * mean(diag) * I`` (float64)."""
    h = gram.double()
    h = h + damp * torch.diag(h).mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(h)


def whitened_svd_factors(w: torch.Tensor, gram: torch.Tensor, rank: int,
                         damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD: the rank-``r`` ``A diag(d) B`` closest to ``W`` in output error on inputs with
    Gram matrix ``gram: [in, in]``.

    Example:
        >>> x = torch.randn(64, 5); a, d, b = whitened_svd_factors(torch.randn(6, 5), x.T @ x, 2)
    """
    _check_rank(w, rank)
    s = gram_factor(gram, damp)                                  # X^T X ≈ S S^T
    u, sig, vh = torch.linalg.svd(w.double() @ s, full_matrices=False)
    # B = V_r^T S^{-1}: solve S^T B^T = V_r  (S lower triangular)
    b = torch.linalg.solve_triangular(s.T, vh[:rank].T, upper=True).T
    return u[:, :rank].float(), sig[:rank].float(), b.float()


def fit_diagonal(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor | None = None,
                 ridge: float = 1e-6) -> torch.Tensor:
    """The ``d`` minimising ``||X (target - A diag(d) B)^T||_F`` (``gram = X^T X``; None: plain Frobenius error).

    Example:
        >>> a, d, b = svd_factors(torch.randn(6, 5), 3)
        >>> torch.allclose(fit_diagonal(a @ torch.diag(d) @ b, a, b), d, atol=1e-4)
        True
    """
    a64, b64, r64 = a.double(), b.double(), target.double()
    hb = b64.T if gram is None else gram.double() @ b64.T        # H B^T: [in, r]
    g = (a64.T @ a64) * (b64 @ hb)
    c = ((a64.T @ r64) * hb.T).sum(1)                            # diag(A^T R H B^T)
    g = g + ridge * torch.diag(g).mean().clamp_min(1e-30) * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g, c).float()


def balance(a: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``d`` into both factors so that column k of ``A'`` and row k of ``B'`` have the same norm:
    ``A' B' = A diag(d) B``.

    Stored in fp16 or quantized, neither factor should carry the whole dynamic range: the whitened SVD's ``d``
    scales with the calibration Gram (a sum over tokens, so singular values reach 1e5 and beyond on SmolLM2 — past
    fp16's 65504) while ``B = V^T S^{-1}`` shrinks by the same factor. Balanced factors hold the square root of
    both, well inside fp16's range.

    Example:
        >>> a, d, b = svd_factors(torch.randn(6, 5), 2)
        >>> a2, b2 = balance(a, d * 1e6, b / 1e6)
        >>> torch.allclose(a2 @ b2, a @ torch.diag(d) @ b, atol=1e-5), bool(a2.abs().max() < 1e2)
        (True, True)
    """
    a64, b64, d64 = a.double(), b.double(), d.double()
    na = a64.norm(dim=0).clamp_min(1e-30)                       # [r]
    nb = b64.norm(dim=1).clamp_min(1e-30)                       # [r]
    root = (d64.abs() * na * nb).sqrt()                         # sqrt of ||a_k d_k b_k^T||_F
    sign = torch.where(d64 < 0, -1.0, 1.0).to(a64)
    return (a64 * (root * sign / na)).float(), (b64 * (root / nb)[:, None]).float()


def _check_rank(w: torch.Tensor, rank: int) -> None:
    if w.dim() != 2 or not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}] for a {tuple(w.shape)} weight, got {rank}")


__all__ = ["balance", "fit_diagonal", "gram_factor", "svd_factors", "whitened_svd_factors"]
