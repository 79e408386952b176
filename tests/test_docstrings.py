"""The public API's docstrings: every name in ``fastvit.__all__`` and ``fastvit.nn.__all__`` (and
the public methods and properties of those classes) has an example, and every example that runs
on a CPU without downloads runs as written (doctest; the ones on CUDA tensors or pretrained
weights are checked by the GPU run and by hand).
"""

from __future__ import annotations

import doctest
import inspect
import sys
from collections.abc import Callable

import pytest
import torch

import fastvit
import fastvit.nn

# examples that need what CI lacks: a GPU, or weights from the Hub
NEEDS = ("cuda", "from_pretrained", "pretrained=True", "hf_hub")


def _public() -> list[tuple[str, Callable]]:
    """(dotted name, object) of each public function, class, method and property."""
    found = [(f"fastvit.{n}", getattr(fastvit, n)) for n in fastvit.__all__]
    found += [(f"fastvit.nn.{n}", getattr(fastvit.nn, n)) for n in fastvit.nn.__all__]
    members = []
    for name, obj in found:
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            elif isinstance(value, property):
                value = value.fget
            if callable(value):
                members.append((f"{name}.{attr}", value))
    return [(n, o) for n, o in found + members if callable(o)]


PUBLIC = _public()


def test_every_public_name_has_an_example():
    missing = [name for name, obj in PUBLIC if ">>>" not in (inspect.getdoc(obj) or "")]
    assert missing == []


def _examples() -> list[tuple[str, doctest.DocTest]]:
    finder = doctest.DocTestFinder(recurse=False)
    tests = []
    for name, obj in PUBLIC:
        module = sys.modules.get(getattr(obj, "__module__", ""), fastvit)
        globs = {**vars(module), "fastvit": fastvit, "torch": torch}
        for test in finder.find(obj, name, globs=globs):
            source = "".join(example.source for example in test.examples)
            if test.examples and not any(word in source for word in NEEDS):
                tests.append((name, test))
    return tests


EXAMPLES = _examples()


def test_the_cpu_examples_are_many():
    assert len(EXAMPLES) >= 20  # a filter that dropped them all would pass the test below


@pytest.mark.parametrize(("name", "test"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs_as_written(name, test):
    source = "".join(example.source for example in test.examples)
    for library in ("timm", "transformers", "torchvision"):
        if library in source:
            pytest.importorskip(library)
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=out.append, clear_globs=False)
    assert result.failed == 0, "".join(out)
