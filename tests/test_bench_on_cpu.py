"""The loss benchmark command runs and prints DisCO/vanilla ratios for each shape (both KL units)."""

import re
import subprocess
import sys


def test_bench_prints_ratios_per_shape():
    cmd = [sys.executable, "-m", "recipe.disco.bench", "--rows", "16", "32", "--length", "64", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ratios = re.findall(r"(\d+)x64: .* ratio disco/vanilla (\d+\.\d+) \(step\) (\d+\.\d+) \(question\)", out)
    assert [rows for rows, _, _ in ratios] == ["16", "32"]
    assert all(float(step) > 0 and float(question) > 0 for _, step, question in ratios)
