"""The parameter-space SDPO λ under FSDP2: two gloo processes, a sharded toy UNet, the single-process λ.

Regression for the λ that was silently 1 with ``num_workers >= 2``: ``torch.autograd.grad`` returns ``None``
for FSDP2's sharded (DTensor) parameters, so every dot product was empty. The test shards the toy world's
UNet architecture the way the training worker does (``fully_shard`` on every down/mid/up block, then on the
root) and checks, on both ranks:

* same micro-batch on both ranks → λ equals the single-process λ of that micro-batch (and is < 1, so a λ
  stuck at 1 fails);
* different micro-batches → λ is the same on both ranks and equals the single-process λ of the two
  micro-batches together (FSDP averages the ranks' gradients);
* a list of parameters collected while sharded gives the same λ as the module; a list taken between forward
  and backward (the root's unsharded copies mixed with shards) is refused;
* gradients already accumulated in ``.grad`` survive, and the caller's backward afterwards is unchanged;
* through ``preference_step`` with ``safeguard.space="parameter"``, the loser scale equals the single-process one:
  the step's default method (``"auto"``) falls back from the forward-mode JVP (single process) to two backward
  passes for the sharded denoiser, and asking for ``"jvp"`` explicitly is refused.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

MU = 0.1
PAIRS = 2  # pairs per micro-batch
WORLD = 2


def _shard(module: torch.nn.Module) -> None:
    """The training engine's own sharding: every block, then the root, on a 1-D CPU mesh."""
    from pipeline.training.parallel import shard_denoiser

    shard_denoiser(module, torch.device("cpu"))


def _forward(unet, mb):
    pred = unet(mb["x"], mb["t"], encoder_hidden_states=mb["cond"]).sample
    return pred.chunk(2)


def _step_batch():
    from pipeline.toyworld import PromptSpec, render_batch, to_tensor
    from pipeline.training import PairBatch

    specs = [PromptSpec("red", "circle", 2, "left"), PromptSpec("blue", "square", 1, "top")]
    win = to_tensor(render_batch(specs, [0, 1], 32))
    lose = to_tensor(render_batch([s.replace(colour="green") for s in specs], [2, 3], 32))
    return PairBatch(win, lose, [s.text for s in specs])


def _step_lambda(backbone, reference=None) -> float:
    from pipeline.objectives import preset
    from pipeline.training import preference_step

    cfg = preset("diffusion-dpo").with_safeguard(mu=MU, space="parameter")
    out = preference_step(backbone, cfg, _step_batch(), generator=torch.Generator().manual_seed(2), reference=reference)
    out.loss.backward()
    return float(out.loser_scale)


