"""The WSE-2 preset is what the calibration derives from the paper's allowed points."""

import pytest

from llm.cost.calibration import KV_POINT, calibrate, kv_points, time_points
from meshrt.calibrate import gemv_points, residuals
from meshrt.plmr import WSE2

FITTED = ("beta", "vector_setup", "task_switch", "reserved_bytes")


def test_preset_equals_calibration():
    start = WSE2.with_(beta=1.0, vector_setup=1.0, task_switch=10.0, reserved_bytes=0.0)
    dev = calibrate(start)
    for name in FITTED:
        assert getattr(dev, name) == pytest.approx(getattr(WSE2, name), rel=1e-4), name
    # structure, not fitted
    assert (dev.alpha, dev.macs_per_cycle, dev.wavelet_cycles) == (1.0, 2.0, 1.0)
    assert dev.beta > dev.alpha  # the paper: a routing stage costs more than a hop
    assert all(getattr(dev, n) > 0 for n in FITTED)


def test_preset_reproduces_every_allowed_point():
    rows = residuals(WSE2, time_points() + kv_points())
    assert len(rows) == 5
    for label, measured, modeled, rel in rows:
        assert abs(rel) < 1e-5, (label, measured, modeled)


def test_kv_point_is_integer_exact():
    _, _, shift, concat = KV_POINT
    got = [v for _, _, v, _ in residuals(WSE2, kv_points())]
    assert got == [shift, concat]


def test_gemv_points_alone_fix_vector_setup():
    # the two GEMV sizes differ only in the local tile: changing the task switch (never paid by
    # a single kernel) leaves them, changing the vector set-up does not
    base = [m for _, _, m, _ in residuals(WSE2, gemv_points())]
    same = [m for _, _, m, _ in residuals(WSE2.with_(task_switch=1e4), gemv_points())]
    moved = [m for _, _, m, _ in residuals(WSE2.with_(vector_setup=10.0), gemv_points())]
    assert same == base
    assert all(b < m for b, m in zip(base, moved))
