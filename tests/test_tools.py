"""The benchmark's helpers that run without a GPU."""
from gpu_telemetry import GpuTelemetry  # tools/ (on sys.path through conftest)


def test_gpu_telemetry_summarizes_nvidia_smi_samples():
    telemetry = GpuTelemetry(device=None)
    telemetry.lines = ["1455, 690.5, 0x0000000000000004",  # software power cap active
                       "1980, 310.0, 0x0000000000000000",
                       "1500, 689.5, 0x0000000000000005",  # power cap plus idle bit
                       "[N/A], [N/A], [N/A]",              # unsupported fields: skipped, not a crash
                       ""]
    summary = telemetry.summary()
    assert summary == {"sm_mhz_mean": 1645, "sm_mhz_min": 1455, "power_w_mean": 563.3, "power_capped": 0.67,
                       "samples": 3}


def test_gpu_telemetry_without_samples_is_empty(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with GpuTelemetry(device=None) as telemetry:  # no device: starts nothing
        pass
    assert telemetry.process is None
    assert telemetry.summary() == {}
