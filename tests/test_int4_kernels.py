"""Which GEMVs the Gluon int4 kernel (int4_kernels_chatglm) takes, and how it cuts them; no GPU needed.

The kernel itself runs compiled on CUDA only (Gluon has no interpreter): tests/test_decode_kernels.py checks it
against the model's forward there, and tools/int4_gemv_check.py at the 6B shapes.
"""
from __future__ import annotations

import pytest
import torch

CUDA = torch.device("cuda", 0)
EPI_RESIDUAL, EPI_SWIGLU = 1, 2


@pytest.fixture
def kernels(monkeypatch):
    from chatglm import int4_kernels_chatglm as kernels

    monkeypatch.setattr(kernels, "available", lambda device: device.type == "cuda")  # as on a GPU with Gluon
    return kernels


def launch(kernels, n=4096, k=13696, bits=4, epilogue=EPI_RESIDUAL, rows=1, dtype=torch.float16, bias=False,
           device=CUDA):
    return kernels.gluon_launch(n, k, bits, epilogue, rows, dtype, bias, device)


def test_launch_cuts_k_into_whole_units_per_split(kernels, monkeypatch):
    # 4h_to_h: 13696 columns = 107 units of 128; (64 rows, 4 units per step, 4 warps, no prefetch, 8 splits)
    monkeypatch.setitem(kernels.GLUON_CONFIGS, (4096, 13696, EPI_RESIDUAL), (64, 4, 4, 0, 8))
    got = launch(kernels)
    # 107 / 8 -> 14 units per split, rounded up to whole steps of 4 -> 16, so 7 splits (the last one 11 units)
    assert (got.units_per_split, got.splits, got.tiles, got.block_n) == (16, 7, 64, 64)


@pytest.mark.parametrize("change,why", [
    (dict(dtype=torch.bfloat16), "fp16 only: the dequantize builds fp16 values"),
    (dict(rows=9), "at most 8 rows: the MMA's 8-column operand"),
    (dict(bias=True), "no bias epilogue"),
    (dict(bits=8), "int4 only"),
    (dict(n=4096, k=4000), "K a multiple of 128"),
    (dict(n=1000, k=4096), "a shape not in the table"),
    (dict(device=torch.device("cpu")), "CUDA only"),
])
def test_launch_declines_what_it_does_not_serve(kernels, change, why, monkeypatch):
    monkeypatch.setitem(kernels.GLUON_CONFIGS, (4096, 4000, EPI_RESIDUAL), (64, 1, 4, 0, 8))
    assert launch(kernels) is not None
    assert launch(kernels, **change) is None, why


@pytest.mark.parametrize("config", [(64, 1, 8, 0, 8), (64, 3, 4, 0, 8), (192, 1, 4, 0, 8)],
                         ids=["block-smaller-than-8-warps", "3-units-per-step", "3-row-blocks-per-warp"])
def test_configs_the_layouts_cannot_express_are_declined(kernels, monkeypatch, config):
    n = 3072  # a multiple of every block here, so only the layout rule can decline
    monkeypatch.setitem(kernels.GLUON_CONFIGS, (n, 13696, EPI_RESIDUAL), (64, 1, 4, 0, 8))
    assert launch(kernels, n=n) is not None
    monkeypatch.setitem(kernels.GLUON_CONFIGS, (n, 13696, EPI_RESIDUAL), config)
    assert launch(kernels, n=n) is None


def test_switch_and_cpu_turn_it_off(monkeypatch):
    from chatglm import int4_kernels_chatglm as kernels

    assert not kernels.available(torch.device("cpu"))
    monkeypatch.setenv(kernels.GLUON_ENV, "0")
    assert not kernels.available(CUDA)


def test_tuning_file_merges_into_the_table(kernels, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "GLUON_CONFIGS", dict(kernels.GLUON_CONFIGS))
    path = tmp_path / "gluon.json"
    path.write_text('{"4096,13696,1": [128, 2, 8, 2, 4]}')
    kernels.load_configs(str(path))
    assert kernels.GLUON_CONFIGS[(4096, 13696, 1)] == (128, 2, 8, 2, 4)
    got = launch(kernels)
    assert (got.block_n, got.units, got.warps, got.prefetch, got.splits) == (128, 2, 8, 2, 4)
