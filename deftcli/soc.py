r"""Stochastic optimal control of the reverse SDE: the controlled rollout, the log-RND and the losses.

Controlled reverse SDE (DESIGN.md §1) on the reversed-time grid s_k, t_k = 1 − s_k:

    x_{k+1} = x_k + [½ β x_k + β (s_θ + h)] Δs_k + √β ΔW_k,      ΔW_k = √Δs_k ξ_k

Per trajectory, with g_t = √β and sg the stop-gradient,

    T1 = −½ Σ β ‖h‖² Δs,   T2 = Σ β ⟨h, sg(h)⟩ Δs,   T3 = Σ g_t ⟨h, ΔW⟩,   D = ‖A x_final − y‖² / (2 σ_y²)
    log-RND  L = D + T1 + T2 + T3,        SOC objective  J = mean(D − T1)  (data term + KL).

With a likelihood weight w (fine-tuning for the tempered posterior p(x) p(y | x)^w) D is w times
this, i.e. σ_y → σ_y/√w, and h is the h-network fine-tuned for that likelihood.

x_final is the state after the last step (t = ε) itself, not its Tweedie-denoised version, as in the
original code; `deft sample` and `deft eval` return the denoised x̂0 at t = ε by default (one more
score evaluation, ``denoise_final``).

VarGrad minimises Var(L). With the trajectory detached, L depends on the parameters only through h
at the gradient-carrying steps S, and ∇Var(L) = Σ_b w_b ∇L_b with w_b = ∂Var/∂L_b
(= 2 (L_b − L̄)/(B − 1) for one group). So :func:`rollout` computes every L_b without any autograd
graph, storing (x_k, g_k, ξ_k) for k ∈ S, and :func:`accumulate_vargrad_gradient` replays those steps
one at a time, each graph freed after its backward: memory does not grow with N.

Everything here is float32: a network that runs in bf16 returns float32 itself
(:class:`~deftcli.devices.Runtime`), so no precision context reaches the RND sums or the loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ContextManager

import torch
from torch import Tensor

from .htransform import ConditionalScore, HTransform
from .operators import Operator
from .priors import Prior
from .samplers import NoiseSampler, ReplayedNoise, ReverseStep, noise_like, sample_reverse_sde, time_batch


def data_term(operator: Operator, x: Tensor, y: Tensor, likelihood_weight: float = 1.0) -> Tensor:
    """D = w ‖A x − y‖² / (2 σ_y²) per trajectory: −log p(y | x)^w up to a constant (w = 1: the posterior)."""
    return likelihood_weight * (operator.A(x) - y).flatten(1).pow(2).sum(1) / (2 * operator.sigma**2)


def step_terms(h: Tensor, beta: Tensor, ds: float, xi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """This step's contributions (−½ β‖h‖²Δs, β⟨h, sg h⟩Δs, √β⟨h, √Δs ξ⟩) per trajectory."""
    h = h.float().flatten(1)
    beta = beta.float()
    t1 = -0.5 * beta * h.pow(2).sum(1) * ds
    t2 = beta * (h * h.detach()).sum(1) * ds
    t3 = beta.sqrt() * (h * xi.flatten(1)).sum(1) * math.sqrt(ds)
    return t1, t2, t3


