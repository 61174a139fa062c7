"""Parallelism applied by functions (the torchtitan way): FSDP2 sharding of a denoiser and the few collectives
the engine needs (gather a possibly sharded tensor, assign into one, agree on a flag across ranks).

The engine calls :func:`shard_denoiser` on the policy and the frozen reference after loading them; without a
process group (or with one worker and no option that needs FSDP2) sharding is a no-op and the collectives are
plain copies.

The options (``TrainConfig``: ``fsdp_mixed_precision``, ``activation_checkpointing``, ``cpu_offload``):

* mixed precision, GPU only: FSDP2's ``MixedPrecisionPolicy`` — bf16 parameters in forward/backward (the
  all-gathers move half the bytes), fp32 master weights and fp32 gradient reduction, fp32 outputs at the root so
  the loss maths stays fp32. The frozen reference is *stored* in bf16 (nothing updates it, and its compute is
  bf16 anyway). On CPU it is ignored, as ``bf16`` autocast is: bf16 matmuls are slower than fp32 there, and the
  CPU path exists for correctness, not speed. Everything stays fp32.
* activation checkpointing of the repeated blocks (``repeated_blocks``): each block's activations are recomputed
  in backward instead of kept; the parameter names do not change (the block's ``forward`` runs under
  ``torch.utils.checkpoint``, no wrapper module), so checkpoints and EMA keys are the same with and without it.
  Not applied to the reference (it runs without gradient).
* CPU offload: FSDP2's ``CPUOffloadPolicy`` — sharded parameters, gradients and AdamW state live in host memory
  and the optimizer steps there. It needs FSDP2, hence a process group (a Ray Train worker has one, even alone).
"""

from __future__ import annotations

import torch


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (UNet down/mid/up blocks; transformer blocks: ``transformer_blocks``
    of SD3 and CogVideoX, ``blocks`` of Wan)."""
    blocks = []
    for name in ("down_blocks", "up_blocks", "transformer_blocks", "blocks"):
        blocks += list(getattr(module, name, []))
    if getattr(module, "mid_block", None) is not None:
        blocks.append(module.mid_block)
    return blocks


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _checkpoint_activations(block: torch.nn.Module) -> None:
    """Run ``block``'s forward under non-reentrant ``torch.utils.checkpoint`` whenever gradients are on. The
    instance's ``forward`` is replaced, not the module wrapped: parameter names stay the same, and FSDP2's hooks
    (on ``__call__``) still unshard the block before its forward and before its backward, where the recompute
    runs. Torch's composable ``checkpoint`` would do the same but cannot recompute twice, which the parameter-space
    λ's extra backward passes need."""
    import functools

    from torch.utils.checkpoint import checkpoint

    if getattr(block, "_activation_checkpointed", False):
        return
    forward = block.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed
    block._activation_checkpointed = True


def activation_checkpointed(module: torch.nn.Module) -> bool:
    """Whether any block of ``module`` recomputes its activations in backward (forward-mode AD, e.g. the JVP
    method of the parameter-space λ, cannot run through such a block: the recompute has no tangents)."""
    return any(getattr(m, "_activation_checkpointed", False) for m in module.modules())


def shard_denoiser(denoiser: torch.nn.Module, device: torch.device, *, mixed_precision: bool = False,
                   activation_checkpointing: bool = False, cpu_offload: bool = False, frozen: bool = False) -> str:
    """Apply the options above, then FSDP2: shard each block, then the root, over all workers. Returns a short
    description of what was applied (for logs and benchmark reports).

    With one worker FSDP2 is applied only when an option needs it (CPU offload, or mixed precision on GPU inside
    a process group): sharding over one rank saves nothing but adds DTensor parameters, all-gather copies and
    hooks to every step. ``frozen`` marks the reference: stored in bf16 under mixed precision on GPU, never
    checkpointed.
    """
    import torch.distributed as dist

    device = torch.device(device)
    mp = mixed_precision and device.type == "cuda"
    done = []
    if mixed_precision and not mp:
        done.append("mixed precision ignored on CPU (fp32)")
    if cpu_offload and device.type != "cpu":
        # FSDP2 would keep the shards on the host, but Backbone.device reads the device off the denoiser's
        # parameters, so prompts, noise and targets would land on the CPU while the network computes on the GPU.
        raise NotImplementedError(
            f"cpu_offload=True on {device.type}: the backbone takes its compute device from the denoiser's "
            "parameters, which CPU offload moves to the host; train without cpu_offload on GPU for now")
    if frozen and mp:
        denoiser.to(torch.bfloat16)
        done.append("reference stored in bf16")
    if activation_checkpointing and not frozen:
        for block in repeated_blocks(denoiser):
            _checkpoint_activations(block)
        done.append("activation checkpointing")
    if not _process_group():
        if cpu_offload:
            raise RuntimeError("cpu_offload=True needs FSDP2 and so a process group (a Ray Train worker has one); "
                               "this process has none")
        return ", ".join(["no FSDP2 (no process group)"] + done)
    world = dist.get_world_size()
    if world == 1 and not (cpu_offload or mp):
        return ", ".join(["no FSDP2 (one worker)"] + done)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kw: dict = {}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        done.append("CPU offload")
    if mp:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        done.append("mixed precision (bf16 params, fp32 reduce)")
    for block in repeated_blocks(denoiser):
        fully_shard(block, mesh=mesh, **kw)
    if mp:  # the root hands fp32 outputs to the loss
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               output_dtype=torch.float32)
    fully_shard(denoiser, mesh=mesh, **kw)
    return ", ".join([f"FSDP2 over {world} rank(s)"] + done)


def gather(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a plain or FSDP2-sharded (DTensor) tensor (a collective when sharded)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def assign(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor (or a DTensor sharded like the target) into a plain or FSDP2-sharded (DTensor) one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor) and isinstance(full, DTensor):  # already sharded alike
            target.copy_(full)
        elif isinstance(target, DTensor):
            target.copy_(distribute_tensor(full.to(target.device), target.device_mesh, target.placements))
        else:
            target.copy_(full.to(target.device))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (every rank must call this)."""
    if not distributed():
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
