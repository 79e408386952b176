"""Which of ``fastvit.kernels.flash_attention``'s Triton kernels a call launches, in order: the
tests that pin a backward's launches (the dQ and dK/dV passes, the dBias walk, the short backward)."""

from __future__ import annotations

# kind -> kernel name in fastvit.kernels.flash_attention
KERNELS = {
    "fwd": "flash_attention_fwd_kernel",
    "dq": "flash_attention_bwd_dq_kernel",
    "dkdv": "flash_attention_bwd_dkdv_kernel",
    "dbias": "flash_attention_bwd_dbias_kernel",
    "short": "flash_attention_bwd_short_kernel",
}


class LaunchRecorder:
    """Stands in for a Triton kernel object in the launcher's module: records ``kind`` at each
    ``kernel[grid](...)`` (with ``keyword``: the launch's value of that keyword argument instead,
    e.g. ``LAZY_RESCALE``) and launches the real kernel."""

    def __init__(self, kernel, kind: str, calls: list, keyword: str | None = None) -> None:
        self.kernel, self.kind, self.calls, self.keyword = kernel, kind, calls, keyword

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        if self.keyword is None:
            self.calls.append(self.kind)
            return launch

        def recorded(*args, **kwargs):
            self.calls.append(kwargs[self.keyword])
            return launch(*args, **kwargs)

        return recorded


def record_launches(monkeypatch, kinds=tuple(KERNELS)) -> list[str]:
    """Record the launches of the kernels of ``kinds`` (keys of ``KERNELS``) for the rest of the
    test: the returned list fills with their kinds in launch order."""
    from fastvit.kernels import flash_attention as kernels

    calls: list[str] = []
    for kind in kinds:
        name = KERNELS[kind]
        monkeypatch.setattr(kernels, name, LaunchRecorder(getattr(kernels, name), kind, calls))
    return calls
