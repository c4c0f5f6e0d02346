"""Study files: derived fields, equality with the per-stage recipe files, errors naming the field."""

from pathlib import Path

import pytest
import yaml

from bam_lightning.data.corpora import load_documents
from bam_lightning.pipeline import (
    check_stages,
    compose_stage,
    compute_matched_steps,
    load_pipeline_config,
    plan,
)
from bam_lightning.pipeline import main as pipeline_main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny"


def write(path: Path, content) -> str:
    path.write_text(yaml.safe_dump(content, sort_keys=False) if not isinstance(content, str) else content)
    return str(path)


def tiny_study(tmp_path: Path, **changes) -> dict:
    study = yaml.safe_load((TINY / "study.yaml").read_text())
    study["run_dir"] = str(tmp_path / "run")
    for key, value in changes.items():
        node = study
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return study


def composed(path: str, run_dir: Path, seeds=None) -> dict:
    config = load_pipeline_config(path)
    if seeds is not None:
        config["seeds"] = seeds
    stages = plan(config)
    return {s.name: compose_stage(s, config, run_dir) for s in stages}, stages, config


def test_five_domain_study_derives_counts_sources_and_validation_domains(tmp_path):
    words = tmp_path / "dictionary"
    words.mkdir()
    (words / "a.txt").write_text("aardvark: an animal\n")
    domains = {"literature": "builtin", "code": "builtin", "legal": "builtin", "math": "builtin",
               "dictionary": str(words / "*.txt")}  # the one new line
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path, **{"data.domains": domains}))
    run = tmp_path / "run"
    recipes, stages, config = composed(path, run)
    check_stages(stages, config, run)  # parses every stage as `bam fit` would
    experts = ["code", "legal", "math", "dictionary"]
    assert [s.name for s in stages if s.role == "expert"] == [f"expert_{d}" for d in experts]
    sources = [str(run / "stages" / name / "checkpoints" / "last.ckpt") for name in ["seed", *map("expert_{}".format, experts)]]
    expected = {  # method -> (n_experts, attn_experts, attn_shared_kv, ffn_top_k, upcycling method)
        "btx": (5, 0, False, 1, "btx"), "bam": (5, 5, False, 1, "bam"), "bam_shared_kv": (5, 5, True, 1, "bam_shared_kv"),
        "sparse": (5, 0, False, 1, "sparse"), "btx_param_matched": (7, 0, False, 2, "btx"),
        "bam_cm": (5, 5, False, 1, "bam"), "bam_shared_kv_cm": (5, 5, True, 1, "bam_shared_kv")}
    for name, (n_experts, attn, shared, top_k, method) in expected.items():
        model = recipes[name]["model"]["init_args"]["config"]
        assert (model["n_experts"], model["attn_experts"], model["attn_shared_kv"], model["ffn_top_k"]) == \
            (n_experts, attn, shared, top_k), name
        upcycling = [c for c in recipes[name]["trainer"]["callbacks"] if c["class_path"].endswith("UpcyclingCallback")]
        assert upcycling[0]["init_args"]["sources"] == sources and upcycling[0]["init_args"]["method"] == method
        assert recipes[name]["data"]["train_weights"] == {d: 0.2 for d in domains}
    for name, recipe in recipes.items():  # every stage reads and validates on the same five domains
        assert recipe["data"]["domains"] == domains, name
        assert "val_domains" not in recipe["data"], name  # None: all domains
    for domain in experts:
        assert recipes[f"expert_{domain}"]["data"]["train_weights"] == {domain: 0.9, "literature": 0.1}
        assert recipes[f"expert_{domain}"]["model"]["init_args"]["init_from"] == sources[0]
    assert recipes["dense_baseline"]["trainer"]["max_steps"] == recipes["btx"]["trainer"]["max_steps"]


