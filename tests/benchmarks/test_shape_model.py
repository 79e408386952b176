"""The shape model (benchmarks/shape_model.py) on shapes whose answer is worked out by hand,
including issue 15's: at N = 197 the forward's 128 x 64 tiles do 59% useful work, a 16-key tail 73%."""

from __future__ import annotations

import math

import pytest

from fastvit.benchmarks.shape_model import attention_forward, padded_fraction, predicted_s, waves


def test_padded_fraction_at_vit_lengths():
    # 197 = ViT-B/16 at 224 (cls + 14 * 14): queries pad to 256 (128 blocks), keys to 256 (64 blocks)
    assert padded_fraction(197, 197, 128, 64) == pytest.approx(197 * 197 / (256 * 256))  # 0.59
    # a 16-key tail: the last key block holds 5 keys, padded to 16: 192 + 16 = 208
    assert padded_fraction(197, 197, 128, 64, key_tail=16) == pytest.approx(197 * 197 / (256 * 208))  # 0.73
    assert round(padded_fraction(197, 197, 128, 64), 2) == 0.59
    assert round(padded_fraction(197, 197, 128, 64, key_tail=16), 2) == 0.73
    assert padded_fraction(256, 1024, 128, 64) == 1.0  # whole tiles
    assert padded_fraction(0, 5, 128, 64) == 1.0  # nothing to compute, nothing wasted


def test_waves_and_their_efficiency():
    # 132 SMs x 2 CTAs = 264 slots: 264 programs are one full wave, 265 two waves, the second of one
    assert waves(264, 90, 2) == (1.0, 1.0)
    count, eff = waves(265, 90, 2)
    assert count == pytest.approx(265 / 264) and eff == pytest.approx(265 / 264 / 2)
    assert waves(54, 80, 1) == (0.5, 0.5)  # half of A100's 108 SMs idle


def test_attention_forward_prediction():
    # ViT-B training batch: B = 64, H = 12, N = 197, on sm_90 with 2 CTAs/SM and an issue ratio of 1.25
    model = attention_forward(64, 12, 197, 197, 128, 64, arch=90, ctas_per_sm=2, loop_issue_ratio=1.25)
    programs = 2 * 64 * 12  # 1536 programs over 264 slots: 5.8 waves
    assert model.waves == pytest.approx(programs / 264)
    assert model.wave_efficiency == pytest.approx(programs / 264 / 6)
    assert model.issue_efficiency == pytest.approx(0.8)
    expected = 197 * 197 / 256**2 * (programs / 264 / 6) * 0.8
    assert model.efficiency == pytest.approx(expected)
    assert model.predicted_s(1e-3) == pytest.approx(1e-3 / expected)
    # no MMA loop (fp32) or a loop under 1: the issue rate costs nothing
    assert attention_forward(1, 1, 128, 64, 128, 64, 90, 1, None).issue_efficiency == 1.0
    assert attention_forward(1, 1, 128, 64, 128, 64, 90, 1, 0.5).issue_efficiency == 1.0
    assert predicted_s(1.0, 0.0) == math.inf
