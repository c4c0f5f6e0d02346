"""GenerationSamples: a few fixed prompts per domain, decoded by the model at the end of its fit.

Perplexity says how well an expert or a mixture fits a domain; a sample shows what it learned
(the math expert answering, the code expert continuing Python). The prompts are fixed, so the
same prompt reads across every model of a study. Decoding is greedy by default: the samples
depend only on the weights. They go to `<log_dir>/samples.md` and to TensorBoard's text tab
(`samples/<domain>`). Every process decodes (a sharded model needs them all); rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from bam_lightning.checkpoint import write_atomically
from bam_lightning.generate import check_sampling, generate

# Prompts for the built-in domains (bam_lightning/data/corpora.py); other domains name their own.
DEFAULT_PROMPTS: dict[str, list[str]] = {
    "literature": ["ROMEO.\n", "Enter the King"],
    "code": ["def __init__(self", "import os\n\n\ndef "],
    "legal": ["Permission is hereby granted", "THE SOFTWARE IS PROVIDED"],
    "math": ["What is 12 + 35?\nAnswer:", "List the prime factors of 42.\nAnswer:"],
}


class GenerationSamples(L.Callback):
    def __init__(self, prompts: dict[str, list[str]] | None = None, max_new_tokens: int = 96,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, seed: int = 0,
                 filename: str = "samples.md"):
        """
        Args:
            prompts: domain -> prompts; default: `DEFAULT_PROMPTS` for the data's built-in domains.
            max_new_tokens: tokens decoded after each prompt (fewer if the context fills up).
            temperature: 0 = greedy; > 0 samples (with `top_k`, `top_p` and `seed`).
            top_k: sample among the k most likely tokens (None: all).
            top_p: nucleus sampling mass in (0, 1].
            seed: makes sampled (temperature > 0) samples repeatable.
            filename: written under the run's log directory.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        for domain, texts in (prompts or {}).items():
            if not texts or any(not text for text in texts):
                raise ValueError(f"GenerationSamples: prompts[{domain!r}] must be a list of non-empty strings")
        self.prompts = prompts
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
        self.filename = filename

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(trainer.datamodule, "tokenizer"):
            raise ValueError("GenerationSamples needs a data module with a `tokenizer` (BAMDataModule)")

    def domain_prompts(self, trainer: L.Trainer) -> dict[str, list[str]]:
        if self.prompts is not None:
            return self.prompts
        domains = getattr(trainer.datamodule, "val_domain_names", None) or list(DEFAULT_PROMPTS)
        return {domain: DEFAULT_PROMPTS[domain] for domain in domains if domain in DEFAULT_PROMPTS}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = trainer.datamodule.tokenizer
        samples = {}
        for domain, texts in self.domain_prompts(trainer).items():
            ids = [tokenizer.encode_prompt(text) for text in texts]
            outputs = generate(pl_module.model, ids, eos_id=tokenizer.eos_id, **self.sampling)
            samples[domain] = [(text, tokenizer.decode(out)) for text, out in zip(texts, outputs, strict=True)]
        if trainer.is_global_zero:
            self.write(trainer, samples)

    def write(self, trainer: L.Trainer, samples: dict[str, list[tuple[str, str]]]) -> None:
        sections = {domain: "\n\n".join(f"```\n{prompt}\u2588{completion}\n```" for prompt, completion in pairs)
                    for domain, pairs in samples.items()}  # the block marks where the prompt ends
        settings = ", ".join(f"{k} {v}" for k, v in self.sampling.items() if v is not None)
        text = f"# Samples after step {trainer.global_step}\n\n({settings}; \u2588 ends the prompt)\n\n" + "".join(
            f"## {domain}\n\n{body}\n\n" for domain, body in sections.items())
        log_dir = trainer.log_dir or trainer.default_root_dir
        write_atomically(f"{log_dir}/{self.filename}", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard's text tab
                for domain, body in sections.items():
                    experiment.add_text(f"samples/{domain}", body, global_step=trainer.global_step)
