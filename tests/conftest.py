"""Shared fixtures. Tests never reach a model hub: any attempt fails fast."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_session_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _session_exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process here, with pytest's own exit status, once every result has been reported.

    Why: a full run (Ray driver, Ray Data, Tune, torch and pyarrow thread pools all live in the pytest process)
    now and then segfaults while the interpreter finalizes native extension modules *after* the summary line
    (CI: "496 passed", then exit 139). Nothing of ours runs at that point; skipping finalization keeps the
    exit status honest (failures still exit 1). Set ``PIPELINE_TESTS_FINALIZE=1`` to finalize normally."""
    if _session_exit_status and not os.environ.get("PIPELINE_TESTS_FINALIZE"):
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
        os._exit(_session_exit_status[-1])


def start_test_ray() -> None:
    """This process's private local Ray (never a cluster someone else started on this machine), started on first
    use and kept for the rest of the session (``_ray_session`` stops it): a start and a stop per test module cost
    more than the module's own work in the small ones. A test that needs another Ray (a simulated cluster, a
    job's own local instance in a subprocess) shuts this one down or runs beside it; the next user restarts it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)


@pytest.fixture(scope="session", autouse=True)
def _ray_session():
    """Stops the session's Ray at the end (the exit below skips Python's atexit hooks)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """The session's local Ray, for a module whose tests run Ray in this process."""
    start_test_ray()


@pytest.fixture(scope="session")
def tiny_toy_model_dir(tmp_path_factory):
    """The toy reference architecture with random weights, saved in the model-folder format. ε-prediction: a
    random v-prediction model on zero-terminal-SNR betas draws near-uniform grey (x̂0 = −v̂ ≈ 0 at the first
    step), whose rewards tie and give no on-policy pairs; a random ε model draws varied noise."""
    from pipeline.backbones import UNetBackbone
    from pipeline.toyworld.reference import build_scheduler, build_text_encoder, build_tokenizer, build_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_toy_model")
    tokenizer = build_tokenizer()
    UNetBackbone(tokenizer, build_text_encoder(len(tokenizer)), build_unet(), build_scheduler("epsilon").config).save_pretrained(path)
    return path


@pytest.fixture()
def tiny_toy_backbone(tiny_toy_model_dir):
    from pipeline.backbones import UNetBackbone

    return UNetBackbone.from_pretrained(tiny_toy_model_dir)


@pytest.fixture(scope="session")
def tiny_pairs_dataset(tiny_toy_model_dir, tmp_path_factory):
    """A small DDSPO pairs dataset (8 prompts) from the tiny model: a generate_pairs.py output folder (manifest.json +
    pairs/), generated once per session on the session's local Ray; tests only read it (one that corrupts it works
    on a copy)."""
    from pipeline.data.generate import GenerationConfig, generate

    start_test_ray()
    out = tmp_path_factory.mktemp("pairs") / "ddspo"
    generate(GenerationConfig(model=str(tiny_toy_model_dir), strategy="ddspo-paired", prompt_limit=8, batch_size=8,
                              sampler={"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 8}), out)
    return out


@pytest.fixture(scope="module")
def tiny_pairs(local_ray, tiny_pairs_dataset):
    """The session's tiny pairs (``tiny_pairs_dataset``'s Parquet folder ``pairs/``), with the session's local Ray
    up (Ray Train runs on it)."""
    return tiny_pairs_dataset / "pairs"


@pytest.fixture()
def tiny_train_config(tiny_toy_model_dir):
    """``make(**overrides)``: a fast TrainConfig for the tiny model."""
    from pipeline.training.config import TrainConfig

    def make(**kw):
        base = dict(model=str(tiny_toy_model_dir), objective={"name": "ddspo", "safeguard": {"mu": 0.5}}, lr=1e-3,
                    max_steps=2, batch_size=2,
                    checkpoint_every=2, ema_decay=0.9)
        return TrainConfig(**{**base, **kw})

    return make


def write_rendered_pairs(folder, num_prompts: int = 6, seed: int = 0):
    """A pairs folder (pair schema, ``strategy="onpolicy"``) of the toy renderer's images: per training prompt, the
    correct render (winner) and a render of the prompt with one attribute changed (loser), scored by the
    verifiable reward. Real toy images and real rewards in a second, without a model."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.data.pairing import pair_row, rows_to_table
    from pipeline.human.study import png_bytes
    from pipeline.toyworld import score, train_specs
    from pipeline.toyworld.grammar import differ_in
    from pipeline.toyworld.renderer import render, to_tensor

    rng = np.random.default_rng(seed)
    rows = []
    for i, spec in enumerate(train_specs()[:num_prompts]):
        wrong = differ_in(spec, ("colour", "shape", "count")[i % 3], rng)
        images = np.stack([render(spec, 100 + i), render(wrong, 200 + i)])
        rewards = score(to_tensor(images), [spec.text, spec.text]).reward
        lat = to_tensor(images).numpy()
        rows.append(pair_row(strategy="onpolicy", round_=0, policy_version="render", prompt=spec.text, perturbed="",
                             seed_w=100 + i, seed_l=200 + i, reward_w=float(rewards[0]), reward_l=float(rewards[1]),
                             stats=(float(np.mean(rewards)), float(np.std(rewards)), 2), latent_w=lat[0], latent_l=lat[1],
                             png_w=png_bytes(images[0]), png_l=png_bytes(images[1])))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows), folder / "part-0.parquet")
    return folder


@pytest.fixture()
def rendered_study(tmp_path):
    """A study folder (3 groups × 4 annotators) of 6 rendered toy pairs: ``(folder, StudyStore)``."""
    from pipeline.config import build
    from pipeline.human.study import StudyConfig, create_study, open_study

    pairs = write_rendered_pairs(tmp_path / "pairs")
    cfg = build(StudyConfig, {"name": "rendered", "source": "pairs", "pairs": str(pairs)})
    create_study(cfg, tmp_path / "study")
    return tmp_path / "study", open_study(tmp_path / "study")
