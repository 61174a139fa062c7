"""The Diffusion-SDPO safeguard: scale the loser's gradient so the winner's loss does not rise.

A first-order step on ``L_w - λ·L_l`` leaves ``L_w`` non-increasing iff
``λ ≤ ‖∇θL_w‖² / ⟨∇θL_w, ∇θL_l⟩`` (SDPO Eq. 14). Two ways to get λ:

* **output space** (Eq. 17, Alg. 1): replace parameter gradients by the gradients with respect to the
  network output, ``g = ∂L/∂pred``, and absorb the Jacobian factor ρ into a slack μ:
  ``λ = clip((1-μ)·‖g_w‖² / ⟨g_w, g_l⟩, 0, 1)``, and ``λ = 1`` when ``⟨g_w, g_l⟩ ≤ 0``.
  Scope ``"batch"`` sums the norms over the micro-batch and gives one λ (the authors' code; not
  all-reduced across workers); ``"sample"`` gives one λ per pair.
* **parameter space** (Eq. 14 exactly, the † rows of Table 4): two extra vector-Jacobian products give
  ∇θL_w and ∇θL_l of the micro-batch mean residuals. For validation and ablation; costs extra backward
  passes. With one pair per step the first-order guarantee is exact; with more pairs it holds for the
  linearised objective ``L_w - λ·L_l`` (the paper's footnote 2: DPO's σ factor differs per pair).
  FSDP2-sharded models are handled exactly: two real backward passes, local shard dot products
  all-reduced over the mesh (see :func:`parameter_space_lambda`).

λ is applied with :func:`scale_gradient` on the loser's prediction: the forward value is unchanged and only
the gradient flowing into the loser branch is multiplied by λ. For Diffusion-DPO this is exactly Alg. 1's
``L_l.detach() + λ·(L_l - L_l.detach())``, and it plugs into any objective whose loser enters through
the loser prediction (DSPO, DMPO, DDSPO, DPO-C&M, SIPO).
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.distributed
from torch import Tensor, nn

Scope = Literal["batch", "sample"]


def scale_gradient(x: Tensor, scale: Tensor | float) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` (per sample if 1-D)."""
    if isinstance(scale, Tensor):
        scale = scale.detach().to(x.dtype)
        if scale.dim() == 1:
            scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
    detached = x.detach()
    return detached + scale * (x - detached)


def _safe_ratio(num: Tensor, den: Tensor, mu: float) -> Tensor:
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"SDPO slack mu={mu} must lie in [0, 1]")
    lam = ((1.0 - mu) * num / den.where(den > 0, torch.ones_like(den))).clamp(0.0, 1.0)
    return torch.where(den > 0, lam, torch.ones_like(lam))


@torch.no_grad()
def output_space_lambda(
    pred_w: Tensor, target_w: Tensor, pred_l: Tensor, target_l: Tensor, *, mu: float, scope: Scope = "batch"
) -> Tensor:
    """SDPO Eq. 17 with output-space gradients ``g = pred - target`` (∝ ∂L/∂pred; the scale cancels).

    Returns a 0-d tensor for ``scope="batch"`` and a (B,) tensor for ``scope="sample"``.
    """
    g_w = (pred_w.float() - target_w.float()).flatten(1)
    g_l = (pred_l.float() - target_l.float()).flatten(1)
    if scope == "batch":
        return _safe_ratio(g_w.pow(2).sum(), (g_w * g_l).sum(), mu)
    if scope == "sample":
        return _safe_ratio(g_w.pow(2).sum(1), (g_w * g_l).sum(1), mu)
    raise ValueError(f"SDPO scope={scope!r}: expected 'batch' or 'sample'")


