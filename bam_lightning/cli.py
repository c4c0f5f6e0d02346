"""The `bam` command: a dispatcher over Lightning's CLI and our own subcommands.

`bam fit|validate|test|predict` is Lightning's CLI (see `lightning_cli.py`); every other command
is a small argparse program in the module that does the work, imported only when it is called,
so `bam --help` is fast and lists every command a user has. Nothing imports this module.

A `UserError` (bam_lightning/errors.py) from any command ends as one line on stderr,
`bam <command>: error: <message>`, with exit code 2 (argparse's); other exceptions are bugs and
keep their traceback.
"""

from __future__ import annotations

import errno
import importlib
import sys

from bam_lightning.errors import UserError
from bam_lightning.malloc import apply_malloc_policy

LIGHTNING_COMMANDS = {
    "fit": "train a recipe (dense seed, expert branch, or a mixture built by UpcyclingCallback)",
    "validate": "score a checkpoint on every validation domain",
    "test": "like validate, on the test loop",
    "predict": "Lightning's predict loop",
}
# name -> (module, function, one-line help). Each function takes argv (the words after the name).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pipeline": ("bam_lightning.pipeline", "main", "run a whole study (seed, experts, mixtures, report) from one file"),
    "generate": ("bam_lightning.generate", "main", "sample text from a checkpoint with its KV cache (greedy, top-k/p)"),
    "import-hf": ("bam_lightning.interop.hf_import", "main",
                  "a Hugging Face Llama-family folder or .gguf file -> a dense seed checkpoint + tokenizer"),
    "eval": ("bam_lightning.eval.command", "main", "downstream accuracy on offline benchmarks (lm-evaluation-harness)"),
    "export": ("bam_lightning.interop.hf_export", "main",
               "a checkpoint -> a Hugging Face folder (Llama, Qwen2MoE or BAM remote code)"),
}


def usage() -> str:
    width = max(map(len, [*LIGHTNING_COMMANDS, *COMMANDS]))
    lines = ["usage: bam COMMAND [ARGS]   (bam COMMAND --help for a command's options)", "",
             "Lightning CLI commands (YAML recipes, --config, --print_config):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "bam commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


# Lightning's default process-group timeout (`default_pg_timeout`), kept as ours: it bounds the
# wait for the other ranks at start-up and every collective after it, so a shorter one would stop
# ranks that wait while rank 0 prepares data or writes a large checkpoint.
RENDEZVOUS_TIMEOUT_HINT = (
    "Start every rank (trainer.devices x trainer.num_nodes processes) with the same MASTER_ADDR and "
    "MASTER_PORT (torchrun/srun set them). The wait is bounded by the strategy's timeout, 30 minutes "
    "unless set, e.g. --trainer.strategy.class_path lightning.pytorch.strategies.DDPStrategy "
    "--trainer.strategy.init_args.timeout 0:05:00")


def run_lightning_cli(argv: list[str]) -> None:
    import torch.distributed

    from bam_lightning.lightning_cli import run_lightning_cli as run

    try:
        run(argv)
    except torch.distributed.DistError as error:
        # e.g. "Timed out after 1801 seconds waiting for clients. 1/2 clients joined."
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(f"bam {argv[0]}: this process could not meet the other ranks: {cause}\n{RENDEZVOUS_TIMEOUT_HINT}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    apply_malloc_policy()  # before the first large tensor: see bam_lightning/malloc.py
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        sys.exit(f"bam: unknown command {argv[0]!r}\n\n{usage()}")
    command = argv[0] if not argv[0].startswith("-") else ""
    try:
        if command in COMMANDS:
            module, function, _ = COMMANDS[command]
            getattr(importlib.import_module(module), function)(argv[1:])
        else:
            run_lightning_cli(argv)
    except UserError as error:  # the user's mistake: one line naming what to fix, no traceback
        fail(command, str(error))
    except OSError as error:  # a full disk outside the checkpoint writer (logs, prepared data)
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fail(command, f"no space left on device: {error.filename or error}; free some space, then run again "
                      "(a fit resumes from its last checkpoint: --ckpt_path; a pipeline: the same command)")


def fail(command: str, message: str) -> None:
    sys.stdout.flush()
    print(f"{' '.join(filter(None, ('bam', command)))}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
