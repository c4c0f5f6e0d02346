"""Whole training steps of a tiny BAM mixture and its dense seed: tokens/s and MFU.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 30] [--segments 2] [--precision 32-true]
    .venv/bin/python benchmarks/bench_train_step.py --model paper_590m --accelerator gpu --precision bf16-mixed
    .venv/bin/python benchmarks/bench_train_step.py --against REV   # also BAM with ffn.py as at git REV
    .venv/bin/python benchmarks/bench_train_step.py --sdpa          # also both with SDPA as the attention kernel
    .venv/bin/python benchmarks/bench_train_step.py --breakdown     # then where each step's time goes

Each model trains under a Lightning Trainer (the project's `DenseLM` / `MoELM`: forward, LM and
router losses, logging, backward, AdamW and the LR schedule) on random token blocks. A step is
timed from `on_train_batch_start` to `on_train_batch_end` (data loading excluded). The two models
alternate in segments so that both see the same machine state; the first steps of every segment
are warm-up. MFU = training FLOPs per token (`bam_lightning.flops`) x tokens/s over a measured
matmul ceiling (`callbacks.monitoring.measure_matmul_flops`, the best of tries spread over the run).

`--model paper_590m` (or `paper_2b`) takes the BAM mixture of recipes/<model>/bam.yaml
(`model.init_args.config`) and its dense seed (`ModelConfig.dense()`), both randomly initialised: no upcycling, since step
time does not depend on the weights. On `--accelerator gpu` the steps and the ceiling run on the
GPU, and every step is timed between two `torch.cuda.synchronize()` calls. The last column and
the summary give the BAM step's MFU over the seed's (issue 23's target: >= 0.85 on CPUs, 0.95 on
the GPU). `--against REV` adds a third model, the same BAM mixture with the FFN layer's forward
as `bam_lightning/model/ffn.py` was at git revision REV, in the same alternating segments.
`--sdpa` adds the seed and the mixture with torch's SDPA for every attention (no chunked CPU
kernel, bam_lightning/model/short_attention.py), each compared with the SDPA seed.
`--breakdown` then profiles one step of each model (GPT forward, backward and AdamW, no Trainer)
and splits its time into matmuls, the attention kernel and the rest, beside each part's share of
the counted FLOPs: a part with a larger share of the time than of the FLOPs holds the MFU down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from bam_lightning.callbacks.monitoring import measure_matmul_flops
from harness import CoTenantLoad, base_parser, print_header, print_table  # benchmarks/harness.py
from torch.utils.data import DataLoader, Dataset

from bam_lightning import ModelConfig
from bam_lightning.flops import (
    forward_flops_per_token,
    layer_flops_per_token,
    parameter_counts,
    training_flops_per_token,
)
from bam_lightning.lit import DenseLM, MoELM
from bam_lightning.model.ffn import last_ffn_kernel
from bam_lightning.model.short_attention import last_attention_kernel, sdpa_only

TINY_BAM = ModelConfig(vocab_size=257, n_layer=4, d_model=128, n_head=4, max_seq_len=128,
                       n_experts=4, ffn_top_k=1, attn_experts=4)
RECIPES = {name: Path(__file__).resolve().parents[1] / "recipes" / name / "bam.yaml"
           for name in ("paper_590m", "paper_2b")}
PAPER_590M_RECIPE = RECIPES["paper_590m"]
# 590M at seq 2048: the [B*T, 256000] fp32 logits dominate. 2B: 4.6B parameters in the mixture,
# fp32 weights + AdamW states (about 74 GB) leave room for a batch of 2 on one 141 GB H200.
DEFAULT_BATCH = {"tiny": 32, "paper_590m": 8, "paper_2b": 2}
DEFAULT_SEQ = {"paper_590m": 2048, "paper_2b": 2048}  # tiny: its max_seq_len


def recipe_model_config(path: Path) -> ModelConfig:
    """A recipe's `model.init_args.config`. omegaconf is the project's YAML reader; PyYAML stands
    in where only a GPU image's packages are installed (one such image has no omegaconf)."""
    try:
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(OmegaConf.load(path).model.init_args.config, resolve=True)
    except ImportError:
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f)["model"]["init_args"]["config"]
    return ModelConfig.from_dict(dict(values), source=f"{path}: model.init_args.config")


