"""Closed-form Neural Mimicry: per bank, a balanced least-squares fit via a small Gram matrix.

The big weights are only read (dot products and rank-1 updates, never stacked), on the device of
the banks; every decision happens on small (L, L) and (L, n) float64 matrices on the CPU, so the
result does not depend on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bank import banks_of
from ..layers import recast_layers
from .fidelity import bank_fidelity

_EIG_REL_TOL = 1e-8  # eigenvalues below this fraction of the largest are treated as rank deficiency


@dataclass
class _BankFit:
    """One bank's small-matrix state between preparing, balancing and writing templates."""
    rows: list[torch.Tensor]  # L flattened float32 weights on the bank's device (views, never stacked)
    norms: torch.Tensor  # (L,) float64, CPU
    gram: torch.Tensor  # (L, L) Gram of the unit-normalised rows, float64, CPU
    basis: torch.Tensor  # (L, r): template directions = basis^T @ Mhat, float64, CPU
    templates: int

    @property
    def alive(self) -> torch.Tensor:
        return self.norms > 0

    def needs_balance(self) -> bool:
        return self.templates < len(self.rows) and self.basis.shape[1] > 0


def _prepare(weights, templates: int, device: torch.device | None = None) -> _BankFit:
    # views when already float32 on ``device``
    rows = [w.reshape(-1).to(device=device or w.device, dtype=torch.float32) for w in weights]
    norms = torch.stack([r.norm() for r in rows]).double().cpu()  # (L,)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    gram = _gram(rows) / (safe[:, None] * safe[None, :])  # (L, L)
    return _BankFit(rows, norms, gram, _principal_basis(gram, min(templates, len(rows))), templates)