def old_tiny_pipeline(tmp_path: Path) -> str:
    """The tiny study as it shipped before study files: one recipe file per stage."""
    return write(tmp_path / "pipeline.yaml", {
        "run_dir": str(tmp_path / "run"), "seeds": [0], "checkpoint_every_n_steps": 50,
        "seed": str(TINY / "seed.yaml"),
        "experts": {d: str(TINY / f"expert_{d}.yaml") for d in ("code", "legal", "math")},
        "mixtures": {m: str(TINY / f"{m}.yaml") for m in ("btx", "bam", "bam_shared_kv", "sparse", "btx_param_matched")},
        "compute_matched": {"reference": "btx", "methods": ["bam", "bam_shared_kv"]},
        "dense_baseline": str(TINY / "dense_continue.yaml")})


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_tiny_study_composes_exactly_the_stage_configs_of_the_recipe_files(tmp_path, seeds):
    run = tmp_path / "run"
    new, new_stages, _ = composed(write(tmp_path / "study.yaml", tiny_study(tmp_path)), run, seeds)
    old, old_stages, _ = composed(old_tiny_pipeline(tmp_path), run, seeds)
    assert [s.name for s in new_stages] == [s.name for s in old_stages]
    assert [(s.max_steps, s.seed, s.depends) for s in new_stages] == [(s.max_steps, s.seed, s.depends) for s in old_stages]
    for name in old:
        assert new[name] == old[name], name


def test_shipped_studies_compose_and_pass_the_pre_run_checks(tmp_path):
    for path in sorted(RECIPES.glob("*/study.yaml")):
        config = load_pipeline_config(str(path))
        stages = plan(config)
        if isinstance(config["seed"], dict) and "checkpoint" in config["seed"]:
            # the real-seed study starts from an imported checkpoint that only `bam import-hf` makes
            # (its composition is tested in test_interop.py): no seed stage, experts first
            assert stages[0].role == "expert", path
            continue
        check_stages(stages, config, tmp_path / path.parent.name)
        assert [s.name for s in stages][:1] == ["seed"], path


@pytest.mark.parametrize("change, message", [
    ({"mixtures.methods": ["btx", "bam", "moe_magic"]}, "mixtures.methods: unknown method 'moe_magic'"),
    ({"experts.domains": ["code", "poetry"]}, "experts.domains: expert for 'poetry', which is not one of data.domains"),
    ({"experts.domains": ["code", "code"]}, "experts.domains: a list of distinct domains"),
    ({"mixtures.compute_matched": {"reference": "btx", "methods": ["bam"]}, "mixtures.methods": ["bam"]},
     "mixtures.compute_matched.reference: 'btx' is not run"),
    ({"mixtures.compute_matched": {"reference": "btx", "methods": ["sparse"]}, "mixtures.methods": ["btx", "bam"]},
     "mixtures.compute_matched.methods: 'sparse' is not run"),
    ({"seed.domain": "poetry"}, "seed.domain: 'poetry' is not one of data.domains"),
    ({"mixtures.steps": 0}, "mixtures.steps: a positive number"),
    ({"overrides": {"bam_moe": {"trainer.max_steps": 3}}}, "overrides.bam_moe: names no stage or method"),
    ({"experts.train_weights": {"own": 0.9, "poetry": 0.1}}, "experts.train_weights: 'poetry' is not one of"),
    ({"trainer.max_steps": 5}, "trainer.max_steps: is per stage"),
    ({"mixtures.sweep": [100, 0]}, "mixtures.sweep: a list of distinct positive step counts"),
    ({"mixtures.router.ffn_gate_scal": 4.0}, "mixtures.router.ffn_gate_scal: not a model field"),
    ({"mixtures.router.n_experts": 5}, "mixtures.router.n_experts: derived from mixtures.methods"),
    ({"model.attn_experts": 4}, "model.attn_experts: derived from mixtures.methods"),
])
def test_bad_study_files_are_refused_naming_the_field(tmp_path, change, message):
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path, **change))
    with pytest.raises(ValueError, match=f"^{path}: ") as error:
        load_pipeline_config(path)
    assert message in str(error.value)


