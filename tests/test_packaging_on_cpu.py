"""Packaging: the GPU extras install without building flash-attn (issue 10, finding 5).

verl 0.9.1's ``fsdp`` extra requires ``flash-attn==2.8.3``, which PyPI carries as source only, with a build that
imports torch, so a default (build-isolated) ``pip install -e ".[vllm]"`` that pulls it fails. The project's
extras must reach verl's serving stacks without it (flash-attn is its own install step, docs/install.md).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
VERL_EXTRA = re.compile(r"^verl\[([^\]]+)\]")


def verl_requirements(extras: set[str]) -> list[str]:
    """verl 0.9.1's installed requirements for ``extras``, following verl's extras that name other verl extras."""
    lines = importlib.metadata.requires("verl") or []
    seen, todo, found = set(), set(extras), []
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for line in lines:
            if f'extra == "{extra}"' in line:
                found.append(line)
                nested = VERL_EXTRA.match(line)
                todo |= {name.strip() for name in nested.group(1).split(",")} - seen if nested else set()
    return found


def project_verl_extras(extra: str) -> set[str]:
    """The verl extras the project's ``extra`` asks for: its line ``extra = ["verl[...]==..."]`` in pyproject.toml
    (read as text: tomllib is not in Python 3.10)."""
    (names,) = re.findall(rf'^{extra} = \["verl\[([^\]]+)\]', PYPROJECT.read_text(), re.MULTILINE)
    return {name.strip() for name in names.split(",")}


@pytest.mark.parametrize("extra", ["vllm", "sglang"])
def test_the_gpu_extras_do_not_pull_flash_attn(extra):
    requirements = verl_requirements(project_verl_extras(extra))
    assert any(line.startswith(("vllm", "sglang")) for line in requirements)
    assert not [line for line in requirements if line.startswith("flash-attn")]


def test_verls_fsdp_extra_is_the_one_that_would():
    """The check above can see flash-attn: it is what verl's fsdp extra (the former vllm extra's) brings."""
    assert [line for line in verl_requirements({"fsdp"}) if line.startswith("flash-attn")]