def parameter_space_lambda(
    pred_w: Tensor,
    target_w: Tensor,
    pred_l: Tensor,
    target_l: Tensor,
    params: Iterable[Tensor] | nn.Module,
    *,
    mu: float,
) -> Tensor:
    """SDPO Eq. 14 with exact parameter gradients of the micro-batch mean residuals (one λ per batch).

    ``params`` is the trainable module (preferred: it is the only form that works for an FSDP2 root whose
    parameters are unsharded between forward and backward) or a list of its parameters; only those with
    ``requires_grad`` count. ``pred_w``/``pred_l`` must still be attached to the graph; it is retained for the
    caller's backward.

    **Sharded (FSDP2) models.** ``torch.autograd.grad`` cannot reach FSDP2's sharded DTensor parameters (the
    forward runs on all-gathered copies and gradients reach the shards only through FSDP's reduce-scatter
    hooks), so for those λ comes from two ordinary backward passes: FSDP reduce-scatters each into the
    shards, ``‖g_w‖²`` and ``⟨g_w, g_l⟩`` are summed over each rank's local shards and all-reduced over the
    mesh, and every rank gets the same λ. The parameters' existing ``.grad`` (earlier micro-batches of an
    accumulation) is set aside and restored. FSDP averages gradients over ranks, so this is the λ of the
    data-parallel mean gradient — the single-process λ of all ranks' micro-batches together (equal sizes):
    with the same micro-batch on every rank it is exactly the single-process λ of that micro-batch. Requires
    gradient sync to be on (``set_requires_gradient_sync(True)``, the default).
    """
    g_w = (pred_w.detach().float() - target_w.float()) / pred_w[0].numel() / pred_w.shape[0]
    g_l = (pred_l.detach().float() - target_l.float()) / pred_l[0].numel() / pred_l.shape[0]
    g_w, g_l = g_w.to(pred_w.dtype), g_l.to(pred_l.dtype)
    plist, sharded = _trainable(params)
    if sharded:
        grad_w, grad_l = _sharded_gradients(pred_w, g_w, pred_l, g_l, plist)
    else:
        grad_w = torch.autograd.grad(pred_w, plist, grad_outputs=g_w, retain_graph=True, allow_unused=True)
        grad_l = torch.autograd.grad(pred_l, plist, grad_outputs=g_l, retain_graph=True, allow_unused=True)
    ww, wl = _global_dots(grad_w, grad_l, zero=pred_w.new_zeros((), dtype=torch.float64))
    return _safe_ratio(ww, wl, mu).float()


def _is_dtensor(x) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _trainable(params: Iterable[Tensor] | nn.Module) -> tuple[list[Tensor], bool]:
    """The parameters to differentiate and whether any of them is FSDP2-sharded (a DTensor)."""
    if isinstance(params, nn.Module):
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FSDPModule

            # Between forward and backward FSDP2 keeps some modules (the root, at least) unsharded, with plain
            # all-gathered tensors registered in place of the shards: reshard so that the module lists its
            # sharded parameters (the pre-backward hooks all-gather them again).
            for m in params.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
        plist = [p for p in params.parameters() if p.requires_grad]
    else:
        plist = [p for p in params if p.requires_grad]
    n_sharded = sum(_is_dtensor(p) for p in plist)
    if 0 < n_sharded < len(plist) and not isinstance(params, nn.Module):
        raise ValueError(
            f"parameter_space_lambda: {n_sharded} of {len(plist)} parameters are FSDP2 shards (DTensor) and the "
            "rest plain tensors — an FSDP2 module between forward and backward lists its unsharded copies for "
            "some modules, whose gradients never reach the shards. Pass the module itself instead of a list."
        )
    return plist, n_sharded > 0