def test_set_changes_a_study_field_for_one_run_and_bad_items_are_refused(tmp_path, capsys):
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path))
    config = load_pipeline_config(path, overrides=[f"run_dir={tmp_path / 'fp'}", "mixtures.router.ffn_gate_scale=4.0",
                                                   "mixtures.methods=[btx, bam]", "mixtures.sweep=[300]",
                                                   "mixtures.compute_matched.methods=[bam]"])
    recipes = {s.name: compose_stage(s, config, tmp_path / "fp") for s in plan(config)}
    assert {name for name in recipes if "L300" in name} == {"btx_L300", "bam_L300", "bam_cm_L300"}
    assert recipes["bam_L300"]["model"]["init_args"]["config"]["ffn_gate_scale"] == 4.0
    assert recipes["btx"]["model"]["init_args"]["config"]["ffn_gate_scale"] == 4.0
    assert config["run_dir"] == str(tmp_path / "fp")
    assert recipes["seed"]["model"]["init_args"]["config"].get("ffn_gate_scale", 1.0) == 1.0  # the seed is dense
    for item, message in [("mixtures", "give KEY=VALUE"), ("mixtures.steps.x=3", "mixtures.steps is not a mapping"),
                          ("mixtures.methods=[btx, foo]", "mixtures.methods: unknown method 'foo'")]:
        with pytest.raises(SystemExit) as exit_info:
            pipeline_main([path, "--check", "--set", item])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, item


def test_a_domain_named_twice_is_refused_naming_the_field(tmp_path):
    text = (TINY / "study.yaml").read_text().replace("    math: builtin ", "    code: builtin \n    math: builtin ")
    path = write(tmp_path / "study.yaml", text)
    with pytest.raises(ValueError, match=r"data\.domains\.code: named twice"):
        load_pipeline_config(path)


@pytest.mark.parametrize("override, message", [
    ({"bam": {"model.init_args.config.n_experts": 3}}, "stage bam .*model.init_args.config: bam builds one attention"),
    ({"expert_math": {"trainer": {"max_stepz": 3}}}, "stage expert_math .*recipe: .*max_stepz"),
    ({"expert_code": {"data.val_domains": ["code"]}}, "stage expert_code .*data.val_domains: \\['code'\\], but stage seed"),
    ({"sparse": {"model.init_args.config.d_model": 64}}, "stage sparse .*d_model"),
])
def test_every_stage_is_checked_before_the_first_one_runs(tmp_path, override, message):
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path, overrides=override))
    config = load_pipeline_config(path)
    with pytest.raises(ValueError, match=message):
        check_stages(plan(config), config, tmp_path / "run")


def test_overrides_change_one_stage_or_one_methods_rows(tmp_path):
    path = write(tmp_path / "study.yaml", tiny_study(
        tmp_path, overrides={"bam": {"model": {"init_args": {"config": {"router_init": "zeros"}}}},
                             "expert_math": {"trainer.max_steps": 7}}))
    recipes, stages, config = composed(path, tmp_path / "run")
    assert recipes["bam"]["model"]["init_args"]["config"]["router_init"] == "zeros"
    assert recipes["bam_cm"]["model"]["init_args"]["config"]["router_init"] == "zeros"  # CM rows of the method too
    assert recipes["bam_shared_kv"]["model"]["init_args"]["config"]["router_init"] == "normal"
    assert recipes["expert_math"]["trainer"]["max_steps"] == 7 and recipes["expert_code"]["trainer"]["max_steps"] == 100
    assert recipes["bam"]["model"]["init_args"]["config"]["router_init_std"] == 0.01  # merged, not replaced


def test_an_existing_checkpoint_as_the_seed(tmp_path):
    checkpoint = tmp_path / "imported.safetensors"
    checkpoint.write_bytes(b"")
    study = tiny_study(tmp_path)
    study["seed"] = {"domain": "literature", "checkpoint": str(checkpoint)}
    recipes, stages, config = composed(write(tmp_path / "study.yaml", study), tmp_path / "run")
    assert "seed" not in recipes and [s.name for s in stages][:3] == ["expert_code", "expert_legal", "expert_math"]
    assert recipes["expert_code"]["model"]["init_args"]["init_from"] == str(checkpoint)
    upcycling = [c for c in recipes["bam"]["trainer"]["callbacks"] if c["class_path"].endswith("UpcyclingCallback")]
    assert upcycling[0]["init_args"]["sources"][0] == str(checkpoint)
    study["seed"]["steps"] = 10
    with pytest.raises(ValueError, match="seed: an existing checkpoint seed trains nothing"):
        load_pipeline_config(write(tmp_path / "study.yaml", study))


