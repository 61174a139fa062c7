"""Pair schema validation, prompt sources and perturbations (no Ray needed)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, apply_overrides, build, read_config_file
from pipeline.data.generate import GenerationConfig
from pipeline.data.perturb import aesthetic_template, perturb, prompt_rng, rand_removal
from pipeline.data.prompts import load_prompts
from pipeline.data.schema import PAIR_SCHEMA, SchemaError, latents_of, read_pairs, validate_table
from pipeline.data.pairing import rows_to_table, pairs_from_rollouts


def rollout_group(rewards, shape=(3, 4, 4)):
    k = len(rewards)
    return {
        "prompt_id": np.zeros(k, int), "prompt": np.array(["a red circle on the left"] * k, dtype=object),
        "sample_idx": np.arange(k), "seed": np.arange(k) + 100, "reward": np.array(rewards, float),
        "latent": np.stack([np.full(shape, i, np.float32) for i in range(k)]),
        "png": np.array([b"png%d" % i for i in range(k)], dtype=object),
    }


def test_best_worst_pairs_keep_stats_and_drop_ties():
    t = pairs_from_rollouts(rollout_group([0.2, 0.9, 0.5, 0.1]), pairing="best-worst", min_gap=0.0, round_=3,
                            policy_version="round_2")
    assert t.num_rows == 1
    row = t.to_pylist()[0]
    assert (row["reward_w"], row["reward_l"]) == (0.9, 0.1) and (row["seed_w"], row["seed_l"]) == (101, 103)
    assert row["prompt_num_samples"] == 4 and row["prompt_reward_mean"] == pytest.approx(0.425)
    assert row["latent_w"][0] == 1.0 and row["latent_l"][0] == 3.0 and row["round"] == 3
    validate_table(t)
    ties = pairs_from_rollouts(rollout_group([0.5, 0.5, 0.5]), pairing="best-worst", min_gap=0.0, round_=0, policy_version="r")
    assert ties.num_rows == 0
    all_pairs = pairs_from_rollouts(rollout_group([0.2, 0.9, 0.5, 0.5]), pairing="all", min_gap=0.1, round_=0, policy_version="r")
    assert all_pairs.num_rows == 5  # 0.9>0.2, 0.9>0.5 (×2), 0.5>0.2 (×2); the 0.5 = 0.5 tie is dropped
    gaps = np.array(all_pairs.column("reward_w")) - np.array(all_pairs.column("reward_l"))
    assert bool((gaps > 0.1).all())


def test_schema_roundtrip_and_errors(tmp_path):
    t = pairs_from_rollouts(rollout_group([0.1, 0.8]), pairing="best-worst", min_gap=0, round_=0, policy_version="r")
    pq.write_table(t, tmp_path / "ok.parquet")
    back = read_pairs(tmp_path / "ok.parquet")
    assert back.schema == PAIR_SCHEMA and latents_of(back, "latent_w").shape == (1, 3, 4, 4)
    pq.write_table(t.drop(["reward_w"]), tmp_path / "missing.parquet")
    with pytest.raises(SchemaError, match=r"missing\.parquet: missing column\(s\) \['reward_w'\]"):
        read_pairs(tmp_path / "missing.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SchemaError, match="corrupt.parquet: not a readable Parquet file"):
        read_pairs(tmp_path / "corrupt.parquet")
    bad_version = t.set_column(0, "schema_version", pa.array([7], pa.int32()))
    with pytest.raises(SchemaError, match="schema_version"):
        validate_table(bad_version, "v7")
    short = t.set_column(t.schema.get_field_index("latent_shape"), "latent_shape", pa.array([[3, 4, 5]], pa.list_(pa.int32())))
    with pytest.raises(SchemaError, match="does not match latent_shape"):
        validate_table(short, "short")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pairs(tmp_path / "nope")
    assert rows_to_table([]).schema == PAIR_SCHEMA


def test_prompt_sources(tmp_path):
    assert len(load_prompts("toy:train")) == 168 and load_prompts("toy:heldout", limit=5)[4]["prompt_id"] == 4
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert [r["prompt"] for r in load_prompts(str(f), repeat=2)] == ["a cat", "a dog", "a cat", "a dog"]
    pq.write_table(pa.table({"prompt": ["x y z", ""]}), tmp_path / "p.parquet")
    assert [r["prompt"] for r in load_prompts(str(tmp_path / "p.parquet"))] == ["x y z"]
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt contains no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        load_prompts(str(tmp_path / "nocol.parquet"))


def test_rand_removal_drops_40_to_70_percent():
    prompt = "one two three four five six seven eight nine ten"
    for i in range(200):
        out = rand_removal(prompt, prompt_rng(0, i)).split()
        assert 3 <= len(out) <= 6 and out == [w for w in prompt.split() if w in out]  # order kept
    assert rand_removal("two red circles on the left", prompt_rng(1, 2)) == rand_removal("two red circles on the left", prompt_rng(1, 2))
    assert rand_removal("word", prompt_rng(0, 0)) == ""
    assert "a red circle" in aesthetic_template("a red circle", prompt_rng(0, 0))
    with pytest.raises(ValueError, match="perturb.method='llm' needs"):
        perturb(["x"], [0], "llm", 0)
    with pytest.raises(ValueError, match="perturb.method='swap'"):
        perturb(["x"], [0], "swap", 0)


def test_generation_config_validation_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="strategy='dpo'"):
        GenerationConfig(strategy="dpo")
    with pytest.raises(ConfigError, match=r"sampler\.num_steps=0"):
        GenerationConfig(sampler={"num_steps": 0})
    cfg_file = tmp_path / "g.yaml"
    cfg_file.write_text("strategy: ddspo-paired\nsampler:\n  num_steps: 7\n")
    data = apply_overrides(read_config_file(cfg_file), ["sampler.guidance_scale=2.5", "prompt_limit=3"])
    cfg = build(GenerationConfig, data, "generation")
    assert cfg.strategy == "ddspo-paired" and cfg.sampler.num_steps == 7 and cfg.sampler.guidance_scale == 2.5
    assert cfg.prompt_limit == 3 and cfg.fingerprint() != GenerationConfig().fingerprint()
    with pytest.raises(ConfigError, match=r"unknown config field 'generation\.stratgy'; did you mean 'generation\.strategy'"):
        build(GenerationConfig, apply_overrides({}, ["stratgy=onpolicy"]), "generation")
    with pytest.raises(ConfigError, match=r"generation\.sampler\.eta='x': expected a number"):
        build(GenerationConfig, {"sampler": {"eta": "x"}}, "generation")
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides({}, ["oops"])
    (tmp_path / "bad.yaml").write_text("strategy: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        read_config_file(tmp_path / "bad.yaml")


def test_relative_paths_become_absolute_at_build(tmp_path, monkeypatch):
    """Ray's workers do not share the driver's working directory: every local path leaf of a built config is
    absolute, prompt sources and empty values stay as given, and a reward spec's path keys follow."""
    from pipeline.training.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = build(GenerationConfig, apply_overrides({}, [
        "model=models/m", "weights=w.safetensors", "prompts=p.txt",
        'reward=[{"name": "pickscore", "path": "ps", "processor_path": "proc", "weight": 2}, {"name": "toy"}]']),
        "generation")
    assert (cfg.model, cfg.weights, cfg.prompts) == (str(tmp_path / "models/m"), str(tmp_path / "w.safetensors"),
                                                    str(tmp_path / "p.txt"))
    assert cfg.reward == [{"name": "pickscore", "path": str(tmp_path / "ps"), "processor_path": str(tmp_path / "proc"),
                           "weight": 2}, {"name": "toy"}]
    assert GenerationConfig(prompts="toy:heldout", llm_path="").prompts == "toy:heldout"
    assert TrainConfig(model="s3://bucket/model").model == "s3://bucket/model"  # a URI is not a local path
    train = TrainConfig(model="m", init_optimizer="opt.pt")
    assert (train.model, train.init_optimizer, train.init_weights) == (str(tmp_path / "m"), str(tmp_path / "opt.pt"), "")
    # absolute already: unchanged wherever it is built
    monkeypatch.chdir("/")
    assert build(GenerationConfig, {"model": cfg.model}).model == cfg.model
    assert TrainConfig(model=train.model).model == str(tmp_path / "m")


def test_llm_rewrite_with_a_local_causal_lm(tmp_path):
    """A tiny random GPT-2 saved as a local folder goes through the rewriter's real loading code."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.data.perturb import LLMRewriter
    from pipeline.data.stages import PerturbPrompts
    from pipeline.toyworld.reference import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                               eos_token_id=3, bos_token_id=2)).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    prompts = ["two red circles on the left", "a blue square at the top"]
    out = LLMRewriter(tmp_path / "llm", task="aesthetics", max_new_tokens=6)(prompts, seed=0)
    assert len(out) == 2 and all(isinstance(o, str) and o and o != p for o, p in zip(out, prompts))
    stage = PerturbPrompts("llm", seed=0, llm_path=str(tmp_path / "llm"), llm_task="alignment")
    batch = stage({"prompt": np.array(prompts, dtype=object), "prompt_id": np.array([0, 1])})
    assert list(batch["perturbed_prompt"]) != prompts
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LLMRewriter(tmp_path, task="alignment")
    with pytest.raises(ValueError, match="perturb.llm_task='poetry'"):
        LLMRewriter(tmp_path / "llm", task="poetry")
