"""Prompt perturbations for DDSPO (Sec. 4.4): c → c⁻, a prompt whose guidance points the wrong way.

* ``rand-removal`` drops 40–70 % of the words (the best strategy for text-image alignment in DDSPO
  Table 3a); at least one word is dropped and one kept.
* ``aesthetic-template`` wraps the prompt in a degrading description (a cheap stand-in for the
  aesthetic-quality LLM rewrite).
* ``llm`` rewrites the prompt with a local transformers text-generation model; the ``alignment`` task
  asks for a rewrite that changes objects, counts, colours or positions, the ``aesthetics`` task one that
  describes a poor-quality picture of the same content (DDSPO's LLaMA (TA) and (AQ) variants).

Randomness is a function of (seed, prompt_id), so a rerun perturbs every prompt identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

PERTURBATIONS = ("rand-removal", "aesthetic-template", "llm")

AESTHETIC_TEMPLATES = (
    "a blurry, badly lit, low quality photo of {}",
    "an ugly, washed-out, out of focus picture of {}",
    "a grainy, overexposed snapshot of {}, jpeg artifacts",
)

LLM_INSTRUCTIONS = {
    "alignment": ("Rewrite the image description so that it no longer matches the original: change or drop "
                  "objects, counts, colours or positions. Answer with the new description only.\n"
                  "Description: {}\nRewrite:"),
    "aesthetics": ("Rewrite the image description so that it describes an ugly, low-quality picture of the same "
                   "content (blurry, bad lighting, dull colours). Answer with the new description only.\n"
                   "Description: {}\nRewrite:"),
}


def rand_removal(prompt: str, rng: np.random.Generator, low: float = 0.4, high: float = 0.7) -> str:
    words = prompt.split()
    if len(words) < 2:
        return ""
    n_drop = int(round(rng.uniform(low, high) * len(words)))
    n_drop = min(max(n_drop, 1), len(words) - 1)
    keep = np.sort(rng.choice(len(words), size=len(words) - n_drop, replace=False))
    return " ".join(words[i] for i in keep)


def aesthetic_template(prompt: str, rng: np.random.Generator) -> str:
    return AESTHETIC_TEMPLATES[int(rng.integers(len(AESTHETIC_TEMPLATES)))].format(prompt)


def prompt_rng(seed: int, prompt_id: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(prompt_id), 0x5EED])


class LLMRewriter:
    """Rewrite prompts with a local causal LM (no hub access, no remote code)."""

    def __init__(self, model_path: str | Path, task: str = "alignment", max_new_tokens: int = 40, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if task not in LLM_INSTRUCTIONS:
            raise ValueError(f"perturb.llm_task={task!r}: expected one of {sorted(LLM_INSTRUCTIONS)}")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"LLM folder {path} has no config.json (expected a local transformers model folder)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        self.task, self.max_new_tokens = task, max_new_tokens

    def __call__(self, prompts: Sequence[str], seed: int = 0) -> list[str]:
        import torch

        texts = [LLM_INSTRUCTIONS[self.task].format(p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.model.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        # The first line is the rewrite; fall back to word removal if the model produced nothing usable.
        rewrites = [n.strip().splitlines()[0].strip() if n.strip() else "" for n in new]
        return [r if r and r != p else rand_removal(p, prompt_rng(seed, i)) for i, (r, p) in enumerate(zip(rewrites, prompts))]


def perturb(prompts: Sequence[str], prompt_ids: Sequence[int], method: str, seed: int,
            rewriter: LLMRewriter | None = None) -> list[str]:
    """c⁻ for each prompt with the chosen method."""
    if method == "rand-removal":
        return [rand_removal(p, prompt_rng(seed, i)) for p, i in zip(prompts, prompt_ids)]
    if method == "aesthetic-template":
        return [aesthetic_template(p, prompt_rng(seed, i)) for p, i in zip(prompts, prompt_ids)]
    if method == "llm":
        if rewriter is None:
            raise ValueError("perturb.method='llm' needs perturb.llm_path (a local text-generation model folder)")
        return rewriter(prompts, seed)
    raise ValueError(f"perturb.method={method!r}: expected one of {PERTURBATIONS}")