def test_an_existing_seed_checkpoint_of_another_shape_is_refused_before_any_stage(tmp_path):
    from helpers import random_dense_state_dict, save_lightning_checkpoint, tiny_config

    study = tiny_study(tmp_path)
    shape = {k: v for k, v in study["model"].items() if k != "tie_embeddings"}
    right = tiny_config(**shape)
    wrong = tiny_config(**{**shape, "d_model": 64})  # head_dim and rotary_dim follow d_model
    for name, model, message in (("wrong", wrong, r"\['d_model', 'head_dim', 'rotary_dim'\] differ from the seed"),
                                  ("right", right, None)):
        checkpoint = save_lightning_checkpoint(tmp_path / f"{name}.ckpt", model, random_dense_state_dict(model, 0))
        study["seed"] = {"domain": "literature", "checkpoint": str(checkpoint)}
        config = load_pipeline_config(write(tmp_path / f"{name}.yaml", study))
        if message is None:
            check_stages(plan(config), config, tmp_path / "run")
        else:
            with pytest.raises(ValueError, match=message):
                check_stages(plan(config), config, tmp_path / "run")


def test_sweep_adds_the_reference_and_compute_matched_rows_at_each_length(tmp_path):
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path, **{"mixtures.sweep": [100, 400]}))
    recipes, stages, config = composed(path, tmp_path / "run")
    swept = {s.name: s for s in stages if s.mixture_steps == 400}
    assert set(swept) == {"btx_L400", "bam_L400", "bam_shared_kv_L400", "bam_cm_L400", "bam_shared_kv_cm_L400"}
    assert swept["bam_cm_L400"].row == "bam_cm@400" and swept["btx_L400"].row == "btx@400"
    assert recipes["btx_L400"]["trainer"]["max_steps"] == 400
    # warm-up and validation keep their share of the run: 10 of 100 -> 40 of 400
    assert recipes["btx_L400"]["model"]["init_args"]["warmup_steps"] == 40
    assert recipes["btx_L400"]["trainer"]["val_check_interval"] == 200
    cm = compute_matched_steps(config["sweep"][400]["btx"], config["sweep"][400]["bam"])
    assert recipes["bam_cm_L400"]["trainer"]["max_steps"] == cm
    assert 3 * recipes["bam_cm"]["trainer"]["max_steps"] <= cm <= 5 * recipes["bam_cm"]["trainer"]["max_steps"]
    # the study's own length keeps the plain names, so an earlier run's stages are reused
    assert {"btx", "bam", "bam_cm"} <= set(recipes) and "btx_L100" not in recipes
    # --sweep on the command line gives the same stages as the field
    from_flag = plan(load_pipeline_config(write(tmp_path / "plain.yaml", tiny_study(tmp_path)), sweep=[100, 400]))
    assert [(s.name, s.max_steps) for s in from_flag] == [(s.name, s.max_steps) for s in stages]


def test_a_capped_domain_says_how_much_it_kept(tmp_path, capsys):
    folder = tmp_path / "words"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i}.txt").write_text(f"document {i} " * 10)
    sizes = sorted(len(f"document {i} " * 10) for i in range(10))
    kept = load_documents("words", str(folder / "*.txt"), max_bytes=sum(sizes[:3]), seed=0)
    total, used = sum(sizes), sum(len(d.encode()) for d in kept)
    assert f"kept {len(kept)} of 10 documents, {used:,} of {total:,} bytes" in capsys.readouterr().err
    load_documents("words", str(folder / "*.txt"), max_bytes=10**9, seed=0)
    assert "kept" not in capsys.readouterr().err


