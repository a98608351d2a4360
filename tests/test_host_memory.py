"""utils.host_memory: a process that decodes frame after frame reuses freed buffers instead of faulting in
fresh pages for each."""

import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DECODE_FRAMES = """
import resource, sys
import cv2, numpy as np
from utils.host_memory import reuse_freed_buffers
if sys.argv[1] == "reuse" and not reuse_freed_buffers():
    sys.exit(3)
frame = np.random.default_rng(0).integers(0, 255, (480, 854, 3), dtype=np.uint8)
data = cv2.imencode(".jpg", frame)[1]
cv2.imdecode(data, cv2.IMREAD_COLOR)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cv2.imdecode(data, cv2.IMREAD_COLOR)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_decode(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", DECODE_FRAMES, mode], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_decoded_frames_reuse_freed_memory():
    # An 854x480 frame is 300 pages; glibc's default maps them afresh for every decode.
    assert faults_per_decode("default") > 250
    assert faults_per_decode("reuse") < 10
