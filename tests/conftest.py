"""Fixtures shared by the test files that train: a small slice of the bundled corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 40,000 characters of Macbeth (about 11k GPT-2 tokens): enough windows for tiny runs."""
    text = (ROOT / "data" / "shakespeare" / "macbeth_gut.txt").read_text(encoding="utf-8")[:40_000]
    path = tmp_path_factory.mktemp("data") / "macbeth.txt"
    path.write_text(text, encoding="utf-8")
    return path
