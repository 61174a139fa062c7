"""Parallelism applied by functions (the torchtitan way): FSDP2 sharding of a denoiser and the few collectives
the engine needs (gather a possibly sharded tensor, assign into one, agree on a flag across ranks).

The engine calls :func:`shard_denoiser` on the policy and the frozen reference after loading them; without a
process group (or with one worker) every function here is a no-op or a plain copy.
"""

from __future__ import annotations

import torch


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (UNet down/mid/up blocks, transformer blocks)."""
    blocks = []
    for name in ("down_blocks", "up_blocks", "transformer_blocks"):
        blocks += list(getattr(module, name, []))
    if getattr(module, "mid_block", None) is not None:
        blocks.append(module.mid_block)
    return blocks


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_denoiser(denoiser: torch.nn.Module, device: torch.device) -> None:
    """FSDP2: shard each block, then the root, over all workers (a no-op without a process group or with
    one worker: sharding over one rank saves nothing but adds DTensor parameters, all-gather copies and
    hooks to every step)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not distributed():
        return
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in repeated_blocks(denoiser):
        fully_shard(block, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)


def gather(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a plain or FSDP2-sharded (DTensor) tensor (a collective when sharded)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def assign(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a plain or FSDP2-sharded (DTensor) one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
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