def test_a_study_file_runs_end_to_end_with_a_length_sweep_and_routing_in_the_report(tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys

    from helpers import write_domains

    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    domains = write_domains(tmp_path / "corpora")
    schedule = {"lr": 0.003, "warmup_steps": 1}
    study = {
        "run_dir": str(tmp_path / "run"), "checkpoint_every_n_steps": 4, "seed_everything": 1,
        "data": {"domains": domains, "seq_len": 16, "batch_size": 4, "val_tokens_per_domain": 256, "val_fraction": 0.2},
        "trainer": {"accelerator": "cpu", "devices": 1, "check_val_every_n_epoch": None, "num_sanity_val_steps": -1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"vocab_size": 257, "n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 16},
        "seed": {"domain": "alpha", "train_weights": {"alpha": 0.8, "digits": 0.1, "code": 0.1}, "steps": 6, **schedule},
        "experts": {"domains": ["digits"], "train_weights": {"own": 0.9, "seed": 0.1}, "steps": 4, **schedule},
        "mixtures": {"methods": ["btx", "bam"], "steps": 4, "val_check_interval": 2, **schedule,
                     "compute_matched": {"reference": "btx", "methods": ["bam"]}, "sweep": [4, 8]},
    }
    # downstream accuracy of every model after the report (issue 20): a tiny local multiple-choice task
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": f"{a} + {b} =", "choices": [str(a + b), str(a * b + 1)],
                                                           "label": 0}) + "\n" for a, b in ((1, 2), (3, 4), (2, 5), (6, 1))))
    (tmp_path / "mc.yaml").write_text(f"""task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    study["eval"] = {"tasks": [str(tmp_path / "mc.yaml")], "batch_size": 4}
    path = write(tmp_path / "study.yaml", study)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-m", "bam_lightning.cli", "pipeline", path], capture_output=True, text=True,
                         env=env, timeout=1200)  # a hang fails instead of blocking CI
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "8 stages composed and checked" in run.stdout
    stages = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "run" / "stages").glob("*/stage.json")}
    assert set(stages) == {"seed", "expert_digits", "btx", "bam", "bam_cm", "btx_L8", "bam_L8", "bam_cm_L8"}
    assert stages["btx_L8"]["steps"] == 8 and stages["bam_cm_L8"]["mixture_steps"] == 8
    assert stages["bam_cm_L8"]["training_flops"] <= stages["btx_L8"]["training_flops"]
    assert stages["bam"]["sources"] == ["seed", "expert_digits"] and stages["bam"]["method"] == "bam"
    assert stages["bam"]["seed_domain"] == "alpha"
    # a final validation run after the fit (CM: its last step is off the validation interval) keeps
    # every domain's routing, not only the first loader's
    assert stages["bam_cm"]["steps"] % 2 and "val/digits/ffn_load/layer0/expert1" in stages["bam_cm"]["final"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Routing" in report and "## Mixture-length sweep" in report
    assert "| BAM CM Expert-KV | 4 |" in report and "| BAM CM Expert-KV | 8 |" in report
    assert (tmp_path / "run" / "routing_bam.png").stat().st_size > 0
    assert (tmp_path / "run" / "sweep_ppl_vs_flops.png").stat().st_size > 0
    # every model scored once on the task, recorded beside the run and summarised in the report
    assert run.stdout.count("[eval ") == 16 and "[eval 8/8]" in run.stdout, run.stdout[-3000:]
    assert run.stdout.count(" items in ") == 8  # each model's line when its evaluation is done
    for name in stages:
        scored = json.loads((tmp_path / "run" / "eval" / f"{name}.json").read_text())
        assert scored["results"]["tiny_sums"]["n"] == 4, name
    assert "## Downstream accuracy" in report and "| seed |" in report.split("## Downstream accuracy")[1]
    # each stage is an ordinary `bam fit` recipe on disk
    assert yaml.safe_load((tmp_path / "run" / "stages" / "bam_L8" / "config.yaml").read_text())["trainer"]["max_steps"] == 8


def test_set_is_applied_before_interpolation_is_resolved(tmp_path):
    """Issue 22, item 6: `experts.lr: ${seed.lr}` follows `--set seed.lr=...` as it follows the file."""
    study = tiny_study(tmp_path)
    study["experts"]["lr"] = "${seed.lr}"
    path = write(tmp_path / "study.yaml", study)
    recipes, _, _ = composed(path, tmp_path / "run")
    assert recipes["expert_code"]["model"]["init_args"]["lr"] == study["seed"]["lr"]
    config = load_pipeline_config(path, overrides=["seed.lr=0.01"])
    recipes = {s.name: compose_stage(s, config, tmp_path / "run") for s in plan(config)}
    assert recipes["seed"]["model"]["init_args"]["lr"] == 0.01
    assert recipes["expert_code"]["model"]["init_args"]["lr"] == 0.01
    study["experts"]["lr"] = "${seed.learning_rate}"
    with pytest.raises(ValueError, match=r"bad.yaml: Interpolation key .seed.learning_rate. not found"):
        load_pipeline_config(write(tmp_path / "bad.yaml", study))


def test_sweep_rescales_the_effective_warm_up_default_and_overridden(tmp_path):
    """Issue 22, item 5: the default warm-up and a method's overridden one keep their share at each length."""
    from bam_lightning.pipeline import DEFAULT_WARMUP_STEPS

    study = tiny_study(tmp_path, **{"mixtures.sweep": [50, 400]})
    del study["mixtures"]["warmup_steps"]  # the model's default
    study["overrides"] = {"bam": {"model.init_args.warmup_steps": 20}}
    steps = study["mixtures"]["steps"]
    recipes, _, _ = composed(write(tmp_path / "study.yaml", study), tmp_path / "run")
    for length in (50, 400):
        btx = recipes[f"btx_L{length}"]["model"]["init_args"]
        assert btx["warmup_steps"] == round(DEFAULT_WARMUP_STEPS * length / steps), length
        assert recipes[f"bam_L{length}"]["model"]["init_args"]["warmup_steps"] == round(20 * length / steps)
        cm = recipes[f"bam_cm_L{length}"]
        assert cm["model"]["init_args"]["warmup_steps"] == round(
            round(20 * length / steps) * cm["trainer"]["max_steps"] / length)
    assert recipes["bam"]["model"]["init_args"]["warmup_steps"] == 20  # the study's own length: as written
    assert "warmup_steps" not in recipes["btx"]["model"]["init_args"]


def test_a_domain_left_out_of_an_explicit_mix_is_named_at_check(tmp_path, capsys):
    """Issue 22, item 12: the seed's explicit train_weights miss a new domain: a warning names it."""
    words = tmp_path / "dictionary"
    words.mkdir()
    for i in range(2):
        (words / f"{i}.txt").write_text(f"aardvark {i}: an animal\n")
    domains = {"literature": "builtin", "code": "builtin", "legal": "builtin", "math": "builtin",
               "dictionary": str(words / "*.txt")}
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path, **{"data.domains": domains}))
    config = load_pipeline_config(path)
    assert len(config["warnings"]) == 1 and "seed.train_weights leaves out 'dictionary'" in config["warnings"][0]
    pipeline_main([path, "--check"])
    out = capsys.readouterr().out
    assert "warning: " in out and "seed.train_weights leaves out 'dictionary'" in out
    # said explicitly (weight 0), or an equal mix: nothing to warn about
    weights = {**tiny_study(tmp_path)["seed"]["train_weights"], "dictionary": 0}
    quiet = write(tmp_path / "quiet.yaml", tiny_study(tmp_path, **{"data.domains": domains,
                                                                   "seed.train_weights": weights}))
    assert load_pipeline_config(quiet)["warnings"] == []


def test_a_seed_checkpoint_with_another_tokenizer_is_refused_before_any_stage(tmp_path, capsys):
    """Issue 22, item 0: the seed's tokenizer is checked against the data before the first stage."""
    from helpers import random_dense_state_dict, save_lightning_checkpoint, tiny_config

    study = tiny_study(tmp_path)
    shape = tiny_config(**{k: v for k, v in study["model"].items() if k != "tie_embeddings"})
    for tokenizer, refused in (("bpe-300-abcdef012345", True), ("byte", False)):
        checkpoint = save_lightning_checkpoint(tmp_path / f"{tokenizer}.ckpt", shape,
                                               random_dense_state_dict(shape, 0), tokenizer=tokenizer)
        study["seed"] = {"domain": "literature", "checkpoint": str(checkpoint)}
        path = write(tmp_path / "study.yaml", study)
        if refused:
            with pytest.raises(SystemExit) as exit_info:
                pipeline_main([path, "--check"])
            assert exit_info.value.code == 2
            assert "tokenizer 'bpe-300-abcdef012345', but data.tokenizer gives 'byte'" in capsys.readouterr().err
        else:
            pipeline_main([path, "--check"])
            assert "stages composed and checked" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