def _worker(rank: int, port: int, data_path: str, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from pipeline.backbones import UNetBackbone
    from pipeline.objectives import parameter_lambda_method, parameter_space_lambda
    from pipeline.training.reference import build_reference
    from pipeline.toyworld.reference import build_unet

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = torch.load(data_path, weights_only=True)
        unet = build_unet()
        unet.load_state_dict(data["state"])
        _shard(unet)
        sharded_list = [p for p in unet.parameters() if p.requires_grad]
        assert all(isinstance(p, DTensor) for p in sharded_list)
        a, b = data["A"], data["B"]
        res: dict = {}

        # Gradients of an earlier micro-batch sit in .grad: the λ must leave them alone.
        probe = data["probe"]
        pw, pl = _forward(unet, a)
        (torch.cat([pw, pl]) * probe).sum().backward()
        first = [p.grad.to_local().clone() for p in sharded_list]

        pw, pl = _forward(unet, a)
        try:  # the root's parameters are its unsharded copies now: a list mixes them with shards
            parameter_space_lambda(pw, a["tw"], pl, a["tl"], [p for p in unet.parameters()], mu=MU)
            res["mixed_list_refused"] = False
        except ValueError:
            res["mixed_list_refused"] = True
        res["same"] = float(parameter_space_lambda(pw, a["tw"], pl, a["tl"], unet, mu=MU))
        res["same_list"] = float(parameter_space_lambda(pw, a["tw"], pl, a["tl"], sharded_list, mu=MU))
        (torch.cat([pw, pl]) * probe).sum().backward()  # same forward, same loss: .grad must be exactly doubled
        res["grad_err"] = max(float((p.grad.to_local() - 2 * g).abs().max()) for p, g in zip(sharded_list, first))
        res["grad_scale"] = max(float(g.abs().max()) for g in first)
        for p in sharded_list:
            p.grad = None

        mb = a if rank == 0 else b
        pw, pl = _forward(unet, mb)
        res["different"] = float(parameter_space_lambda(pw, mb["tw"], pl, mb["tl"], unet, mu=MU))
        (pw.sum() + pl.sum()).backward()  # the caller's backward still runs through the retained graph

        backbone = UNetBackbone.from_pretrained(model_dir)
        reference = build_reference(backbone)  # the trainer's reference, taken before sharding, sharded too
        _shard(backbone.denoiser)
        _shard(reference)
        res["method"] = parameter_lambda_method(backbone.denoiser)
        try:
            parameter_lambda_method(backbone.denoiser, "jvp")
            res["jvp_refused"] = False
        except ValueError:
            res["jvp_refused"] = True
        res["step"] = _step_lambda(backbone, reference)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _micro_batch(gen: torch.Generator, unet) -> dict:
    """Pairs with loser errors correlated with the winner's (where the safeguard binds)."""
    x_w = torch.randn(PAIRS, 3, 32, 32, generator=gen)
    x = torch.cat([x_w, x_w + 0.1 * torch.randn(x_w.shape, generator=gen)])  # a loser near its winner, as x_t^w, x_t^l
    t = torch.randint(0, 1000, (PAIRS,), generator=gen).repeat(2)
    cond = torch.randn(PAIRS, 10, 64, generator=gen).repeat(2, 1, 1)
    with torch.no_grad():
        pw, pl = _forward(unet, {"x": x, "t": t, "cond": cond})
    err = torch.randn(pw.shape, generator=gen)
    return {"x": x, "t": t, "cond": cond, "tw": pw - err, "tl": pl - 2.0 * err - 0.5 * torch.randn(pl.shape, generator=gen)}


def _cat(a: dict, b: dict) -> dict:
    """Two micro-batches as one (winners first, then losers, as the forward expects)."""
    def both(k):
        aw, al = a[k].chunk(2)
        bw, bl = b[k].chunk(2)
        return torch.cat([aw, bw, al, bl])

    return {"x": both("x"), "t": both("t"), "cond": both("cond"), "tw": torch.cat([a["tw"], b["tw"]]),
            "tl": torch.cat([a["tl"], b["tl"]])}


def _single_process_lambda(unet, mb) -> float:
    from pipeline.objectives import parameter_space_lambda

    pw, pl = _forward(unet, mb)
    return float(parameter_space_lambda(pw, mb["tw"], pl, mb["tl"], list(unet.parameters()), mu=MU))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parameter_lambda_is_exact_across_fsdp2_shards(tmp_path, tiny_toy_model_dir):
    import torch.multiprocessing as mp

    from pipeline.backbones import UNetBackbone
    from pipeline.toyworld.reference import build_unet

    torch.manual_seed(0)
    unet = build_unet()
    gen = torch.Generator().manual_seed(1)
    a, b = _micro_batch(gen, unet), _micro_batch(gen, unet)
    probe = torch.randn(2 * PAIRS, 3, 32, 32, generator=gen)
    torch.save({"state": unet.state_dict(), "A": a, "B": b, "probe": probe}, tmp_path / "data.pt")

    lam_a = _single_process_lambda(unet, a)
    lam_ab = _single_process_lambda(unet, _cat(a, b))
    lam_step = _step_lambda(UNetBackbone.from_pretrained(tiny_toy_model_dir))
    assert 0.0 < lam_a < 1.0 and 0.0 < lam_ab < 1.0 and 0.0 < lam_step < 1.0, (lam_a, lam_ab, lam_step)

    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "data.pt"), str(tiny_toy_model_dir), str(tmp_path)),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for res in ranks:
        assert res["mixed_list_refused"] and res["jvp_refused"] and res["method"] == "backward"
        assert res["same"] == pytest.approx(lam_a, rel=1e-5)
        assert res["same_list"] == pytest.approx(lam_a, rel=1e-5)
        assert res["different"] == pytest.approx(lam_ab, rel=1e-5)
        assert res["step"] == pytest.approx(lam_step, rel=1e-5)
        assert res["grad_err"] <= 1e-5 * res["grad_scale"]
    assert ranks[0]["different"] == ranks[1]["different"]
