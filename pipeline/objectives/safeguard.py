"""The Diffusion-SDPO safeguard: scale the loser's gradient so the winner's loss does not rise.

A first-order step on ``L_w - λ·L_l`` leaves ``L_w`` non-increasing iff
``λ ≤ ‖∇θL_w‖² / ⟨∇θL_w, ∇θL_l⟩`` (SDPO Eq. 14). Two ways to get λ:

* **output space** (Eq. 17, Alg. 1): replace parameter gradients by the gradients with respect to the
  network output, ``g = ∂L/∂pred``, and absorb the Jacobian factor ρ into a slack μ:
  ``λ = clip((1-μ)·‖g_w‖² / ⟨g_w, g_l⟩, 0, 1)``, and ``λ = 1`` when ``⟨g_w, g_l⟩ ≤ 0``.
  Scope ``"batch"`` sums the norms over the micro-batch and gives one λ (the authors' code; not
  all-reduced across workers); ``"sample"`` gives one λ per pair.
* **parameter space** (Eq. 14 exactly, the † rows of Table 4) of the micro-batch mean residuals, three ways
  that agree to fp32 rounding:

  - ``"jvp"`` (:func:`parameter_space_lambda_jvp`, the default on an unsharded model): one extra backward gives
    ``g_w = ∇θL_w``; the loser's forward then runs with forward-mode dual parameters whose tangent is ``g_w``, so
    ``⟨g_w, ∇θL_l⟩`` is the directional derivative of ``L_l`` along ``g_w`` — a JVP riding on a forward the loss
    needs anyway, instead of a second backward. Attention runs on PyTorch's math SDPA kernel in that forward
    (the fused CPU/CUDA kernels have no forward-AD formula).
  - ``"split"``: winners and losers run as two forwards, so that ``∇θL_w`` backpropagates through the winners'
    graph only and ``∇θL_l`` through the losers' only (:func:`parameter_space_lambda` on the two halves'
    predictions): the two extra passes together cost one backward of the pair batch in FLOPs, against two for
    ``"backward"``. Faster than the JVP where a backward's cost grows with the batch (the toy UNet at 16 pairs
    per step), slower where it is dominated by writing a parameter-sized gradient (SD 1.5 at one pair per step
    on CPU): bench/results/objectives.md. It composes with activation checkpointing; the JVP does not.
  - ``"backward"`` (:func:`parameter_space_lambda`): two extra vector-Jacobian products give ∇θL_w and ∇θL_l
    through the batched forward of winners and losers. The only method for FSDP2-sharded models (forward AD
    does not reach DTensor shards): two real backward passes, local shard dot products all-reduced over the
    mesh.

  :func:`parameter_lambda_method` resolves ``"auto"`` to ``"jvp"``, to ``"split"`` for a denoiser whose blocks
  recompute their activations, and to ``"backward"`` for sharded models.
  With one pair per step the first-order guarantee is exact; with more pairs it holds for the linearised
  objective ``L_w - λ·L_l`` (the paper's footnote 2: DPO's σ factor differs per pair).

λ is applied with :func:`scale_gradient` on the loser's prediction: the forward value is unchanged and only
the gradient flowing into the loser branch is multiplied by λ. For Diffusion-DPO this is exactly Alg. 1's
``L_l.detach() + λ·(L_l - L_l.detach())``, and it plugs into any objective whose loser enters through
the loser prediction (DSPO, DMPO, DDSPO, DPO-C&M, SIPO).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Scope = Literal["batch", "sample"]
Method = Literal["auto", "split", "jvp", "backward"]
METHODS = ("auto", "split", "jvp", "backward")


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
    g_w, g_l = _output_gradient(pred_w, target_w), _output_gradient(pred_l, target_l)
    g_w, g_l = g_w.to(pred_w.dtype), g_l.to(pred_l.dtype)
    plist, sharded = _trainable(params)
    if sharded:
        grad_w, grad_l = _sharded_gradients(pred_w, g_w, pred_l, g_l, plist)
    else:
        grad_w = torch.autograd.grad(pred_w, plist, grad_outputs=g_w, retain_graph=True, allow_unused=True)
        grad_l = torch.autograd.grad(pred_l, plist, grad_outputs=g_l, retain_graph=True, allow_unused=True)
    ww, wl = _global_dots(grad_w, grad_l, zero=pred_w.new_zeros((), dtype=torch.float64))
    return _safe_ratio(ww, wl, mu).float()


def _is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` has FSDP2-sharded (DTensor) parameters."""
    return any(_is_dtensor(p) for p in module.parameters())


