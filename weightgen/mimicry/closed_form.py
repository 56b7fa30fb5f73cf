"""Closed-form Neural Mimicry: per bank, a balanced least-squares fit via a small Gram matrix.

The big weights are only read (dot products and rank-1 updates, never stacked); every decision
happens on (L, L) and (L, n) matrices.
"""
from __future__ import annotations

import torch
from torch import nn

_EIG_REL_TOL = 1e-8  # eigenvalues below this fraction of the largest are treated as rank deficiency


def solve_bank(weights: torch.Tensor | list[torch.Tensor], templates: int, balance: bool = True,
               steps: int = 300, seed: int = 0, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit L weights ~= coefficients (L, n) @ templates (n, D); returns (templates, coefficients).

    Exact (to float rounding) when n >= rank. Under compression a plain SVD maximises the summed
    *squared* cosines, which on nearly orthogonal layers fits a few layers perfectly and leaves the
    rest near 0. With ``balance`` the template subspace is then refined to maximise the *mean
    cosine* of the unit-normalised layers; the concave sqrt is what keeps every layer alive.
    ``weights`` is an (L, D) tensor or a list of L tensors: a list is never stacked, so a bank of
    large layers costs no copy; ``out`` (n, D) receives the templates in place.
    """
    rows = [w.reshape(-1).float() for w in weights]  # views when already float32
    L, D = len(rows), rows[0].numel()
    norms = torch.stack([r.norm() for r in rows]).double()  # (L,)
    alive = norms > 0
    safe = torch.where(alive, norms, torch.ones_like(norms))
    gram = _gram(rows) / (safe[:, None] * safe[None, :])  # (L, L) Gram of unit rows
    basis = _principal_basis(gram, min(templates, L))  # (L, r): templates = basis^T @ Mhat
    if balance and templates < L and basis.shape[1] > 0:
        basis = _balance(gram, basis, alive, steps)

    bank = torch.zeros(templates, D) if out is None else out.zero_()  # (n, D)
    mix = (basis / safe[:, None]).float()  # (L, r)
    rank = basis.shape[1]
    for l, row in enumerate(rows):  # rank-1 updates: directions = mix^T @ M without stacking M
        bank[:rank].addmm_(mix[l][:, None], row[None, :])
    if rank < templates:
        bank[rank:] = _orthogonal_fill(bank[:rank], templates - rank, seed)
    # templates carry a typical layer norm so that coefficients stay O(1) for adaptation
    bank.mul_(norms[alive].pow(2).mean().sqrt().item() if alive.any() else 1.0)
    return bank, least_squares_coefficients(rows, bank)


def _gram(rows: list[torch.Tensor]) -> torch.Tensor:
    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64)
    for i, a in enumerate(rows):
        for j in range(i, len(rows)):
            gram[i, j] = gram[j, i] = torch.dot(a, rows[j]).item()
    return gram


def _principal_basis(gram: torch.Tensor, rank_cap: int) -> torch.Tensor:
    """B (L, r) with Mhat^T B the top right singular vectors of Mhat (B^T G B = I)."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0)[:rank_cap], evecs.flip(1)[:, :rank_cap]
    keep = evals > max(evals[0].item(), 0.0) * _EIG_REL_TOL
    return evecs[:, keep] / evals[keep].sqrt()


def _captured(gram: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """f_l: fraction of unit layer l inside span(Mhat^T basis), for any (non-orthonormal) basis."""
    proj = gram @ basis  # (L, r)
    inner = basis.T @ gram @ basis  # (r, r)
    return (torch.linalg.solve(inner, proj.T).T * proj).sum(1).clamp(0, 1)


@torch.enable_grad()  # callers may hold no_grad; this small ascent needs autograd
def _balance(gram: torch.Tensor, basis: torch.Tensor, alive: torch.Tensor, steps: int) -> torch.Tensor:
    """Gradient ascent of mean_l sqrt(f_l) over the subspace, on (L, r) numbers only."""
    def score(b):
        return _captured(gram, b)[alive].clamp(min=1e-12).sqrt().mean()

    param = basis.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=1e-2 * basis.abs().mean().item())
    best, best_score = basis, score(basis).item()
    since_best = 0
    for _ in range(steps):
        loss = -score(param)
        opt.zero_grad()
        loss.backward()
        opt.step()
        since_best += 1
        if -loss.item() > best_score + 1e-7:
            best, best_score, since_best = param.detach().clone(), -loss.item(), 0
        if since_best >= 25:  # converged: no measurable gain for a while
            break
    # re-orthonormalise so that templates are orthonormal directions
    inner = best.T @ gram @ best
    evals, evecs = torch.linalg.eigh(inner)
    return best @ evecs / evals.clamp(min=1e-30).sqrt()


def least_squares_coefficients(weights: torch.Tensor | list[torch.Tensor], bank: torch.Tensor) -> torch.Tensor:
    """argmin_A ||weights - A @ bank||, solved in float64 on the (n, n) normal equations."""
    cross = torch.stack([bank @ w.reshape(-1).float() for w in weights]).double()  # (L, n)
    normal = (bank @ bank.T).double()  # (n, n)
    return torch.linalg.lstsq(normal, cross.T).solution.T.float()  # (L, n)


def _orthogonal_fill(directions: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Extra unit directions orthogonal to ``directions`` (more templates than rank)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, directions.shape[1], generator=gen)  # (count, D)
    q, _ = torch.linalg.qr(torch.cat([directions, noise]).T)  # (D, min(D, r + count))
    extra = q[:, directions.shape[0]:].T
    if extra.shape[0] < count:  # more templates than a weight has entries: the surplus stays zero
        extra = torch.cat([extra, extra.new_zeros(count - extra.shape[0], directions.shape[1])])
    return extra.contiguous()


def fit_closed_form(model: nn.Module, target: dict[str, torch.Tensor], balance: bool = True,
                    seed: int | None = None) -> None:
    """Set every bank and coefficient of a recast ``model`` from ``target`` (a dense state dict).

    ``seed`` (default: the recast config's) only seeds extra templates beyond a bank's rank.
    """
    from ..recast import banks_of, recast_layers

    layers = recast_layers(model)
    seed = model.recast_config.seed if seed is None else seed
    for index, (group_name, bank) in enumerate(banks_of(model).items()):
        weights = [target[f"{name}.weight"] for name in bank.members]
        flat = bank.templates.view(bank.num_templates, -1)
        in_place = flat.dtype == torch.float32  # other dtypes are solved in float32, then cast
        with torch.no_grad():
            templates, coefficients = solve_bank(weights, bank.num_templates, balance=balance, seed=seed + index,
                                                 out=flat if in_place else None)
            if not in_place:
                flat.copy_(templates)
            for row, name in enumerate(bank.members):
                layers[name].coefficients.copy_(coefficients[row].expand_as(layers[name].coefficients))