class RandomBlocks(Dataset):
    def __init__(self, n: int, seq_len: int, vocab_size: int):
        self.data = torch.randint(0, vocab_size, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class StepTimer(L.Callback):
    """Step times after `warmup` steps; on a GPU each step is bracketed by synchronizes, since
    the hooks otherwise fire when the kernels are queued, not when they finish."""

    def __init__(self, warmup: int, cuda: bool = False):
        self.warmup, self.times, self.threads, self.cuda = warmup, [], None, cuda

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.threads = torch.get_num_threads()
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


@contextlib.contextmanager
def ffn_forward_from(module):
    """MixtureOfFFN's forward as `module` (ffn.py at another revision) defines it; same parameters."""
    from bam_lightning.model import ffn

    saved = {name: getattr(ffn.MixtureOfFFN, name) for name in ("forward", "route", "experts")}
    for name in saved:
        setattr(ffn.MixtureOfFFN, name, getattr(module.MixtureOfFFN, name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(ffn.MixtureOfFFN, name, method)


def train_segment(module_cls, config: ModelConfig, args, old_ffn=None, sdpa: bool = False) -> StepTimer:
    if old_ffn is not None:
        with ffn_forward_from(old_ffn):
            return train_segment(module_cls, config, args, sdpa=sdpa)
    if sdpa:
        with sdpa_only():
            return train_segment(module_cls, config, args)
    timer = StepTimer(args.warmup, cuda=args.device == "cuda")
    data = RandomBlocks((args.warmup + args.steps) * args.batch, args.seq, config.vocab_size)
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision,
                        max_steps=args.warmup + args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[timer])
    torch.manual_seed(0)
    trainer.fit(module_cls(config, warmup_steps=10), DataLoader(data, batch_size=args.batch))
    return timer


def step_breakdown(config: ModelConfig, args, device: torch.device,
                   sdpa: bool = False) -> tuple[dict[str, float], float]:
    """The quickest of three profiled forward + backward + AdamW steps of `config`'s GPT (no
    Trainer) after two unprofiled ones: milliseconds of own time in matrix products, in the
    attention kernel (SDPA, forward and backward) and in everything else, and the wall milliseconds
    of an unprofiled step. The quickest, because on a 2-core CPU the profiler's own thread stalls
    elementwise ops in about half the profiled calls (benchmarks/bench_ffn.py).
    Where the ops' own times add up to clearly more than that step, the profiler's own cost per op
    has distorted the shares (one run here read 1.4x for the chunked CPU attention's many small
    products, the next 1.0x; single steps vary). The chunked attention's products
    (bam_lightning/model/short_attention.py) count as matmuls: they run as `bmm`/`baddbmm`."""
    from bench_ffn import (  # benchmarks/bench_ffn.py, beside this script
        MATMUL_OPS,
        own_time,
        quickest_profile,
    )

    from bam_lightning.model import GPT

    if sdpa:
        with sdpa_only():
            return step_breakdown(config, args, device)

    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in args.precision)

    def step() -> None:
        with autocast:
            logits, _ = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    plain_ms = 1e3 * (time.perf_counter() - start)
    events, own = quickest_profile(step, device.type, calls=3), own_time(device.type)
    parts = {"matmuls": 0.0, "attention kernel": 0.0, "other": 0.0}
    for event in events:
        part = ("matmuls" if event.key in MATMUL_OPS
                else "attention kernel" if "scaled_dot_product" in event.key else "other")
        parts[part] += own(event) / 1e3
    return parts, plain_ms


def print_breakdown(models: dict, args, device: torch.device) -> None:
    """Where each model's step goes, beside the share of its counted FLOPs each part carries: a
    part that takes more of the time than of the FLOPs is what holds the MFU down."""
    rows = []
    for name, (_, config, _, sdpa) in models.items():
        parts, plain_ms = step_breakdown(config, args, device, sdpa)
        total = sum(parts.values())
        per_layer = layer_flops_per_token(config, args.seq)
        flops = forward_flops_per_token(config, args.seq)
        scores = config.n_layer * per_layer.scores / flops
        rows.append([name, f"{plain_ms:.0f}", f"{total:.0f}",
                     *(f"{100 * ms / total:.1f}%" for ms in parts.values()),
                     f"{100 * scores:.1f}%", f"{100 * (1 - scores):.1f}%"])
    print_table(["model (profiled step)", "step ms (unprofiled)", "ops' own ms (profiled)", "matmuls",
                 "attention kernel", "other",
                 "attention scores' share of FLOPs", "matmuls' share of FLOPs"], rows)


SDPA_TAG = "(SDPA)"


def seed_of(name: str) -> str:
    """The dense row a row's MFU is compared with: the SDPA seed for the SDPA rows."""
    return f"dense seed {SDPA_TAG}" if name.endswith(SDPA_TAG) else "dense seed"


def parse_overrides(config: ModelConfig, items: list[str]) -> dict[str, object]:
    """`FIELD=VALUE` strings as ModelConfig values, each of its field's current type."""
    fields = {f.name for f in dataclasses.fields(config)}
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"error: --override {item!r}: expected FIELD=VALUE with FIELD one of ModelConfig's")
        kind = type(getattr(config, name))
        values[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return values


def datasheet_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Lightning's datasheet peak for this GPU, shown beside the measured ceiling; None where its
    table does not name the device (it warns then, which we silence)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_available_flops(device, dtype)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], interleaved=False, device=False)
    parser.add_argument("--model", choices=["tiny", *RECIPES], default="tiny",
                        help="tiny: a 4-layer toy; paper_590m, paper_2b: recipes/<model>/bam.yaml's mixture "
                             "and its dense seed, randomly initialised")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="Lightning accelerator")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every segment")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per segment")
    parser.add_argument("--segments", type=int, default=2, help="alternating segments per model")
    parser.add_argument("--seq", type=int, default=None,
                        help="tokens per sequence (default: max_seq_len for tiny, 2048 for paper_590m)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 32 for tiny, "
                        "8 for paper_590m, 2 for paper_2b)")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also train the BAM mixture with MixtureOfFFN's forward as at this git revision")
    parser.add_argument("--sdpa", action="store_true",
                        help="also train both models with torch's SDPA as every attention's kernel (what ran "
                             "before the chunked CPU kernel), in the same alternating segments")
    parser.add_argument("--override", nargs="+", metavar="FIELD=VALUE", default=[],
                        help="change ModelConfig fields of the model (and so of its seed), e.g. n_layer=1 "
                             "d_model=64: a recipe's model at a size a CPU rehearsal can run")
    parser.add_argument("--breakdown", action="store_true",
                        help="after the timing, profile one step of each model: the share of its time in "
                             "matmuls, in the attention kernel and in the rest, beside their shares of the FLOPs")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="a datasheet peak (dense, no sparsity) for a second MFU column, e.g. 989 "
                             "for an H200's bf16; Lightning's table lists the sparse figure")
    args = parser.parse_args()
    args.device = "cuda" if args.accelerator == "gpu" else "cpu"  # read by print_header
    bam = TINY_BAM if args.model == "tiny" else recipe_model_config(RECIPES[args.model])
    bam = dataclasses.replace(bam, **parse_overrides(bam, args.override))
    args.seq = args.seq or DEFAULT_SEQ.get(args.model, bam.max_seq_len)
    args.batch = args.batch or DEFAULT_BATCH[args.model]
    bam = dataclasses.replace(bam, max_seq_len=max(bam.max_seq_len, args.seq))  # GPT refuses longer inputs
    print_header(f"Training step: {args.model} BAM mixture vs its dense seed (Lightning Trainer, random tokens"
                 + (", random init: no upcycling)" if args.model != "tiny" else ")"), args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*|.*treespec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seq = args.seq
    # name: (module class, config, ffn.py of another revision or None, SDPA forced)
    models = {"dense seed": (DenseLM, bam.dense(), None, False), "BAM MoE": (MoELM, bam, None, False)}
    if args.against:
        from bench_ffn import ffn_at_revision  # benchmarks/bench_ffn.py, beside this script

        models[f"BAM MoE @{args.against}"] = (MoELM, bam, ffn_at_revision(args.against), False)
    if args.sdpa:
        models.update({f"dense seed {SDPA_TAG}": (DenseLM, bam.dense(), None, True),
                       f"BAM MoE {SDPA_TAG}": (MoELM, bam, None, True)})
    dtype = torch.bfloat16 if "bf16" in args.precision else torch.float32
    device = torch.device(args.device)
    size = 8192 if device.type == "cuda" else 1024  # measure_matmul_flops's default for the device
    ceilings = [measure_matmul_flops(dtype, size, device=device) for _ in range(3)]
    print(f"# vocab {bam.vocab_size}, {bam.n_layer} layers, d_model {bam.d_model}, "
          f"{bam.n_head} heads, seq {seq}, batch {args.batch}; MoE: {bam.n_experts} FFN experts "
          f"top-{bam.ffn_top_k}, {bam.attn_experts} attention experts "
          f"({'Shared-KV' if bam.attn_shared_kv else 'Expert-KV'}, {bam.attn_routing})")
    times: dict[str, list[float]] = {name: [] for name in models}
    segment_medians: dict[str, list[float]] = {name: [] for name in models}  # paired by segment
    peak_memory: dict[str, int] = dict.fromkeys(models, 0)
    attention_kernels: dict[str, str | None] = {}
    with CoTenantLoad() as load:
        for _ in range(args.segments):
            for name, (module_cls, config, old_ffn, sdpa) in models.items():
                ceilings.append(measure_matmul_flops(dtype, size, device=device))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timer = train_segment(module_cls, config, args, old_ffn, sdpa)
                attention_kernels[name] = last_attention_kernel()
                assert timer.threads == args.threads, f"Lightning changed the thread count to {timer.threads}"
                times[name] += timer.times
                segment_medians[name].append(statistics.median(timer.times))
                if device.type == "cuda":
                    peak_memory[name] = max(peak_memory[name], torch.cuda.max_memory_allocated(device))
    ceiling = max(ceilings)  # the best moment: co-tenants only ever lower it
    print(f"# precision {args.precision}; matmul ceiling {ceiling / 1e9:.1f} GFLOP/s ({dtype}, {size}^3, best of "
          f"{len(ceilings)} taken between segments); {args.segments} segments x ({args.warmup} warm-up + "
          f"{args.steps} timed steps) per model")
    if device.type == "cuda":
        datasheet = datasheet_flops(device, dtype)
        print("# Lightning's datasheet peak for this GPU: "
              + (f"{datasheet / 1e12:.0f} TFLOP/s" if datasheet else "not in its table")
              + "; MFU below is against the measured ceiling")
    rows, results, mfu = [], [], {}
    for name, (_, config, _, _) in models.items():
        step = statistics.median(times[name])
        tokens_per_s = args.batch * seq / step
        flops = training_flops_per_token(config, seq)
        mfu[name] = flops * tokens_per_s / ceiling
        total, active = parameter_counts(config)
        rows.append([name, f"{total / 1e6:.2f}M / {active / 1e6:.2f}M", f"{flops / 1e6:.1f}",
                     f"{1e3 * step:.0f}", f"{tokens_per_s:,.0f}", f"{flops * tokens_per_s / 1e9:.1f}",
                     f"{100 * flops * tokens_per_s / ceiling:.1f}%",
                     *([f"{100 * flops * tokens_per_s / (args.peak_tflops * 1e12):.1f}%"] if args.peak_tflops else []),
                     *([f"{peak_memory[name] / 2**30:.1f}"] if device.type == "cuda" else []),
                     f"{mfu[name] / mfu[seed_of(name)]:.3f}"])
        results.append(f"{name} {tokens_per_s:,.0f} tok/s MFU {rows[-1][6]}"
                       + (f" ({rows[-1][7]} of {args.peak_tflops:g} TFLOP/s)" if args.peak_tflops else "")
                       + (f" peak {rows[-1][-1]} GiB" if device.type == "cuda" else ""))
    ratio = statistics.median(times["BAM MoE"]) / statistics.median(times["dense seed"])
    print_table(["model", "params total / active", "train MFLOP/token", "step ms (median)", "tokens/s",
                 "GFLOP/s", "MFU (measured ceiling)",
                 *([f"MFU ({args.peak_tflops:g} TFLOP/s)"] if args.peak_tflops else []),
                 *(["peak GPU GiB"] if device.type == "cuda" else []), "MFU / seed's"], rows)
    mfu_ratio = mfu["BAM MoE"] / mfu["dense seed"]
    flops_ratio = training_flops_per_token(bam, seq) / training_flops_per_token(bam.dense(), seq)
    for name in models:
        if name == seed_of(name):
            continue
        # MFU ratio within each segment (seed and BAM timed minutes apart, not an hour): its spread
        paired = sorted(flops_ratio * seed / step for seed, step
                        in zip(segment_medians[seed_of(name)], segment_medians[name], strict=True))
        print(f"# {name}: MFU / seed's per segment: median {statistics.median(paired):.3f}, "
              f"range {paired[0]:.3f}-{paired[-1]:.3f} over {len(paired)} segments")
    print(f"# BAM MoE step time / dense seed step time: {ratio:.2f}; BAM MFU / seed MFU: {mfu_ratio:.3f}; "
          f"FFN kernel that ran: {last_ffn_kernel()}")
    print("# attention kernel that ran: " + "; ".join(f"{name}: {kernel}" for name, kernel in attention_kernels.items()))
    print(f"# result: {'; '.join(results)}; BAM/seed step time {ratio:.2f}, MFU {mfu_ratio:.3f}x the seed's; "
          f"FFN kernel {last_ffn_kernel()}")
    print(f"# {load.summary()}")
    if args.breakdown:
        print_breakdown(models, args, device)


if __name__ == "__main__":
    main()
