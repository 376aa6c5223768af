"""The first-run check's verdicts (``recipe.disco.first_run``) on verl file-logger records.

A passing run end to end, through verl's vLLM rollout, is in ``test_vllm_rollout_on_cpu.py``; here each item is
shown to fail on the records a broken run would log.
"""

from __future__ import annotations

import json

import pytest

from recipe.disco import first_run
from recipe.disco.first_run import FAIL, PASS, SKIP
from recipe.disco.plot import read_log

HEALTHY = {
    0: {"val-core/synthetic/addition/acc/mean@4": 0.4},
    1: {
        "training/rollout_probs_diff_mean": 3e-7,
        "training/rollout_actor_probs_pearson_corr": 1.0,
        "actor/disco/kl": 0.0,
        "actor/disco/constraint_active": 0.0,
        "disco/questions/mixed": 3.0,
        "disco/answer_missing": 0.1,
        "perf/max_memory_reserved_gb": 0.0,
    },
    2: {
        "training/rollout_probs_diff_mean": 2e-7,
        "training/rollout_actor_probs_pearson_corr": 1.0,
        "actor/disco/kl": -3e-9,
        "actor/disco/constraint_active": 0.0,
        "disco/questions/mixed": 2.0,
        "disco/answer_missing": 0.2,
        "perf/max_memory_reserved_gb": 0.0,
    },
}


def verdicts(tmp_path, records: dict[int, dict], card_gib: float | None = None) -> dict[str, first_run.Verdict]:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": step, "data": data}) + "\n" for step, data in records.items()))
    return {v.item: v for v in first_run.verdicts(read_log(log), delta=1e-4, card_gib=card_gib)}


def changed(step: int, **metrics: float) -> dict[int, dict]:
    records = {s: dict(data) for s, data in HEALTHY.items()}
    records[step].update({key.replace("__", "/"): value for key, value in metrics.items()})
    return records


def test_a_healthy_cpu_run_passes_every_item_and_skips_gpu_memory(tmp_path):
    results = verdicts(tmp_path, HEALTHY)
    assert {item: v.status for item, v in results.items()} == {
        "step-0 validation accuracy": PASS,
        "rollout vs actor log-probs": PASS,
        "trust region at lr 0": PASS,
        "mixed questions": PASS,
        "answers found": PASS,
        "actor peak GPU memory": SKIP,
    }


@pytest.mark.parametrize(
    "records, item, text",
    [
        (changed(0, **{"val-core__synthetic__addition__acc__mean@4": 0.0}), "step-0 validation accuracy", "dummy"),
        (changed(2, training__rollout_probs_diff_mean=0.3), "rollout vs actor log-probs", "other weights"),
        (changed(1, training__rollout_actor_probs_pearson_corr=0.2), "rollout vs actor log-probs", "other weights"),
        (changed(2, actor__disco__kl=2e-5), "trust region at lr 0", "numerics"),
        (changed(2, actor__disco__constraint_active=0.25), "trust region at lr 0", "hinge inactive"),
        (
            {**changed(1, disco__questions__mixed=0.0), 2: {**HEALTHY[2], "disco/questions/mixed": 0.0}},
            "mixed questions",
            "gradient is 0",
        ),
        (changed(1, disco__answer_missing=0.97), "answers found", "</think>"),
    ],
)
def test_each_item_fails_on_what_a_broken_run_logs(tmp_path, records, item, text):
    result = verdicts(tmp_path, records)[item]
    assert result.status == FAIL and text in result.detail, result


def test_missing_metrics_fail_with_the_reason(tmp_path):
    results = verdicts(tmp_path, {1: {"actor/entropy": 1.0}})
    assert all(v.status in (FAIL, SKIP) for v in results.values())
    assert "val_before_train" in results["step-0 validation accuracy"].detail


def test_gpu_memory_near_the_card_fails(tmp_path):
    records = changed(1, perf__max_memory_reserved_gb=78.0)
    assert verdicts(tmp_path, records, card_gib=79.6)["actor peak GPU memory"].status == FAIL
    assert (
        verdicts(tmp_path, changed(1, perf__max_memory_reserved_gb=60.0), 79.6)["actor peak GPU memory"].status == PASS
    )


def test_the_cli_prints_the_overrides_and_exits_1_on_a_failure(tmp_path, capsys):
    assert first_run.main(["--overrides"]) == 0
    assert capsys.readouterr().out.split() == list(first_run.CHECK_OVERRIDES)
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in changed(2, actor__disco__kl=1.0).items())
    )
    assert first_run.main([str(log)]) == 1
    assert "[FAIL] trust region at lr 0" in capsys.readouterr().out
