"""Reading Triton's TTGIR for the static report: the MMA layouts of the dots and the tiles they cover.

An MMA layout (``#mma = #ttg.nvidia_mma<{versionMajor = 3, ..., warpsPerCTA = [8, 1],
instrShape = [16, 64, 16]}>``) spreads the warps of a program over an accumulator tile. Each
warp owns 16 rows of an MMA (warpgroup MMA: four warps, 64 rows), so a layout with
``warpsPerCTA[0]`` warps along M covers ``16 * warpsPerCTA[0]`` rows. A dot whose result tile has
fewer rows than that computes the missing rows again on other warps: with 8 warps over a 64-row
tile both warpgroups issue the same wgmma (the A descriptor does not depend on the warpgroup)
and every row is computed twice.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["MmaTile", "mma_tiles"]

ROWS_PER_WARP = 16  # rows of one MMA that one warp owns (mma.sync m16; a warpgroup's 64 = 4 x 16)

_LAYOUT = re.compile(r"^#(\w+)\s*=\s*#\w+\.nvidia_mma<\{(.*)\}>", re.MULTILINE)
_FIELD = re.compile(r"(\w+)\s*=\s*(\[[^\]]*\]|\d+)")
_DOT = re.compile(r"\b(?:tt\.dot|ttng\.warp_group_dot)\b.*->\s*tensor<(\d+)x(\d+)x(\w+),\s*#(\w+)>")


@dataclasses.dataclass(frozen=True)
class MmaTile:
    """One dot's accumulator tile (``rows`` x ``cols``) on its MMA layout."""

    rows: int
    cols: int
    version: int  # 2: mma.sync (sm_80/89), 3: warpgroup MMA (sm_90)
    warps: tuple[int, ...]  # warpsPerCTA
    instr: tuple[int, ...]  # instrShape

    @property
    def rows_covered(self) -> int:
        """Rows the layout's warps span along M, ``16 * warpsPerCTA[0]``."""
        return ROWS_PER_WARP * self.warps[0]

    @property
    def replicated(self) -> bool:
        """True when the warps along M span more rows than the tile has (rows computed twice)."""
        return self.rows < self.rows_covered

    def label(self) -> str:
        return f"{self.rows}x{self.cols} warps {list(self.warps)} v{self.version}"


def _layouts(ttgir: str) -> dict[str, dict[str, tuple[int, ...]]]:
    out = {}
    for name, body in _LAYOUT.findall(ttgir):
        fields = {}
        for key, value in _FIELD.findall(body):
            numbers = tuple(int(v) for v in re.findall(r"\d+", value))
            fields[key] = numbers
        out[name] = fields
    return out


def mma_tiles(ttgir: str) -> list[MmaTile]:
    """Every distinct (tile, layout) of the dots (``tt.dot``, ``ttng.warp_group_dot``) in a TTGIR
    module whose result is on an MMA layout; dots on blocked layouts (FMA dots) are left out."""
    layouts = _layouts(ttgir)
    tiles = []
    for rows, cols, _, encoding in _DOT.findall(ttgir):
        layout = layouts.get(encoding)
        if layout is None:
            continue
        tile = MmaTile(int(rows), int(cols), layout.get("versionMajor", (0,))[0], layout.get("warpsPerCTA", (1, 1)),
                       layout.get("instrShape", ()))  # fmt: skip
        if tile not in tiles:
            tiles.append(tile)
    return tiles