def parameter_lambda_method(module: nn.Module, method: Method = "auto", *,
                            checkpointed: bool = False) -> Literal["split", "jvp", "backward"]:
    """The parameter-space method to use for ``module``: ``"auto"`` is ``"jvp"``, ``"split"`` when the module's
    blocks recompute their activations in backward (``checkpointed``: forward AD cannot run through them), and
    ``"backward"`` when it has FSDP2-sharded (DTensor) parameters, where only the backward method works."""
    if method not in METHODS:
        raise ValueError(f"safeguard.method={method!r}: expected one of {METHODS}")
    if method == "backward":
        return "backward"
    if _is_sharded(module):
        if method != "auto":
            raise ValueError(f"safeguard.method={method!r}: the model is FSDP2-sharded (DTensor parameters); only "
                             "method='backward' (or 'auto') computes λ over its shards")
        return "backward"
    if checkpointed and method == "jvp":
        raise ValueError("safeguard.method='jvp': forward AD cannot run through blocks that recompute their "
                         "activations in backward (activation checkpointing); use 'split' or 'auto'")
    if method == "auto":
        return "split" if checkpointed else "jvp"
    return method


def forward_ad_kernels():
    """The kernels the JVP's forward runs on: attention on the math SDPA kernel (the fused CPU/CUDA kernels have
    no forward-AD formula). Another forward run inside this rounds exactly like the JVP's primal."""
    return sdpa_kernel(SDPBackend.MATH)


class _Closure(nn.Module):
    """Holds ``module`` as a child so that ``functional_call`` swaps its parameters while ``fn`` runs."""

    def __init__(self, module: nn.Module, fn: Callable[[], Tensor]):
        super().__init__()
        self.inner = module
        self._fn = fn

    def forward(self) -> Tensor:
        return self._fn()


def parameter_space_lambda_jvp(
    pred_w: Tensor,
    target_w: Tensor,
    loser_forward: Callable[[], Tensor],
    target_l: Tensor,
    module: nn.Module,
    *,
    mu: float,
    space: Callable[[Tensor], Tensor] | None = None,
    strict: bool = False,
) -> tuple[Tensor, Tensor]:
    """SDPO Eq. 14 exactly, with one extra backward and a forward-mode product; returns ``(λ, pred_l)``.

    ``pred_w`` is the winners' prediction, attached to the graph (kept for the caller's backward) and already
    in residual space; ``loser_forward()`` runs ``module`` on the losers and returns their prediction, which
    ``space`` maps to residual space (default: unchanged; ``target_l`` is in that space). The loser forward
    runs once, with every trainable parameter a dual tensor whose tangent is ``g_w = ∇θL_w``: the tangent of
    the output gives ``⟨g_w, ∇θL_l⟩ = ⟨∂L_l/∂pred_l, J_l g_w⟩`` and the primal, attached to the graph as any
    forward is, is returned for the loss — so the losers' forward is shared with the objective.

    Attention inside that forward uses the math SDPA kernel (the fused kernels lack forward-AD formulas); the
    winners' forward keeps the default kernels. If an op still has no forward-AD formula, the losers run again
    without dual parameters and ``∇θL_l`` comes from a second backward (a warning says so), unless ``strict``.
    Sharded (FSDP2) modules are refused: use :func:`parameter_space_lambda`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError("parameter_space_lambda_jvp needs the module (its parameters are swapped for dual tensors)")
    if _is_sharded(module):
        raise ValueError("parameter_space_lambda_jvp: the module is FSDP2-sharded; use parameter_space_lambda")
    space = space or (lambda y: y)
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    plist = [p for _, p in named]
    u_w = _output_gradient(pred_w, target_w).to(pred_w.dtype)
    grad_w = torch.autograd.grad(pred_w, plist, grad_outputs=u_w, retain_graph=True, allow_unused=True)
    zero = pred_w.new_zeros((), dtype=torch.float64)
    ww, _ = _global_dots(grad_w, [None] * len(grad_w), zero=zero)
    try:
        with fwAD.dual_level(), forward_ad_kernels():
            duals = {"inner." + name: fwAD.make_dual(p, g.to(p.dtype))
                     for (name, p), g in zip(named, grad_w) if g is not None}
            pred_l = torch.func.functional_call(_Closure(module, loser_forward), duals, ())
            primal, tangent = fwAD.unpack_dual(space(pred_l))
            pred_l = fwAD.unpack_dual(pred_l).primal
            if tangent is None:  # no trainable parameter reaches the losers' prediction
                wl = zero
            else:
                u_l = _output_gradient(primal, target_l)
                wl = torch.dot(u_l.reshape(-1), tangent.detach().float().reshape(-1)).double()
    except NotImplementedError as err:
        if strict:
            raise
        # Python's default filter shows this once per call site, not once per step.
        warnings.warn(f"parameter-space SDPO λ: forward AD failed ({str(err).splitlines()[0]}); using a second "
                      "backward pass instead (exact, slower)", RuntimeWarning, stacklevel=2)
        pred_l = loser_forward()
        res_l = space(pred_l)
        u_l = _output_gradient(res_l, target_l).to(res_l.dtype)
        grad_l = torch.autograd.grad(res_l, plist, grad_outputs=u_l, retain_graph=True, allow_unused=True)
        _, wl = _global_dots(grad_w, grad_l, zero=zero)
    return _safe_ratio(ww, wl, mu).float(), pred_l


def _output_gradient(pred: Tensor, target: Tensor) -> Tensor:
    """∂/∂pred of half the micro-batch mean squared residual, in fp32 (λ is scale-free; this fixes one scale)."""
    return (pred.detach().float() - target.float()) / pred[0].numel() / pred.shape[0]


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
