"""The WSE-2 preset is what the calibration derives from the paper's GEMV table."""
import pytest

from meshrt.calibrate import POINTS, calibrate, modeled_seconds
from meshrt.plmr import WSE2


def test_preset_equals_calibration():
    dev = calibrate(WSE2.with_(beta=1.0, macs_per_cycle=1.0))
    assert dev.alpha == 1.0
    assert dev.beta == pytest.approx(WSE2.beta, rel=1e-5)
    assert dev.macs_per_cycle == pytest.approx(WSE2.macs_per_cycle, rel=1e-5)
    assert dev.beta > dev.alpha  # the paper: a routing stage costs more than a hop


@pytest.mark.parametrize("size,seconds", POINTS)
def test_preset_reproduces_published_points(size, seconds):
    assert modeled_seconds(WSE2, size) == pytest.approx(seconds, rel=1e-4)
