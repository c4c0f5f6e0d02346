"""`bam pipeline` end to end on tiny data: stages, report, skip, invalidation, kill and re-run."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import read_prepared_split, write_domains

from bam_lightning.errors import UserError
from bam_lightning.pipeline import compute_matched_steps, load_pipeline_config, plan
from bam_lightning.pipeline import main as pipeline_main

MODEL = {"vocab_size": 257, "n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 16}
MIXTURE = {"n_experts": 2, "ffn_top_k": 1}


def recipe(domains, weights, model_class, config, steps, callbacks=(), **model_args):
    return {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "val_check_interval": 4,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": -1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": list(callbacks)},
        "model": {"class_path": f"bam_lightning.lit.{model_class}",
                  "init_args": {"config": config, "lr": 0.003, "warmup_steps": 1, **model_args}},
        "data": {"domains": domains, "train_weights": weights, "seq_len": 16, "batch_size": 4,
                 "val_tokens_per_domain": 256, "val_fraction": 0.2},
    }


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    domains = write_domains(tmp_path / "corpora")
    even = {name: 1.0 for name in domains}
    recipes = {
        "seed": recipe(domains, {"alpha": 0.8, "digits": 0.1, "code": 0.1}, "DenseLM", MODEL, 6),
        "expert_digits": recipe(domains, {"digits": 0.9, "alpha": 0.1}, "DenseLM", MODEL, 12),
    }
    for method, attn in (("btx", 0), ("bam", 2)):
        upcycling = {"class_path": "bam_lightning.callbacks.UpcyclingCallback",
                     "init_args": {"method": method, "sources": ["filled-in-by-the-pipeline"]}}
        recipes[method] = recipe(domains, even, "MoELM", {**MODEL, **MIXTURE, "attn_experts": attn}, 4,
                                 callbacks=[upcycling])
    paths = {}
    for name, content in recipes.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(content, sort_keys=False))
    pipeline = {
        "run_dir": str(tmp_path / "run"),
        "checkpoint_every_n_steps": 4,  # divides neither the seed's 6 steps nor bam_cm's: the final save must
        "seed": str(paths["seed"]),
        "experts": {"digits": str(paths["expert_digits"])},
        "mixtures": {"btx": str(paths["btx"]), "bam": str(paths["bam"])},
        "compute_matched": {"reference": "btx", "methods": ["bam"]},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path, paths, tmp_path / "run"


def bam(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "bam_lightning.cli", *args], capture_output=True, text=True,
                          env=env, **kwargs)


def test_pipeline_runs_every_stage_writes_the_report_and_skips_finished_stages(study, capsys):
    path, recipes, run_dir = study
    first = bam("pipeline", str(path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = [s.name for s in plan(load_pipeline_config(str(path)))]
    assert stages == ["seed", "expert_digits", "btx", "bam", "bam_cm"]
    # stdout is a pipe, not a terminal: one flushed line per validation, while the stage trains
    progress = [line for line in first.stdout.splitlines() if line.startswith("[seed] step 4/6")]
    assert len(progress) == 1 and "val/avg/loss" in progress[0], first.stdout[-3000:]
    assert re.search(r"[\d,]+ tokens/s  \d+s left$", progress[0]), progress[0]
    assert first.stdout.index(progress[0]) < first.stdout.index("[1/5] seed: val/avg/ppl")
    assert "[bam_cm] step 0/" in first.stdout  # the validation before step 0
    records = {name: json.loads((run_dir / "stages" / name / "stage.json").read_text()) for name in stages}
    # the experts start where the seed ended (its final step, not its last interval checkpoint)
    for key, value in records["seed"]["final"].items():
        assert records["expert_digits"]["initial"][key] == pytest.approx(value, rel=1e-5), key
    # compute matching: BAM's steps are cut so its training FLOPs do not exceed BTX's
    assert records["bam_cm"]["steps"] == compute_matched_steps(str(recipes["btx"]), str(recipes["bam"]))
    assert records["bam_cm"]["training_flops"] <= records["btx"]["training_flops"]
    assert records["bam"]["tokens"] == records["btx"]["tokens"]
    for name in stages:  # every stage's last.ckpt holds its final step
        saved = torch.load(run_dir / "stages" / name / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
        assert saved["global_step"] == records[name]["steps"] and saved["bam_lightning"]["final"], name
    report = (run_dir / "report.md").read_text()
    assert "its warm-up is cut in the same proportion" in report
    for label in ("seed", "digits expert (dense)", "BTX", "BAM DM Expert-KV", "BAM CM Expert-KV"):
        assert f"| {label} |" in report
    results = json.loads((run_dir / "results.json").read_text())
    assert {row["row"] for row in results["rows"]} == set(stages)
    assert (run_dir / "perplexity_by_domain.png").stat().st_size > 0
    assert any((run_dir / "tensorboard" / "bam").glob("events.out.tfevents.*"))

    capsys.readouterr()
    pipeline_main([str(path)])  # nothing to train: the same entry point, in this process
    assert capsys.readouterr().out.count("done earlier, skipped") == len(stages)

    # changing one mixture's recipe reruns that stage only (and what depends on it)
    changed = yaml.safe_load(recipes["btx"].read_text())
    changed["model"]["init_args"]["lr"] = 0.002
    recipes["btx"].write_text(yaml.safe_dump(changed, sort_keys=False))
    third = bam("pipeline", str(path))
    assert third.returncode == 0, third.stdout[-3000:]
    # bam_cm depends on BTX's FLOPs only, which an LR change leaves alone
    assert third.stdout.count("done earlier, skipped") == len(stages) - 1
    assert "btx: config changed" in third.stdout


def test_killed_pipeline_resumes_without_redoing_finished_stages(study):
    path, _, run_dir = study
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "bam_lightning.cli", "pipeline", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    expert_ckpt = run_dir / "stages" / "expert_digits" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not expert_ckpt.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert expert_ckpt.exists(), "the first expert never checkpointed"
    os.killpg(process.pid, signal.SIGKILL)  # the pipeline and its stage process, mid-stage
    process.wait()
    finished = {p.parent.name for p in (run_dir / "stages").glob("*/stage.json")}
    assert "seed" in finished and "bam" not in finished

    rerun = bam("pipeline", str(path))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for name in finished:
        assert f"{name}: done earlier, skipped" in rerun.stdout
    if "expert_digits" not in finished:  # killed mid-stage: it continues from its checkpoint
        assert "expert_digits: resuming" in rerun.stdout
    record = json.loads((run_dir / "stages" / "expert_digits" / "stage.json").read_text())
    assert record["steps"] == 12


def test_pipeline_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "x", "seed": "s.yaml", "experts": {}, "mixtures": {}, "sedes": [1]}))
    with pytest.raises(ValueError, match=r"unknown keys \['sedes'\]"):
        load_pipeline_config(str(path))
    path.write_text(yaml.safe_dump({"run_dir": "x", "seed": str(tmp_path / "missing.yaml"), "experts": {},
                                    "mixtures": {}}))
    with pytest.raises(UserError, match="missing.yaml not found"):
        load_pipeline_config(str(path))
    seed = tmp_path / "seed.yaml"
    seed.write_text("{}")
    path.write_text(yaml.safe_dump({"run_dir": "x", "seed": str(seed), "experts": {}, "mixtures": {},
                                    "seeds": [0, 0]}))
    with pytest.raises(ValueError, match="seeds must be a list of distinct non-negative integers"):
        load_pipeline_config(str(path))


def test_more_seeds_add_mixture_stages_and_keep_seed_zero_finished(study):
    """`seeds: [0, 1, 2]` repeats only the mixture phase; seed 0's stages keep their names and
    fingerprints, so a 1-seed study's finished mixtures are reused, not retrained."""
    from bam_lightning.pipeline import compose_stage, fingerprint

    path, _, run_dir = study
    one = load_pipeline_config(str(path))
    three = {**one, "seeds": [0, 1, 2]}
    names = [s.name for s in plan(three)]
    assert names == ["seed", "expert_digits", "btx", "bam", "bam_cm", "btx_s1", "bam_s1", "bam_cm_s1",
                     "btx_s2", "bam_s2", "bam_cm_s2"]

    def prints(config):
        return {s.name: fingerprint(compose_stage(s, config, run_dir), []) for s in plan(config)}

    first, repeated = prints(one), prints(three)
    assert all(repeated[name] == first[name] for name in first)
    seeds = {s.name: compose_stage(s, three, run_dir) for s in plan(three)}
    # a repeat changes the data order and the router initialisation, not the documents or the
    # validation set (data.seed decides the split)
    assert seeds["bam_s1"]["data"].get("seed") == seeds["bam"]["data"].get("seed")
    assert seeds["bam_s1"]["data"]["order_seed"] == seeds["bam"]["data"].get("seed", 1234) + 1
    router = [c for c in seeds["bam_s2"]["trainer"]["callbacks"] if c["class_path"].endswith("UpcyclingCallback")]
    assert router[0]["init_args"]["router_seed"] == 2