def _sharded_gradients(pred_w: Tensor, g_w: Tensor, pred_l: Tensor, g_l: Tensor, plist: list[Tensor]):
    """∇θ of ⟨pred_w, g_w⟩ and of ⟨pred_l, g_l⟩ by two real backward passes (FSDP2 reduce-scatters each into
    the shards' ``.grad``), leaving every parameter's ``.grad`` as it was."""
    saved = [p.grad for p in plist]
    try:
        grads = []
        for pred, g in ((pred_w, g_w), (pred_l, g_l)):
            for p in plist:
                p.grad = None
            torch.autograd.backward(pred, grad_tensors=g, retain_graph=True)
            grads.append([p.grad for p in plist])
    finally:
        for p, s in zip(plist, saved):
            p.grad = s
    if not any(_is_dtensor(a) for a in grads[0]):
        raise RuntimeError(
            "parameter_space_lambda: no gradient reached the FSDP2-sharded parameters after a backward pass "
            "(is gradient sync off, set_requires_gradient_sync(False)?); the parameter-space λ needs the "
            "reduce-scattered gradients"
        )
    return grads[0], grads[1]


def _global_dots(grad_w, grad_l, *, zero: Tensor) -> tuple[Tensor, Tensor]:
    """``‖g_w‖²`` and ``⟨g_w, g_l⟩`` over all parameters; for DTensor gradients over all ranks of their mesh.

    Per-parameter dot products in fp32 (no float64 copy of ~1e9 gradient entries), summed in float64, kept on
    the device (one host sync when λ is used, not one per parameter). A DTensor contributes the dot products
    of its local shard, summed over the mesh dimensions it is sharded on (replicated dimensions hold copies
    and are not summed); pending (Partial) reductions are completed first. A plain tensor contributes its
    own gradient (in a sharded model: a parameter FSDP ignores, whose gradient is this rank's, not averaged).
    """
    local_ww, local_wl = [], []
    meshes: dict[tuple, tuple] = {}  # (id(mesh), sharded dims) -> (mesh, dims, ww list, wl list)
    for a, b in zip(grad_w, grad_l):
        if a is None:
            continue
        ww_list, wl_list = local_ww, local_wl
        if _is_dtensor(a):
            a = _complete_partial(a)
            if b is not None:
                b = _complete_partial(b)
                if b.placements != a.placements:
                    b = b.redistribute(a.device_mesh, a.placements)
                b = b.to_local()
            dims = tuple(i for i, pl in enumerate(a.placements) if pl.is_shard())
            key = (id(a.device_mesh), dims)
            if key not in meshes:
                meshes[key] = (a.device_mesh, dims, [], [])
            _, _, ww_list, wl_list = meshes[key]
            a = a.to_local()
        a = a.reshape(-1).float()
        ww_list.append(torch.dot(a, a))
        if b is not None:
            wl_list.append(torch.dot(a, b.reshape(-1).float()))
    total = lambda xs: torch.stack(xs).double().sum() if xs else zero  # noqa: E731
    ww, wl = total(local_ww), total(local_wl)
    for mesh, dims, ww_list, wl_list in meshes.values():  # same order on every rank: the model's parameter order
        # The collective runs on the mesh's device (gradients may be offloaded to the host).
        dev = ww.device if ww.device.type == mesh.device_type else torch.device(mesh.device_type)
        sums = torch.stack([total(ww_list).to(dev), total(wl_list).to(dev)])
        for d in dims:
            torch.distributed.all_reduce(sums, group=mesh.get_group(d))
        ww, wl = ww + sums[0].to(ww.device), wl + sums[1].to(ww.device)
    return ww, wl


def _complete_partial(x):
    from torch.distributed.tensor import Replicate

    if any(pl.is_partial() for pl in x.placements):
        return x.redistribute(x.device_mesh, [Replicate() if pl.is_partial() else pl for pl in x.placements])
    return x


def lambda_stats(lam: Tensor) -> dict[str, Tensor]:
    """Mean/min/max of λ and the fraction of pairs (or batches) where the safeguard was active (λ < 1)."""
    lam = lam.detach().float().reshape(-1)
    return {
        "lambda_mean": lam.mean(),
        "lambda_min": lam.min(),
        "lambda_max": lam.max(),
        "lambda_active_frac": (lam < 1.0).float().mean(),
    }
