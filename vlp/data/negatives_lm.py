"""Hard negatives written by a local causal language model, prompted few-shot per type.

Each requested negative is one prompt: an instruction, two worked examples and the caption,
ending in ``Changed:``; the model's continuation up to the end of its first line is the
negative. The model is any Hugging Face causal LM folder (``save_pretrained`` layout), read
with ``local_files_only=True``: nothing is downloaded. Outputs go through the same filter as
the rule-based ones (:func:`vlp.data.negatives.validate_negatives`), so a caption can get
fewer than ``k`` negatives. Shuffle types need no model and are not offered here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vlp.data.negatives import check_types, validate_negatives

# type -> (instruction, ((caption, negative), ...)); the examples show the change and nothing else
PROMPTS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "replace_object": (
        "Replace one object in the caption with a different object.",
        (
            ("a dog sitting on a couch", "a cat sitting on a couch"),
            ("two men riding horses", "two men riding bicycles"),
        ),
    ),
    "replace_attribute": (
        "Change the colour, size or material of one object in the caption.",
        (
            ("a red car on a road", "a blue car on a road"),
            ("a small dog on a wooden floor", "a small dog on a metal floor"),
        ),
    ),
    "replace_relation": (
        "Change how the objects in the caption are placed or what they do to each other.",
        (
            ("a cat on a table", "a cat under a table"),
            ("a man standing in front of a bus", "a man standing behind a bus"),
        ),
    ),
    "swap_objects": (
        "Swap two objects in the caption.",
        (("a dog chasing a cat", "a cat chasing a dog"), ("a cup on a book", "a book on a cup")),
    ),
    "swap_attributes": (
        "Swap the attributes of two objects in the caption.",
        (
            ("a red cube and a blue ball", "a blue cube and a red ball"),
            ("a big dog and a small cat", "a small dog and a big cat"),
        ),
    ),
}


def build_prompt(kind: str, caption: str) -> str:
    """The few-shot prompt asking for one negative of type ``kind``."""
    instruction, examples = PROMPTS[kind]
    lines = [instruction]
    for positive, negative in examples:
        lines += [f"Caption: {positive}", f"Changed: {negative}"]
    lines += [f"Caption: {caption.strip()}", "Changed:"]
    return "\n".join(lines)


def first_line(text: str) -> str:
    """The continuation up to its first line break, stripped of spaces and quotes."""
    return text.strip().split("\n", 1)[0].strip().strip("\"'").strip()


class LMNegativeGenerator:
    """Negatives of ``types`` (keys of :data:`PROMPTS`) from the causal LM in ``model_dir``.

    Sampling (temperature, top-p) is seeded per batch from ``seed``, so the same captions give
    the same negatives on the same machine and library versions.

    Raises:
        FileNotFoundError: ``model_dir`` is not a folder.
        ValueError: an unknown type, or a shuffle type (no prompt).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        types: Sequence[str],
        device: str = "cpu",
        max_new_tokens: int = 40,
        batch_size: int = 16,
        seed: int = 0,
        temperature: float = 0.9,
        top_p: float = 0.95,
    ):
        self.types = check_types(types)
        without_prompt = [t for t in self.types if t not in PROMPTS]
        if without_prompt:
            raise ValueError(f"no language-model prompt for {without_prompt}; use the rules generator for them")
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"language model folder not found: {model_dir}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, max(1, batch_size), seed
        self.temperature, self.top_p = temperature, top_p
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of each row
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto")
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is not None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            else:
                self.tokenizer.add_special_tokens({"pad_token": "<pad>"})
                self.model.resize_token_embeddings(len(self.tokenizer))
        self.model.to(self.device).eval()

    def _complete(self, prompts: list[str], seed: int) -> list[str]:
        """First line of one sampled continuation of each prompt."""
        import torch

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(
                **enc,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [first_line(t) for t in texts]

    def generate(
        self,
        captions: list[str],
        k: int,
        positives: Sequence[Sequence[str]] | None = None,
        seed: int | None = None,
    ) -> list[list[tuple[str, str]]]:
        """Up to ``k`` validated (text, type) negatives per caption, in the order of ``captions``.

        Caption i asks for k negatives, the types taking turns from type ``i mod len(types)``;
        ``positives[i]`` lists other captions of the same image (rejected as negatives). Empty
        captions get none. ``seed`` (default: the constructor's) seeds the sampling.
        """
        seed = self.seed if seed is None else seed
        requests = [
            (i, self.types[(i + j) % len(self.types)])
            for i, caption in enumerate(captions)
            if caption.strip()
            for j in range(max(k, 0))
        ]
        candidates: list[list[tuple[str, str]]] = [[] for _ in captions]
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            texts = self._complete(
                [build_prompt(kind, captions[i]) for i, kind in batch], (seed * 1_000_003 + start) % 2**63
            )
            for (i, kind), text in zip(batch, texts):
                candidates[i].append((text, kind))
        return [
            validate_negatives(found, caption, positives[i] if positives else (), k)
            for i, (caption, found) in enumerate(zip(captions, candidates))
        ]
