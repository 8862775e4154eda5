"""Shared fixtures and helpers. Expensive things (TFX runs) are session-scoped."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
COCO_TINY = os.path.join(SHARED_DATA, "coco_tiny")
COCO_EVAL_100 = os.path.join(SHARED_DATA, "coco_val2014_100_eval")


def require_dir(path: str) -> str:
    """Skips the calling test when a shared data folder is absent (as on users' machines)."""
    if not os.path.isdir(path):
        pytest.skip(f"shared test data not present: {path}")
    return path


@pytest.fixture(scope="session")
def coco_tiny_dir() -> str:
    return require_dir(COCO_TINY)


@pytest.fixture(scope="session")
def coco_eval_100_dir() -> str:
    return require_dir(COCO_EVAL_100)
