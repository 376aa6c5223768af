"""``python -m recipe.dft.demo`` (recipe/dft/demo.py): its command, run for real with a 2-step budget (DFT and
``--compare sft``, one seed) from a clean working directory, writes well-formed outputs and reuses its finished runs
on a rerun; verl's SFT dataset and DFT's dataset tokenize the demo's positives alike (and would not with the tiny
tokenizer's own template); the summary's statistics over seeds. Nothing checked depends on sampled tokens, accuracy
values or timing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from e2e_utils import TINY_CACHE

from recipe.dft import demo
from recipe.disco.cpu import carry
from recipe.disco.plot import mean_and_halfwidth

STEPS, SEED = 2, 1
COMMAND = ["-m", "recipe.dft.demo", "--compare", "sft", "--steps", str(STEPS), "--seeds", str(SEED)]
MODULES = {"dft": "recipe.dft.main_dft", "sft": "verl.trainer.sft_trainer"}
DEMO_TIMEOUT_S = 900  # about 90 s here: the limit only catches hangs


def run_demo(out: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, *COMMAND, "--out", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """The demo's output folder and printed output; the carry build is copied from the tests' cache (the demo
    reuses a finished build of the same specification)."""
    root = tmp_path_factory.mktemp("dft_demo")
    out = root / "out"
    shutil.copytree(carry.build_carry(TINY_CACHE, 0).model_dir.parent, out / "carry-seed0")
    (root / "cwd").mkdir()
    return out, run_demo(out, root / "cwd").stdout


def run_dir(out: Path, name: str) -> Path:
    return demo.run_folder(out, name, demo.LR, SEED)


def check_evaluation(evaluation: dict, questions: list[carry.Question]) -> None:
    """One answer per RL question, scored 0 or 1, and the accuracies their means."""
    answers = evaluation["answers"]
    assert [(a["a"], a["b"], a["split"]) for a in answers] == [(q.a, q.b, q.split) for q in questions]
    assert {a["score"] for a in answers} <= {0.0, 1.0}
    for split, key in (("val", "heldout_accuracy"), ("train", "train_accuracy")):
        scores = [a["score"] for a in answers if a["split"] == split]
        assert evaluation[key] == pytest.approx(np.mean(scores))


def test_the_demo_trains_dft_and_sft_and_writes_well_formed_outputs(demo_run):
    out, stdout = demo_run
    questions = carry.read_questions(carry.build_carry(out, 0))
    assert sum(q.split == "val" for q in questions) == 35 and sum(q.split == "train" for q in questions) == 70
    check_evaluation(json.loads((out / "base" / "eval.json").read_text()), questions)
    pool = pd.read_parquet(out / "pool.parquet")
    assert len(pool) == 70 and {len(ids) for ids in pool["negative_ids"]} == {demo.NEGATIVES["num_samples"]}
    for name, module in MODULES.items():
        folder = run_dir(out, name)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [record["step"] for record in records] == list(range(1, STEPS + 1))
        assert all("train/loss" in record["data"] for record in records)
        assert (folder / "trainer.log").stat().st_size > 0
        assert (demo.last_hf_model(folder) / "model.safetensors").is_file()
        done = json.loads((folder / "done.json").read_text())
        data = out / "data" / f"seed{SEED}" / ("pool.parquet" if name == "dft" else "sft.parquet")
        assert done["args"][:4] == ["--standalone", "--nproc_per_node=2", "-m", module]
        assert f"data.train_files={data}" in done["args"] and f"trainer.total_training_steps={STEPS}" in done["args"]
        assert ("dft.score=dft" in done["args"]) == (name == "dft")
        evaluation = json.loads((folder / "eval.json").read_text())
        check_evaluation(evaluation, questions)
        assert evaluation["run"]["method"] == name and evaluation["run"]["seed"] == SEED
    assert "dft/weight_mean" in json.loads((run_dir(out, "dft") / "metrics.jsonl").read_text().splitlines()[0])["data"]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("Base model (before training): held-out accuracy")
    for name in MODULES:
        assert f"| {demo.METHODS[name].label} | {demo.LR:g} | {SEED} |" in summary
    assert summary in stdout


def test_sft_and_dft_get_the_same_examples_in_the_same_seeded_order(demo_run):
    out, _ = demo_run
    positives = pd.read_parquet(out / "positives.parquet")
    sft = pd.read_parquet(out / "data" / f"seed{SEED}" / "sft.parquet")
    pool = pd.read_parquet(out / "data" / f"seed{SEED}" / "pool.parquet")
    order = np.random.default_rng(SEED).permutation(len(positives))
    assert list(order) != sorted(order)
    expected = [(row.prompt[0]["content"], row.response) for row in positives.iloc[order].itertuples()]
    assert [(m[0]["content"], m[1]["content"]) for m in sft["messages"]] == expected
    assert [(row.prompt[0]["content"], row.response) for row in pool.itertuples()] == expected


def test_verls_sft_dataset_tokenizes_the_positives_as_dft_only_with_the_demos_template(demo_run, tmp_path):
    out, _ = demo_run
    files = out / "data" / f"seed{SEED}"
    demo.check_same_positives(out / "model", files / "sft.parquet", files / "pool.parquet")  # raises nothing
    # the tiny template's newline after the EOS
    with pytest.raises(RuntimeError, match="verl.s SFT dataset tokenizes .* unlike DFT.s data outputs"):
        demo.check_same_positives(out / "carry-seed0" / "model", files / "sft.parquet", files / "pool.parquet")


def test_a_rerun_of_the_same_command_reuses_every_finished_run(demo_run):
    out, _ = demo_run
    before = {name: (run_dir(out, name) / "eval.json").stat().st_mtime_ns for name in MODULES}
    stdout = run_demo(out, out.parent / "cwd").stdout
    for name in MODULES:
        assert f"=== {name}, lr {demo.LR:g}, seed {SEED}: reusing the finished run" in stdout
        assert (run_dir(out, name) / "eval.json").stat().st_mtime_ns == before[name]


def test_the_summary_gives_means_over_seeds_and_paired_tests_against_sft():
    heldout = {"dft": [0.5, 0.6, 0.7], "sft": [0.4, 0.6, 0.5], "dft2": [0.5, 0.6, 0.5]}
    runs = [
        demo.Run(name, 1e-3, seed, accuracy, 1.0, 10.0)
        for name, values in heldout.items()
        for seed, accuracy in enumerate(values, start=1)
    ]
    summary = demo.summary_markdown({"heldout_accuracy": 0.3, "train_accuracy": 0.4}, runs, "note\n")
    mean, halfwidth = mean_and_halfwidth(heldout["dft"])
    assert f"| {demo.METHODS['dft'].label} | 0.001 | 3 | {mean:.3f} ± {halfwidth:.3f} | 1.000 ± 0.000 |" in summary
    differences = np.subtract(heldout["dft"], heldout["sft"])
    mean, halfwidth = mean_and_halfwidth(differences)
    t = differences.mean() / (differences.std(ddof=1) / np.sqrt(3))
    row = (
        f"| {demo.METHODS['dft'].label} - SFT | 0.001 | held-out accuracy (primary) | 3 | {mean:+.3f} ± {halfwidth:.3f}"
    )
    assert f"{row} | {t:.2f} |" in summary
    assert f"| {demo.METHODS['dft2'].label} - SFT | 0.001 | held-out accuracy (primary) | 3 | +0.033" in summary
    assert summary.endswith("note\n")
    single = demo.summary_markdown({"heldout_accuracy": 0.3, "train_accuracy": 0.4}, runs[:1], "note\n")
    assert "mean ± 95 %" not in single and "- SFT |" not in single