def gradient_steps(n_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """A random subset of ⌊fraction · n_steps⌋ step indices, plus the last two steps, sorted."""
    body = max(0, n_steps - 2)
    chosen = torch.randperm(body, generator=generator)[: int(fraction * n_steps)].tolist() if body else []
    return sorted(set(chosen) | set(range(body, n_steps)))


@dataclass
class StoredStep:
    """What the gradient pass needs to recompute h at step k: the state, g and the noise."""

    k: int
    x: Tensor
    g: Tensor
    xi: Tensor


@dataclass
class Rollout:
    """A batch of controlled trajectories: final states, RND sums, and the stored gradient steps."""

    x_final: Tensor
    t1: Tensor
    t2: Tensor
    t3: Tensor
    stored: list[StoredStep] = field(default_factory=list)

    def log_rnd(self, d: Tensor) -> Tensor:
        """L = D + T1 + T2 + T3."""
        return d + self.t1 + self.t2 + self.t3


def rollout(
    prior: Prior,
    htransform: HTransform,
    operator: Operator,
    y: Tensor,
    x: Tensor,
    grid: Sequence[float],
    noise: NoiseSampler,
    store_steps: Sequence[int] = (),
) -> Rollout:
    """Roll out the controlled SDE from x (t = 1) without autograd (the reverse-SDE loop with the score s_θ + h);
    sum the RND terms of every step and store the steps in ``store_steps``."""
    store = set(store_steps)
    zeros = torch.zeros(x.shape[0], device=x.device)
    out = Rollout(x, zeros, zeros.clone(), zeros.clone())
    controlled = ConditionalScore(prior, htransform, operator, y)

    def record(step: ReverseStep) -> None:
        assert controlled.last is not None
        g, h = controlled.last
        t1, t2, t3 = step_terms(h, prior.sde.beta(step.t), step.ds, step.xi)
        out.t1 += t1
        out.t2 += t2
        out.t3 += t3
        if step.k in store:
            out.stored.append(StoredStep(step.k, step.x, g, step.xi))

    out.x_final = sample_reverse_sde(controlled, prior.sde, x, grid, noise, callback=record)
    return out


def accumulate_vargrad_gradient(
    htransform: torch.nn.Module,
    prior: Prior,
    grid: Sequence[float],
    stored: Sequence[StoredStep],
    weights: Tensor,
    no_sync: Callable[[torch.nn.Module, bool], ContextManager] | None = None,
) -> None:
    """Add Σ_b w_b ∇L_b to the parameters' .grad, one stored step (one small graph) at a time.

    ``htransform`` may be a DistributedDataParallel wrapper; ``no_sync(module, sync)`` then defers
    its gradient all-reduce to the last backward pass of the step.
    """
    for i, step in enumerate(stored):
        t = time_batch(grid[step.k], step.x)
        ds = grid[step.k + 1] - grid[step.k]
        with no_sync(htransform, i == len(stored) - 1) if no_sync else contextlib.nullcontext():
            h = htransform(step.x, t, step.g)
            t1, t2, t3 = step_terms(h, prior.sde.beta(t), ds, step.xi)
            (weights * (t1 + t2 + t3)).sum().backward()


def vargrad_loss(log_rnd: Tensor, groups: Tensor) -> Tensor:
    """Mean over measurement groups of the unbiased within-group variance of L.

    log Z(y) differs between measurements, so a variance across different y would be wrong;
    groups with fewer than two trajectories contribute nothing.
    """
    ids, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(ids), device=log_rnd.device, dtype=log_rnd.dtype).index_add(0, inverse, log_rnd)
    means = sums / counts
    sq = torch.zeros_like(sums).index_add(0, inverse, (log_rnd - means[inverse]) ** 2)
    valid = counts >= 2
    if not valid.any():
        return log_rnd.sum() * 0.0
    return (sq[valid] / (counts[valid] - 1)).mean()


@dataclass
class FilteredLoss:
    """The VarGrad loss on the kept trajectories and its gradient w.r.t. this process's L_b (0 for dropped ones)."""

    loss: Tensor
    weights: Tensor
    kept: Tensor  # over all processes' trajectories
    skipped: bool