def small_study(tmp_path, **extra):
    """A three-stage study file (seed, one expert, BTX) on the tiny text domains."""
    domains = write_domains(tmp_path / "corpora")
    schedule = {"lr": 0.003, "warmup_steps": 1}
    study = {
        "run_dir": str(tmp_path / "run"), "checkpoint_every_n_steps": 4, "seed_everything": 1,
        "data": {"domains": domains, "seq_len": 16, "batch_size": 4, "val_tokens_per_domain": 256,
                 "val_fraction": 0.2},
        "trainer": {"accelerator": "cpu", "devices": 1, "check_val_every_n_epoch": None, "num_sanity_val_steps": -1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": MODEL,
        "seed": {"domain": "alpha", "train_weights": {"alpha": 0.8, "digits": 0.1, "code": 0.1}, "steps": 6,
                 **schedule},
        "experts": {"domains": ["digits"], "train_weights": {"own": 0.9, "seed": 0.1}, "steps": 4, **schedule},
        "mixtures": {"methods": ["btx"], "steps": 4, **schedule},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path, tmp_path / "run", domains


@pytest.fixture(scope="module")
def finished_small_study(tmp_path_factory):
    """`small_study` run once by `bam pipeline`: (root with corpora/ and cache/, study file, run dir)."""
    root = tmp_path_factory.mktemp("finished_small_study")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAM_CACHE_DIR", str(root / "cache"))
        path, run_dir, _ = small_study(root)
        first = bam("pipeline", str(path), timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return root, path, run_dir


def copy_of_finished_study(finished, tmp_path):
    """The finished study's run folder and prepared data copied into tmp_path, and a study file
    that trains there from the same corpora: every stage is finished."""
    root, path, run_dir = finished
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copytree(root / "cache", tmp_path / "cache")
    study = yaml.safe_load(path.read_text())
    study["run_dir"] = str(tmp_path / "run")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return tmp_path / "study.yaml", tmp_path / "run"


def test_a_change_that_cannot_run_never_destroys_a_finished_stage(finished_small_study, tmp_path, monkeypatch,
                                                                  capsys):
    """Issue 22, item 0: a refused change, run twice, keeps the finished seed; the original study reuses it."""
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    path, run_dir = copy_of_finished_study(finished_small_study, tmp_path)
    seed_ckpt = run_dir / "stages" / "seed" / "checkpoints" / "last.ckpt"
    seed_bytes = seed_ckpt.read_bytes()
    # refused before any stage: a data module argument, a path typo in a new domain
    for change in ("data.batch_size=0", f"data.domains.extra={tmp_path / 'typo' / '*.txt'}"):
        for _ in range(2):
            with pytest.raises(SystemExit) as refused:
                pipeline_main([str(path), "--set", change])
            assert refused.value.code == 2, change
            assert "bam pipeline: error: stage seed" in capsys.readouterr().err
            assert seed_ckpt.read_bytes() == seed_bytes, change
    # passes every check before the run, then refused by the seed's data preparation (one document)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "0.txt").write_text("one document only, so nothing can be held out for validation " * 10)
    for _ in range(2):
        failed = bam("pipeline", str(path), "--set", f"data.domains.extra={lonely / '*.txt'}", timeout=600)
        assert failed.returncode != 0 and "needs at least 2" in failed.stdout + failed.stderr
        assert seed_ckpt.read_bytes() == seed_bytes
        assert "previous outputs restored" in failed.stdout
        # the new domain is missing from the seed's explicit train_weights: named at the start (item 12)
        assert "warning: " in failed.stdout and "seed.train_weights leaves out 'extra'" in failed.stdout
    capsys.readouterr()
    pipeline_main([str(path)])  # nothing to train: the same entry point, in this process
    again = capsys.readouterr().out
    assert again.count("done earlier, skipped") == 3, again
    assert seed_ckpt.read_bytes() == seed_bytes


def test_stale_folders_are_numbered_and_a_returning_configuration_is_restored(tmp_path):
    from bam_lightning.pipeline import _matching_stale, move_aside

    stage = tmp_path / "stages" / "seed"
    for number in range(3):
        (stage / "checkpoints").mkdir(parents=True)
        (stage / "checkpoints" / "last.ckpt").write_text(f"weights {number}")
        (stage / "fingerprint").write_text(f"print{number}")
        (stage / "stage.json").write_text("{}")
        move_aside(stage)
    aside = sorted(p.name for p in stage.parent.iterdir())
    assert aside == ["seed.stale", "seed.stale.1", "seed.stale.2"]
    assert (stage.parent / "seed.stale" / "checkpoints" / "last.ckpt").read_text() == "weights 0"
    assert _matching_stale(stage, "print1") == stage.parent / "seed.stale.1"
    assert _matching_stale(stage, "print9") is None


def test_speed_only_fields_keep_fingerprints_and_result_fields_change_them(tmp_path, monkeypatch):
    """Issue 22, item 3 (and the data half of item 2): fingerprints follow what decides the numbers."""
    from bam_lightning.pipeline import check_stages, stage_fingerprints

    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    path, run_dir, domains = small_study(tmp_path, mixtures={"methods": ["btx", "sparse"], "steps": 4})

    def prints(*overrides, run=run_dir):
        config = load_pipeline_config(str(path), overrides=[f"run_dir={run}", *overrides])
        stages = plan(config)
        return stage_fingerprints(stages, check_stages(stages, config, run), config, run)

    base = prints()
    for speed_only in (["data.num_workers=1"], ["data.prepare_workers=2"], ["checkpoint_every_n_steps=3"], ["trainer.enable_progress_bar=true"],
                       ["trainer.log_every_n_steps=1"]):
        assert prints(*speed_only) == base, speed_only
    assert prints(run=tmp_path / "moved_run") == base  # the run folder moved
    changed = prints("mixtures.lr=0.002")
    assert changed["btx"] != base["btx"] and changed["seed"] == base["seed"]
    expert = prints("experts.lr=0.002")  # sparse upcycling reads only the seed
    assert expert["expert_digits"] != base["expert_digits"] and expert["btx"] != base["btx"]
    assert expert["sparse"] == base["sparse"]
    # the data's identity: a domain's text replaced (same path) retrains every stage
    first = tmp_path / "corpora" / "digits" / "0.txt"
    first.write_text("replaced text " * 40)
    replaced = prints()
    assert all(replaced[name] != base[name] for name in base)


def test_replacing_a_domains_text_retrains_the_stages_and_records_document_hashes(tmp_path, monkeypatch, capsys):
    """Issue 22, items 2 and 3 end to end: speed-only changes and a moved run folder reuse the
    stages; a domain's text replaced under the same path retrains all of them."""
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    path, run_dir, _ = small_study(tmp_path)
    first = bam("pipeline", str(path), timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((run_dir / "stages" / "btx" / "stage.json").read_text())
    (prepared,) = (tmp_path / "cache" / "prepared").glob("*/manifest.json")
    for domain, stats in record["val_documents"].items():  # a content hash per scored document
        # recomputed from the split read without the pipeline's reader (tests/helpers.py)
        tokens, _, offsets = read_prepared_split(prepared.parent / domain / "val", "uint16")
        expected = [hashlib.blake2b(tokens[offsets[i]:offsets[i + 1]].tobytes(), digest_size=8).hexdigest()
                    for i in stats["document"]]
        assert stats["hash"] == expected, domain
    os.rename(run_dir, tmp_path / "moved")
    capsys.readouterr()
    pipeline_main([str(path), "--set", f"run_dir={tmp_path / 'moved'}", "--set", "data.num_workers=1",
                   "--set", "checkpoint_every_n_steps=2"])  # nothing to train: in this process
    reused = capsys.readouterr().out
    assert reused.count("done earlier, skipped") == 3, reused[-3000:]
    digits = tmp_path / "corpora" / "digits"
    for i, document in enumerate(sorted(digits.glob("*.txt"))):
        document.write_text(" ".join(str((i * 11 + j) * (j + 5) % 89) for j in range(200)))
    rerun = bam("pipeline", str(path), "--set", f"run_dir={tmp_path / 'moved'}", timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "done earlier" not in rerun.stdout and rerun.stdout.count("config changed") == 3
    new = json.loads((tmp_path / "moved" / "stages" / "btx" / "stage.json").read_text())
    assert new["val_documents"]["digits"]["hash"] != record["val_documents"]["digits"]["hash"]
    assert new["val_documents"]["alpha"]["hash"] == record["val_documents"]["alpha"]["hash"]


def test_the_progress_callback_leaves_a_stages_numbers_alone(tmp_path, monkeypatch, capsys):
    """This version changes every fingerprint but not what a stage trains: the composed recipe
    differs only by the ProgressLog callback, and a stage fitted with it ends on exactly the
    weights and validation numbers of one fitted without it."""
    from bam_lightning.lightning_cli import run_lightning_cli
    from bam_lightning.pipeline import compose_stage

    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["bam"])
    path, _, _ = small_study(tmp_path)
    config = load_pipeline_config(str(path))
    seed = plan(config)[0]
    results = []
    for name in ("with", "without"):
        recipe = compose_stage(seed, config, tmp_path / name)
        if name == "without":
            recipe["trainer"]["callbacks"] = [c for c in recipe["trainer"]["callbacks"]
                                              if not c["class_path"].endswith("ProgressLog")]
        recipe_path = tmp_path / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        cli = run_lightning_cli(["--config", str(recipe_path)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        results.append(({k: v.clone() for k, v in cli.model.state_dict().items()},
                         {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}))
    printed = capsys.readouterr().out
    assert printed.count("[seed] step 6/6  val/avg/loss") == 1, printed  # only the run with the callback
    (weights, metrics), (plain_weights, plain_metrics) = results
    assert metrics == plain_metrics and metrics
    assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)
