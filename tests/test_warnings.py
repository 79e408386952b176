"""fastvit's fallback warnings: once per reason in a process, and as the warning filters say
(fastvit.backend.warn_once)."""

from __future__ import annotations

import importlib
import warnings

import pytest

import fastvit

backend_module = importlib.import_module("fastvit.backend")  # fastvit.backend is the function


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "_warned", set())


def _fall_back() -> None:
    backend_module.warn_once("test-reason", "fastvit: a test fallback")


def test_a_reason_warns_once():
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a test fallback"):
        _fall_back()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fall_back()  # said already: silent


def test_an_error_filter_raises_at_every_call():
    # the README's "make a fallback an error": the first call raised and the second fell back
    # silently, the reason counted as said
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastvit.FastvitFallbackWarning)
        for _ in range(2):
            with pytest.raises(fastvit.FastvitFallbackWarning):
                _fall_back()


def test_a_warning_ignored_by_a_filter_is_said_later():
    # a library's catch_warnings("ignore") around the first fallback silenced it for the process
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=fastvit.FastvitFallbackWarning)
        _fall_back()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="something else")
        with pytest.warns(fastvit.FastvitFallbackWarning):
            _fall_back()