def vargrad_weights(
    log_rnd: Tensor,
    groups: Tensor,
    threshold: float,
    min_kept_fraction: float,
    gather: Callable[[Tensor], Tensor] = lambda v: v,
    gather_groups: Callable[[Tensor], Tensor] = lambda v: v,
) -> FilteredLoss:
    """Drop non-finite L and L ≥ threshold, then w_b = ∂ vargrad_loss / ∂L_b by autograd on the values.

    The step is ``skipped`` when fewer than ``min_kept_fraction`` of the trajectories remain. With
    data parallelism, ``gather`` is an autograd-aware all-gather: every process computes the same
    loss over all trajectories and receives world_size × the gradient for its own rows, which
    DDP's averaging turns into the exact gradient.
    """
    leaf = log_rnd.detach().requires_grad_(True)
    values, all_groups = gather(leaf), gather_groups(groups)
    kept = torch.isfinite(values.detach()) & (values.detach() < threshold)
    n_kept = int(kept.sum())
    if n_kept <= int(min_kept_fraction * values.numel()) or n_kept < 2:
        return FilteredLoss(torch.tensor(float("nan")), torch.zeros_like(log_rnd), kept, True)
    safe = torch.where(kept, values, torch.zeros_like(values))
    loss = vargrad_loss(safe[kept], all_groups[kept])
    (weights,) = torch.autograd.grad(loss, leaf)
    return FilteredLoss(loss.detach(), weights, kept, False)


def backprop_soc_gradient(
    prior: Prior,
    htransform: torch.nn.Module,
    operator: Operator,
    y: Tensor,
    x: Tensor,
    grid: Sequence[float],
    noise: NoiseSampler,
    micro_batch: int | None = None,
    checkpointing: bool = True,
    no_sync: Callable[[torch.nn.Module, bool], ContextManager] | None = None,
    likelihood_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference method: ∇J by backpropagation through whole trajectories (the prior included).

    J = mean_b (D_b + ½ Σ_k β ‖h‖² Δs), along the reverse-SDE loop with the graph kept. Each step's network
    evaluations (s_θ and h) are gradient-checkpointed and trajectories are
    processed in micro-batches whose gradients accumulate; memory still grows with N (one state per
    step). The noise of all steps is drawn first, step by step for the whole batch as in
    :func:`rollout`, so checkpoint recomputation is exact and micro-batching does not change the
    result. ``htransform`` may be a DDP wrapper (see :func:`accumulate_vargrad_gradient`).
    D carries the likelihood weight w (:func:`data_term`). Returns per-trajectory (D, KL, x_final), detached.
    """
    sde = prior.sde
    batch = x.shape[0]
    micro = micro_batch or batch
    noises = [noise_like(x, noise) for _ in range(len(grid) - 1)]
    d_all, kl_all, x_all = [], [], []
    for start in range(0, batch, micro):
        sl = slice(start, start + micro)
        y_k = y[sl]

        def controlled_score(x_k: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            """s_θ + h and h at (x_k, t); g is detached, the prior and h carry gradients."""
            score = prior.score(x_k, t)
            with torch.no_grad():
                g = operator.likelihood_grad(sde.tweedie_x0(x_k, score, t), y_k)
            h = htransform(x_k, t, g)
            return score + h, h

        evaluated: list[Tensor] = []

        def score_fn(x_k: Tensor, t: Tensor) -> Tensor:
            if checkpointing:
                total, h = torch.utils.checkpoint.checkpoint(controlled_score, x_k, t, use_reentrant=False)
            else:
                total, h = controlled_score(x_k, t)
            evaluated.append(h)
            return total

        kl = torch.zeros(y_k.shape[0], device=x.device)

        def add_kl(step: ReverseStep) -> None:
            nonlocal kl
            kl = kl + 0.5 * sde.beta(step.t) * evaluated.pop().flatten(1).pow(2).sum(1) * step.ds

        x_final = sample_reverse_sde(
            score_fn, sde, x[sl], grid, ReplayedNoise([n[sl] for n in noises]), callback=add_kl, keep_graph=True
        )
        d = data_term(operator, x_final, y_k, likelihood_weight)
        with no_sync(htransform, start + micro >= batch) if no_sync else contextlib.nullcontext():
            ((d + kl).sum() / batch).backward()
        d_all.append(d.detach())
        kl_all.append(kl.detach())
        x_all.append(x_final.detach())
    return torch.cat(d_all), torch.cat(kl_all), torch.cat(x_all)
