"""The benchmark command runs and prints a disco/vanilla ratio for each shape."""

import re
import subprocess
import sys


def test_bench_prints_a_ratio_per_shape():
    cmd = [sys.executable, "-m", "recipe.disco.bench", "--rows", "16", "32", "--length", "64", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ratios = re.findall(r"(\d+)x64: .* ratio disco/vanilla (\d+\.\d+)", out)
    assert [rows for rows, _ in ratios] == ["16", "32"] and all(float(r) > 0 for _, r in ratios)
