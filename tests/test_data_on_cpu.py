"""The data converter (recipe/disco/data.py) on fixture files in each source schema (tests/fixtures/data).

The fixtures are the first rows (plus edge cases: a two-alternative Minerva answer, a multi-answer OlympiadBench
problem, an AMC float answer, AIME answers with leading zeros, AIME 2025 integer answers) of the files the
converter downloads: DeepScaleR-style training rows (problem/answer/solution) and the DisCO repository's
``deepscaler/deepscaler/data/test/*.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from recipe.disco import data

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
SOURCE_FILES = {
    "deepscaler": "deepscaler",
    "aime24": "aime",
    "aime25": "aime25",
    "math500": "math",
    "amc23": "amc",
    "minerva": "minerva",
    "olympiad_bench": "olympiad_bench",
}
OUTPUTS = {name: ("deepscaler_train.parquet" if name == "deepscaler" else f"{name}.parquet") for name in SOURCE_FILES}
SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."


def _fixture(name: str) -> list[dict]:
    return json.loads((FIXTURES / f"{SOURCE_FILES[name]}.json").read_text())


def _counts(source_dir: Path = FIXTURES) -> list[str]:
    return [
        f"--expected-rows={name}={len(json.loads((source_dir / f'{stem}.json').read_text()))}"
        for name, stem in SOURCE_FILES.items()
    ]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recipe.disco.data", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def _expected_gold(answer) -> list[str]:
    """The source answer as accepted strings, written out independently of the converter."""
    items = answer if isinstance(answer, list) else [answer]
    return [str(int(a)) if isinstance(a, float) and a.is_integer() else str(a).strip() for a in items]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disco_data")
    assert data.main(["--output-dir", str(out), "--from-dir", str(FIXTURES), *_counts()]) == 0
    return out


def test_paper_counts_are_the_defaults():
    expected = {
        "deepscaler": 40315,
        "aime24": 30,
        "aime25": 30,
        "math500": 500,
        "amc23": 83,
        "minerva": 272,
        "olympiad_bench": 675,
    }
    assert {name: dataset.expected_rows for name, dataset in data.DATASETS.items()} == expected
    assert {name: dataset.output for name, dataset in data.DATASETS.items()} == OUTPUTS


def test_rows_match_sources(converted):
    for name in SOURCE_FILES:
        frame = pd.read_parquet(converted / OUTPUTS[name])
        source = _fixture(name)
        assert len(frame) == len(source)
        for index, (row, src) in enumerate(zip(frame.to_dict("records"), source, strict=True)):
            assert row["data_source"] == name and row["ability"] == "math"
            assert [dict(m) for m in row["prompt"]] == [{"role": "user", "content": f"{src['problem']} {SUFFIX}"}]
            assert list(row["reward_model"]["ground_truth"]) == _expected_gold(src["answer"])
            assert row["reward_model"]["style"] == "rule"
            assert row["extra_info"] == {"split": "train" if name == "deepscaler" else "test", "index": index}


def test_verl_rlhf_dataset_reads_all_files_together(converted):
    from torch.utils.data import DataLoader
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    files = [str(converted / OUTPUTS[name]) for name in SOURCE_FILES]
    config = OmegaConf.create({"max_prompt_length": 2048, "filter_overlong_prompts": False, "return_raw_chat": True})
    dataset = RLHFDataset(data_files=files, tokenizer=None, config=config)
    assert len(dataset) == sum(len(_fixture(name)) for name in SOURCE_FILES)
    sources = [_fixture(name) for name in SOURCE_FILES]
    flat = [(name, i, row) for name, rows in zip(SOURCE_FILES, sources, strict=True) for i, row in enumerate(rows)]
    for position, (name, index, src) in enumerate(flat):
        item = dataset[position]
        assert item["raw_prompt"] == [{"role": "user", "content": f"{src['problem']} {SUFFIX}"}]
        assert item["data_source"] == name and item["index"] == index
        assert list(item["reward_model"]["ground_truth"]) == _expected_gold(src["answer"])
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_fn)))
    assert list(batch["data_source"]) == [name for name, _, _ in flat]


def test_rerun_changes_nothing(converted):
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in converted.iterdir()}
    result = _run("--output-dir", str(converted), "--from-dir", str(FIXTURES), *_counts())
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": unchanged") == len(SOURCE_FILES)
    after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in converted.iterdir()}
    assert after == before


def test_changed_source_rewrites_only_its_file(converted, tmp_path):
    sources = tmp_path / "sources"
    shutil.copytree(FIXTURES, sources)
    amc = json.loads((sources / "amc.json").read_text())
    amc[0]["answer"] = 143.0
    (sources / "amc.json").write_text(json.dumps(amc))
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    assert data.main(["--output-dir", str(out), "--from-dir", str(sources), *_counts(sources)]) == 0
    changed = {p.name for p in out.iterdir() if p.read_bytes() != (converted / p.name).read_bytes()}
    assert changed == {"amc23.parquet"}
    assert list(pd.read_parquet(out / "amc23.parquet")["reward_model"][0]["ground_truth"]) == ["143"]


def test_source_formats_are_interchangeable(converted, tmp_path):
    """A .parquet or .jsonl copy (as the Hub serves it) converts to the same bytes as the .json one."""
    sources = tmp_path / "sources"
    shutil.copytree(FIXTURES, sources)
    pd.DataFrame(_fixture("deepscaler")).to_parquet(sources / "deepscaler.parquet")
    (sources / "deepscaler.json").unlink()
    (sources / "amc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _fixture("amc23")))
    (sources / "amc.json").unlink()
    out = tmp_path / "out"
    assert data.main(["--output-dir", str(out), "--from-dir", str(sources), *_counts(FIXTURES)]) == 0
    for name in ("deepscaler", "amc23"):
        assert (out / OUTPUTS[name]).read_bytes() == (converted / OUTPUTS[name]).read_bytes()


def test_prepare_data_sh_writes_to_disco_data_dir(tmp_path):
    """The shell wrapper with the environment defaults: output in $DISCO_DATA_DIR, sources in $DISCO_DATA_SOURCE_DIR."""
    env = {**os.environ, "DISCO_DATA_DIR": str(tmp_path / "d"), "DISCO_DATA_SOURCE_DIR": str(FIXTURES)}
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["bash", str(REPO / "recipe/disco/prepare_data.sh"), *_counts()],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(OUTPUTS.values())


def _assert_failed_cleanly(result: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert result.returncode == 1
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing written, no temporary file left


def test_count_mismatch_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = _run("--output-dir", str(out), "--from-dir", str(FIXTURES))
    _assert_failed_cleanly(result, out, "deepscaler: 4 rows", "expected 40315")


def test_count_mismatch_of_one_eval_set(tmp_path):
    out = tmp_path / "out"
    counts = [c for c in _counts() if "amc23" not in c] + ["--expected-rows=amc23=83"]
    result = _run("--output-dir", str(out), "--from-dir", str(FIXTURES), *counts)
    _assert_failed_cleanly(result, out, "amc23: 3 rows", "expected 83")


@pytest.mark.parametrize(
    ("stem", "corrupt", "needles"),
    [
        ("minerva", lambda rows: [rows[0], {k: v for k, v in rows[1].items() if k != "answer"}, rows[2]],
         ["minerva: rows [1]", "empty 'answer'"]),
        ("olympiad_bench", lambda rows: [{("final_answer" if k == "answer" else k): v for k, v in r.items()}
                                          for r in rows],
         ["olympiad_bench: row 0", "no field 'answer'"]),
        ("aime", lambda rows: [rows[0], {**rows[1], "problem": "  "}, rows[2]], ["aime24: row 1", "'problem'"]),
        ("math", lambda rows: [*rows[:3], {**rows[3], "answer": ""}], ["math500: rows [3]", "empty 'answer'"]),
        ("amc", lambda rows: [*rows[:2], {**rows[2], "answer": {"value": 81}}], ["amc23: row 2", "type dict"]),
    ],
    ids=["missing-answer", "other-schema", "empty-problem", "empty-eval-answer", "answer-type"],
)  # fmt: skip
def test_malformed_source_names_dataset_and_row(tmp_path, stem, corrupt, needles):
    sources = tmp_path / "sources"
    shutil.copytree(FIXTURES, sources)
    rows = json.loads((sources / f"{stem}.json").read_text())
    (sources / f"{stem}.json").write_text(json.dumps(corrupt(rows)))
    out = tmp_path / "out"
    _assert_failed_cleanly(_run("--output-dir", str(out), "--from-dir", str(sources), *_counts()), out, *needles)


def test_unreadable_and_missing_sources(tmp_path):
    sources = tmp_path / "sources"
    shutil.copytree(FIXTURES, sources)
    (sources / "olympiad_bench.json").write_text('[{"problem": "truncated')
    (sources / "aime25.json").unlink()
    out = tmp_path / "out"
    result = _run(
        "--output-dir", str(out), "--from-dir", str(sources), *_counts(FIXTURES), "--datasets", "olympiad_bench"
    )
    _assert_failed_cleanly(result, out, "olympiad_bench: could not read", "olympiad_bench.json")
    result = _run("--output-dir", str(out), "--from-dir", str(sources), "--datasets", "aime25")
    _assert_failed_cleanly(result, out, "aime25: expected exactly one of", "aime25.json")


def test_empty_training_answers_are_kept_with_a_warning(tmp_path):
    sources = tmp_path / "sources"
    shutil.copytree(FIXTURES, sources)
    rows = _fixture("deepscaler")
    rows[1]["answer"] = ""
    (sources / "deepscaler.json").write_text(json.dumps(rows))
    result = _run("--output-dir", str(tmp_path / "out"), "--from-dir", str(sources), "--datasets", "deepscaler",
                  "--expected-rows=deepscaler=4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 rows" in result.stderr and "empty answer" in result.stderr
    assert list(pd.read_parquet(tmp_path / "out" / OUTPUTS["deepscaler"])["reward_model"][1]["ground_truth"]) == []


# a closed local port as proxy: every download fails at once, with or without internet on the test machine
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def test_network_failure_of_a_github_source(tmp_path):
    out = tmp_path / "out"
    result = _run("--output-dir", str(out), "--datasets", "aime24", "amc23", env=OFFLINE)
    _assert_failed_cleanly(
        result, out, "aime24: could not download", "raw.githubusercontent.com", "--from-dir", "aime.json"
    )


def test_network_failure_of_the_hub_source(tmp_path):
    out = tmp_path / "out"
    result = _run("--output-dir", str(out), "--datasets", "deepscaler", env={**OFFLINE, "HF_HUB_OFFLINE": "1"})
    _assert_failed_cleanly(
        result, out, "deepscaler: could not download", "agentica-org/DeepScaleR-Preview-Dataset", "--from-dir"
    )


@pytest.mark.parametrize("bad", ["aime24", "nope=3", "aime24=0", "aime24=x"])
def test_expected_rows_flag_is_checked(bad, capsys):
    with pytest.raises(SystemExit):
        data.main(["--expected-rows", bad])
    assert "NAME=COUNT" in capsys.readouterr().err
