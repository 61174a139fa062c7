"""The preference step through the backbone interface: every preset trains, DDSPO needs c⁻, SDPO spaces agree."""

import pytest
import torch

from pipeline.objectives import PRESETS, SafeguardConfig, preset
from pipeline.toyworld import PromptSpec, render_batch, to_tensor
from pipeline.training import PairBatch, preference_step

SPECS = [PromptSpec("red", "circle", 2, "left"), PromptSpec("blue", "square", 1, "top")]


def batch(perturbed=True):
    win = to_tensor(render_batch(SPECS, [0, 1], 32))
    lose = to_tensor(render_batch([s.replace(colour="green") for s in SPECS], [2, 3], 32))
    return PairBatch(win, lose, [s.text for s in SPECS], ["red circles on", "a square top"] if perturbed else None)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_takes_a_step(name, tiny_toy_backbone):
    bb = tiny_toy_backbone
    opt = torch.optim.SGD(bb.trainable_parameters(), lr=1e-3)
    out = preference_step(bb, preset(name).with_safeguard(mu=0.5), batch(), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grad = sum(float(p.grad.abs().sum()) for p in bb.trainable_parameters() if p.grad is not None)
    assert torch.isfinite(out.loss) and grad > 0
    opt.step()
    if PRESETS[name].needs_importance_weights:
        assert "iw_mean" in out.metrics


def test_ddspo_requires_perturbed_prompts(tiny_toy_backbone):
    with pytest.raises(ValueError, match="perturbed prompt"):
        preference_step(tiny_toy_backbone, preset("ddspo"), batch(perturbed=False))


def test_reference_equals_policy_at_start_so_the_logit_is_zero(tiny_toy_backbone):
    out = preference_step(tiny_toy_backbone, preset("diffusion-dpo"), batch(), generator=torch.Generator().manual_seed(1))
    assert abs(float(out.metrics["logit_mean"])) < 1e-4
    assert float(out.loss) == pytest.approx(0.6931, abs=1e-3)  # log 2


def test_parameter_space_safeguard_runs_through_the_step(tiny_toy_backbone):
    cfg = preset("diffusion-dpo").with_safeguard(mu=0.0)
    cfg_param = preset("diffusion-dpo").with_safeguard(mu=0.0, space="parameter")
    a = preference_step(tiny_toy_backbone, cfg, batch(), generator=torch.Generator().manual_seed(2))
    b = preference_step(tiny_toy_backbone, cfg_param, batch(), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.loss, b.loss)  # the forward value does not depend on λ
    assert 0.0 <= float(b.metrics["lambda_mean"]) <= 1.0


def test_batch_shapes_are_checked():
    with pytest.raises(ValueError, match="do not line up"):
        PairBatch(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), ["only one prompt"])
    assert SafeguardConfig().space == "output"


def test_every_preset_is_finite_on_the_shipped_zero_terminal_snr_v_process(tiny_toy_model_dir):
    """The shipped reference's process (v-prediction, ᾱ_T = 0, "trailing" sampling): every timestep, t = T−1
    included, gives a finite loss, importance weight and gradient for every preset."""
    from pipeline.backbones import UNetBackbone
    from pipeline.toyworld.reference import build_scheduler

    base = UNetBackbone.from_pretrained(tiny_toy_model_dir)
    bb = UNetBackbone(base.tokenizer, base.text_encoder, base.denoiser, build_scheduler().config)
    assert bb.process.parameterization.value == "v_prediction" and float(bb.process.alphas[-1]) == 0.0
    for name in sorted(PRESETS):
        bb.denoiser.zero_grad(set_to_none=True)
        out = preference_step(bb, preset(name), batch(), generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = [p.grad for p in bb.trainable_parameters() if p.grad is not None]
        assert torch.isfinite(out.loss) and all(bool(torch.isfinite(g).all()) for g in grads), name
        assert all(torch.isfinite(v).all() for v in out.metrics.values()), name
    # the ends of the grid, where ᾱ = 0 (pure noise) and ᾱ ≈ 1: x̂0, the transition and SIPO's weight stay finite
    from pipeline.objectives import importance_log_weight

    x0 = batch().x0_w
    for k in (1, bb.process.num_timesteps - 1):
        t = torch.full((x0.shape[0],), k)
        x_t = bb.process.add_noise(x0, torch.randn(x0.shape), t)
        pred = torch.randn(x0.shape)
        assert torch.isfinite(bb.process.predict_x0(pred, x_t, t)).all()
        assert torch.isfinite(importance_log_weight(bb.process, pred, x_t, x0, t)).all()


@pytest.mark.parametrize("name", ["diffusion-dpo", "sipo"])
def test_t_min_keeps_every_trained_timestep_at_high_noise(name, tiny_toy_backbone):
    """objective.t_min = f: the step draws its timesteps from [f·T, T) (and from ≥ 1 where SIPO needs a previous step)."""
    process, drawn = tiny_toy_backbone.process, []
    sample = process.sample_timesteps

    def record(*args, **kwargs):  # the real sampler; the test only keeps what it returns
        drawn.append(sample(*args, **kwargs))
        return drawn[-1]

    T = process.num_timesteps
    for t_min, low in [(0.0, 1 if name == "sipo" else 0), (0.5, T // 2)]:
        cfg = preset(name, t_min=t_min)
        assert cfg.min_timestep(T) == low
        process.sample_timesteps, drawn[:] = record, []
        try:
            for seed in range(8):
                preference_step(tiny_toy_backbone, cfg, batch(), generator=torch.Generator().manual_seed(seed))
        finally:
            process.sample_timesteps = sample
        t = torch.cat(drawn)
        assert int(t.min()) >= low and int(t.max()) < T
        if t_min:
            assert int(t.min()) < T // 2 + T // 4  # drawn across the range, not pinned to one end
    with pytest.raises(ValueError, match="objective.t_min=1"):
        preset(name, t_min=1.0)
