"""Shared test setup."""

import pytest


@pytest.fixture(autouse=True)
def no_mlflow_tracking_uri_from_the_shell(monkeypatch):
    # lit_dreamer honours MLflow's MLFLOW_TRACKING_URI; tests must not log to a server the developer's
    # shell points at. Subprocesses inherit the cleaned environment.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
