"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True)
def no_mlflow_tracking_uri_from_the_shell(monkeypatch):
    # lit_dreamer honours MLflow's MLFLOW_TRACKING_URI; tests must not log to a server the developer's
    # shell points at. Subprocesses inherit the cleaned environment.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A run's working folder: the tmp dir as cwd, no inherited run name, one torch thread."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_DREAMER_RUN_NAME", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)
