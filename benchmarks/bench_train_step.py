"""Whole training steps of a tiny BAM mixture and its dense seed: tokens/s and MFU.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 30] [--segments 2] [--precision 32-true]

Each model trains under a Lightning Trainer (the project's `DenseLM` / `MoELM`: forward, LM and
router losses, logging, backward, AdamW and the LR schedule) on random token blocks. A step is
timed from `on_train_batch_start` to `on_train_batch_end` (data loading excluded). The two models
alternate in segments so that both see the same machine state; the first steps of every segment
are warm-up. MFU = training FLOPs per token (`bam_lightning.flops`) x tokens/s over a measured
matmul ceiling (`callbacks.monitoring.measure_matmul_flops`, the best of tries spread over the run).
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings

import lightning as L
import torch
from bam_lightning.callbacks.monitoring import measure_matmul_flops
from harness import CoTenantLoad, base_parser, print_header, print_table  # benchmarks/harness.py
from torch.utils.data import DataLoader, Dataset

from bam_lightning import ModelConfig
from bam_lightning.flops import parameter_counts, training_flops_per_token
from bam_lightning.lit import DenseLM, MoELM

TINY_BAM = ModelConfig(vocab_size=257, n_layer=4, d_model=128, n_head=4, max_seq_len=128,
                       n_experts=4, ffn_top_k=1, attn_experts=4)


class RandomBlocks(Dataset):
    def __init__(self, n: int, seq_len: int, vocab_size: int):
        self.data = torch.randint(0, vocab_size, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self.threads = warmup, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.threads = torch.get_num_threads()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


def train_segment(module_cls, config: ModelConfig, args) -> StepTimer:
    timer = StepTimer(args.warmup)
    data = RandomBlocks((args.warmup + args.steps) * args.batch, config.max_seq_len, config.vocab_size)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[timer])
    torch.manual_seed(0)
    trainer.fit(module_cls(config, warmup_steps=10), DataLoader(data, batch_size=args.batch))
    return timer


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], interleaved=False)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every segment")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per segment")
    parser.add_argument("--segments", type=int, default=2, help="alternating segments per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    args = parser.parse_args()
    print_header("Training step: tiny BAM mixture vs its dense seed (Lightning Trainer, random tokens)", args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*|.*treespec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seq = TINY_BAM.max_seq_len
    models = {"dense seed": (DenseLM, TINY_BAM.dense()), "BAM MoE": (MoELM, TINY_BAM)}
    dtype = torch.bfloat16 if "bf16" in args.precision else torch.float32
    ceilings = [measure_matmul_flops(dtype) for _ in range(3)]
    print(f"# vocab {TINY_BAM.vocab_size}, {TINY_BAM.n_layer} layers, d_model {TINY_BAM.d_model}, "
          f"{TINY_BAM.n_head} heads, seq {seq}, batch {args.batch}; MoE: {TINY_BAM.n_experts} FFN experts "
          f"top-{TINY_BAM.ffn_top_k}, {TINY_BAM.attn_experts} attention experts (Expert-KV, soft)")
    times: dict[str, list[float]] = {name: [] for name in models}
    with CoTenantLoad() as load:
        for _ in range(args.segments):
            for name, (module_cls, config) in models.items():
                ceilings.append(measure_matmul_flops(dtype))
                timer = train_segment(module_cls, config, args)
                assert timer.threads == args.threads, f"Lightning changed the thread count to {timer.threads}"
                times[name] += timer.times
    ceiling = max(ceilings)  # the best moment: co-tenants only ever lower it
    print(f"# precision {args.precision}; matmul ceiling {ceiling / 1e9:.1f} GFLOP/s ({dtype}, 1024^3, best of "
          f"{len(ceilings)} taken between segments); {args.segments} segments x ({args.warmup} warm-up + "
          f"{args.steps} timed steps) per model")
    rows = []
    for name, (_, config) in models.items():
        step = statistics.median(times[name])
        tokens_per_s = args.batch * seq / step
        flops = training_flops_per_token(config, seq)
        total, active = parameter_counts(config)
        rows.append([name, f"{total / 1e6:.2f}M / {active / 1e6:.2f}M", f"{flops / 1e6:.1f}",
                     f"{1e3 * step:.0f}", f"{tokens_per_s:,.0f}", f"{flops * tokens_per_s / 1e9:.1f}",
                     f"{100 * flops * tokens_per_s / ceiling:.1f}%"])
    ratio = statistics.median(times["BAM MoE"]) / statistics.median(times["dense seed"])
    print_table(["model", "params total / active", "train MFLOP/token", "step ms (median)", "tokens/s",
                 "GFLOP/s", "MFU"], rows)
    print(f"# BAM MoE step time / dense seed step time: {ratio:.2f}")
    print(f"# {load.summary()}")


if __name__ == "__main__":
    main()
