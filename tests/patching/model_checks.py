"""The checks a patched family's test file runs on its model whatever the family, as a base class.

A test file subclasses ``ModelChecks`` once per model it builds (``class TestSamChecks(ModelChecks)``)
and names the builder, the inputs, the fastvit custom ops its export must hold and the op whose calls
it counts; pytest collects the inherited tests under the subclass. What differs between families
(the report, the rule's inputs, dropout and hooks) stays in the family's own tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    assert_exports_with_ops,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_patch_and_unpatch_keep_the_weights,
    pair,
)


class ModelChecks:
    """Unpatch, torch.compile, torch.export, the Triton kernels in the interpreter and on a GPU.

    Attributes (set by the subclass):
        build: () -> the unpatched model, in eval mode (a ``staticmethod``).
        inputs: (batch) -> its inputs (a ``staticmethod``).
        triton_inputs: () -> the inputs of the interpreter's run (one image, maybe another size:
            a padded map), or None for ``inputs(1)``.
        export_ops: the fastvit custom ops the exported graph holds.
        counted_op: the op (``"layernorm_mlp"``, ``"flash_attention"``) whose calls the checks count.
        calls: its calls in one forward.
    """

    build: ClassVar[Callable[[], nn.Module]]
    inputs: ClassVar[Callable[[int], torch.Tensor]]
    triton_inputs: ClassVar[Callable[[], torch.Tensor] | None] = None
    export_ops: ClassVar[frozenset[str]]
    counted_op: ClassVar[str]
    calls: ClassVar[int]

    def test_patch_and_unpatch_keep_the_weights(self):
        assert_patch_and_unpatch_keep_the_weights(self.build())

    def test_torch_compile_fullgraph(self, op_calls):
        # A fresh dynamo: the families' wrappers (HFLastHiddenState ...) share one forward, so a model
        # compiled earlier in this process would make dynamo recompile this one with dynamic shapes
        # (automatic dynamic), a slower compile whose cost depends on the test order
        torch._dynamo.reset()
        reference, patched, _ = pair(self.build())
        x = self.inputs(2)
        compiled = torch.compile(patched, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)

    @pytest.mark.interpreter
    def test_torch_export_keeps_the_custom_ops(self):
        assert_exports_with_ops(self.build(), self.inputs(1), set(self.export_ops))

    @pytest.mark.interpreter
    def test_triton_route(self, op_calls):
        reference, patched, _ = pair(self.build())
        x = self.inputs(1) if self.triton_inputs is None else self.triton_inputs()
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, x)
        assert op_calls[self.counted_op]

    @pytest.mark.gpu
    def test_compiled_kernels_on_the_gpu(self, op_calls):
        assert_matches_on_the_gpu(self.build(), self.inputs(2))
        assert len(op_calls[self.counted_op]) >= self.calls