def _finish(fit: _BankFit, seed: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    safe = torch.where(fit.alive, fit.norms, torch.ones_like(fit.norms))
    device = fit.rows[0].device
    bank = torch.zeros(fit.templates, fit.rows[0].numel(), device=device) if out is None else out.zero_()  # (n, D)
    mix = (fit.basis / safe[:, None]).float().to(device)  # (L, r)
    rank = fit.basis.shape[1]
    for l, row in enumerate(fit.rows):  # rank-1 updates: directions = mix^T @ M without stacking M
        bank[:rank].addmm_(mix[l][:, None], row[None, :])
    if rank < fit.templates:
        bank[rank:] = _orthogonal_fill(bank[:rank], fit.templates - rank, seed)
    # templates carry a typical layer norm so that coefficients stay O(1) for adaptation
    bank.mul_(fit.norms[fit.alive].pow(2).mean().sqrt().item() if fit.alive.any() else 1.0)
    return bank, least_squares_coefficients(fit.rows, bank)


def solve_bank(weights: torch.Tensor | list[torch.Tensor], templates: int, balance: bool = True,
               steps: int = 100, seed: int = 0, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit L weights ~= coefficients (L, n) @ templates (n, D); returns (templates, coefficients).

    Exact (to float rounding) when n >= rank. Under compression a plain SVD maximises the summed
    *squared* cosines, which on nearly orthogonal layers fits a few layers perfectly and leaves the
    rest near 0. With ``balance`` the template subspace is then refined to maximise the *mean
    cosine* of the unit-normalised layers; the concave sqrt is what keeps every layer alive.
    ``weights`` is an (L, D) tensor or a list of L tensors: a list is never stacked, so a bank of
    large layers costs no copy; ``out`` (n, D) receives the templates in place.
    """
    fit = _prepare(weights, templates, None if out is None else out.device)
    if balance and fit.needs_balance():
        _balance_many([fit], steps)
    return _finish(fit, seed, out)


def _gram(rows: list[torch.Tensor]) -> torch.Tensor:
    """(L, L) float64 on the CPU; the dot products run where the rows are, in one transfer."""
    count = len(rows)
    upper = torch.triu_indices(count, count, device="cpu")  # row-major (i, j >= i), the order of the dots below
    dots = torch.stack([torch.dot(rows[i], rows[j]) for i, j in upper.T.tolist()]).double().cpu()
    gram = torch.zeros(count, count, dtype=torch.float64, device="cpu")
    gram[upper[0], upper[1]] = dots
    gram[upper[1], upper[0]] = dots
    return gram


def _principal_basis(gram: torch.Tensor, rank_cap: int) -> torch.Tensor:
    """B (L, r) with Mhat^T B the top right singular vectors of Mhat (B^T G B = I)."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0)[:rank_cap], evecs.flip(1)[:, :rank_cap]
    keep = evals > max(evals[0].item(), 0.0) * _EIG_REL_TOL
    return evecs[:, keep] / evals[keep].sqrt()


def _captured(gram: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """f_l: fraction of unit layer l inside span(Mhat^T basis), for any (non-orthonormal) basis.

    Works on one bank (L, L), (L, r) or a batch (B, L, L), (B, L, r).
    """
    proj = gram @ basis  # (..., L, r)
    inner = basis.transpose(-1, -2) @ proj  # (..., r, r)
    return (torch.linalg.solve(inner, proj.transpose(-1, -2)).transpose(-1, -2) * proj).sum(-1).clamp(0, 1)


@torch.enable_grad()  # callers may hold no_grad; this small ascent needs autograd
def _balance_many(fits: list[_BankFit], steps: int) -> None:
    """Gradient ascent of mean_l sqrt(f_l) over each bank's subspace, banks of one (L, r) batched.

    Works on (L, r) numbers only. f_l depends on the span alone, so every basis is rescaled to unit
    mean magnitude and one learning rate serves all banks; each keeps its own best.
    """
    groups: dict[tuple[int, int], list[_BankFit]] = {}
    for fit in fits:
        groups.setdefault(tuple(fit.basis.shape), []).append(fit)
    for group in groups.values():
        gram = torch.stack([f.gram for f in group])  # (B, L, L)
        alive = torch.stack([f.alive for f in group]).double()  # (B, L)
        start = torch.stack([f.basis / f.basis.abs().mean() for f in group])  # (B, L, r)

        def scores(basis):  # (B,) mean sqrt captured fraction of the alive layers
            return (_captured(gram, basis).clamp(min=1e-12).sqrt() * alive).sum(1) / alive.sum(1).clamp(min=1)

        param = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=3e-2)
        best, best_scores = start.clone(), scores(start).detach()
        since_best = 0
        for _ in range(steps):
            current = scores(param)
            opt.zero_grad()
            (-current.sum()).backward()
            better = current.detach() > best_scores + 1e-5
            if better.any():
                best[better] = param.detach()[better]
                best_scores = torch.where(better, current.detach(), best_scores)
                since_best = 0
            else:
                since_best += 1
            if since_best >= 25:  # converged: no measurable gain for a while
                break
            opt.step()
        for fit, basis in zip(group, best):
            # re-orthonormalise so that templates are orthonormal directions
            evals, evecs = torch.linalg.eigh(basis.T @ fit.gram @ basis)
            fit.basis = basis @ evecs / evals.clamp(min=1e-30).sqrt()


_LSQ_CHUNK = 1 << 16  # columns per float64 block: bounds the extra memory of a solve (and fits in cache)
_LSQ_REFINE_ABOVE = 1e3  # condition number above which one step of iterative refinement runs


@torch.no_grad()
def least_squares_coefficients(weights: torch.Tensor | list[torch.Tensor], bank: torch.Tensor) -> torch.Tensor:
    """argmin_A ||weights - A @ bank|| for weights (L, D) and bank (n, D); returns A (L, n) float32.

    Everything is accumulated in float64, a block of columns at a time (no float64 copy of the
    bank or of the weights): products of float32 numbers are exact in float64, so the Gram matrix
    carries no float32 rounding, unlike float32 normal equations, which square the bank's
    condition number at float32 precision (a relative residual ~4e-4 at condition 1e4). The
    small (n, n) system is solved on the CPU by a float64 eigendecomposition (minimum-norm on a
    rank-deficient bank); above condition 1e3 one step of iterative refinement on the float64
    residual recovers full accuracy.
    """
    rows = [w.reshape(-1) for w in weights]
    n, width = bank.shape
    count, device = len(rows), bank.device

    def products(coefficients: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gram bank @ bank^T (n, n) and bank @ (weights - coefficients @ bank)^T (n, L), float64."""
        gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        cross = torch.zeros(n, count, dtype=torch.float64, device=device)
        block = torch.empty(n + count, min(_LSQ_CHUNK, width), dtype=torch.float64, device=device)
        coef = None if coefficients is None else coefficients.to(device)
        for start in range(0, width, _LSQ_CHUNK):
            size = min(_LSQ_CHUNK, width - start)
            part = block[:, :size]
            part[:n].copy_(bank[:, start:start + size])  # (n, c)
            for i, row in enumerate(rows):
                part[n + i].copy_(row[start:start + size])  # (L, c) below the bank rows
            if coef is not None:
                part[n:] -= coef @ part[:n]  # residual rows
            both = part @ part[:n].T  # (n + L, n): Gram on top, cross products below
            gram += both[:n]
            cross += both[n:].T
        return gram.cpu(), cross.cpu()

    gram, cross = products(None)
    evals, evecs = torch.linalg.eigh(gram)  # small: the same numbers on every device
    keep = evals > evals[-1].clamp(min=1e-300) * 1e-24  # singular values below 1e-12 of the largest: rank deficiency
    inverse = evecs[:, keep] @ torch.diag(1 / evals[keep]) @ evecs[:, keep].T  # pinv(gram), (n, n)
    coefficients = (inverse @ cross).T  # (L, n)
    if keep.any() and evals[-1] > evals[keep][0] * _LSQ_REFINE_ABOVE ** 2:
        coefficients += (inverse @ products(coefficients)[1]).T
    return coefficients.float().to(device)


def _orthogonal_fill(directions: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Extra unit directions orthogonal to ``directions`` (more templates than rank)."""
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same directions on every device
    noise = torch.randn(count, directions.shape[1], generator=gen, device="cpu").to(directions.device)  # (count, D)
    q, _ = torch.linalg.qr(torch.cat([directions, noise]).T)  # (D, min(D, r + count))
    extra = q[:, directions.shape[0]:].T
    if extra.shape[0] < count:  # more templates than a weight has entries: the surplus stays zero
        extra = torch.cat([extra, extra.new_zeros(count - extra.shape[0], directions.shape[1])])
    return extra.contiguous()


def fit_closed_form(model: nn.Module, target: dict[str, torch.Tensor], balance: bool = True,
                    seed: int | None = None, release: bool = False) -> list[dict] | None:
    """Set every bank and coefficient of a recast ``model`` from ``target`` (a dense state dict).

    ``seed`` (default: the recast config's) only seeds extra templates beyond a bank's rank.
    With ``release``, each bank's fidelity rows (``weight_fidelity``'s) are measured as soon as it is
    written and its layers' entries are then removed from ``target``: a caller that holds no other
    reference to them gets their memory back bank by bank (the banks never coexist with a whole
    second model). Returns those rows with ``release``, else None.
    """
    layers = recast_layers(model)
    seed = model.recast_config.seed if seed is None else seed
    banks = list(banks_of(model).items())
    fits = [_prepare([target[f"{name}.weight"] for name in bank.members], bank.num_templates, bank.templates.device)
            for _, bank in banks]
    if balance:
        _balance_many([fit for fit in fits if fit.needs_balance()], steps=100)
    rows = [] if release else None
    for index, (group_name, bank) in enumerate(banks):
        flat = bank.templates.view(bank.num_templates, -1)
        in_place = flat.dtype == torch.float32  # other dtypes are solved in float32, then cast
        with torch.no_grad():
            templates, coefficients = _finish(fits[index], seed + index, flat if in_place else None)
            if not in_place:
                flat.copy_(templates)
            for row, name in enumerate(bank.members):
                layers[name].coefficients.copy_(coefficients[row].expand_as(layers[name].coefficients))
        if release:
            rows += bank_fidelity(layers, group_name, bank, target)
            fits[index] = templates = None  # the fit's rows are views of the targets
            for name in bank.members:
                del target[f"{name}.weight"]
    return rows
