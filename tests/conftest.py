"""Shared test fixtures: paths and small model configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STARCODER2_TOKENIZER = SHARED / "tokenizers" / "starcoder2-reconstructed" / "tokenizer.json"


@pytest.fixture
def starcoder2_tokenizer_path() -> Path:
    """The rebuilt StarCoder2 tokenizer from ../shared; tests that need it skip without it."""
    if not STARCODER2_TOKENIZER.is_file():
        pytest.skip(f"{STARCODER2_TOKENIZER} not present")
    return STARCODER2_TOKENIZER


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores here; keep each test process from oversubscribing them.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    yield


@pytest.fixture
def one_process(monkeypatch):
    """Trainers built in the test process are single processes, whatever launch variables
    (torchrun's or an srun step's) the test runner itself has."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
