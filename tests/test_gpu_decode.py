"""nvJPEG against libjpeg, and nvJPEG against itself under load (issue 8, part 3).

The facts benchmarks/gpu_decode_check.py measures, as assertions: a stream race would make
repeated GPU decodes of one batch differ; chroma upsampling makes only 4:2:0 colour files
differ from the CPU decode, by the same amount every time. CUDA only (pytest -m gpu).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_spec = importlib.util.spec_from_file_location(
    "gpu_decode_check", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode_check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_repeated_gpu_decodes_under_load_are_identical():
    files = check.encode(check.smooth_images(21, 40), subsampling=2)
    assert check.repeatability_under_load(files, repeats=100)["differing"] == 0


@pytest.mark.parametrize("subsampling,grey", [(0, False), (2, True)], ids=["444-colour", "420-grey"])
def test_gpu_decode_equals_cpu_decode_without_subsampled_colour(subsampling, grey):
    files = check.encode(check.smooth_images(21, 40, grey=grey), subsampling=subsampling)
    assert check.cpu_gpu_difference(files)["mean"] < 1.0  # IDCT rounding only
