"""SM clock and board power while a measurement runs, sampled by `nvidia-smi` in the background.

    with GpuTelemetry() as telemetry:
        run()
    telemetry.summary()   # {"sm_mhz_mean": ..., "power_w_mean": ..., "power_capped": 0.93, "samples": 41}

Why the benchmark wants it: long prefills on an H200 run into the board's power limit (700 W), and the SM clock
then falls well below its maximum; a kernel that does the same work with less energy finishes sooner at the same
power. `power_capped` is the fraction of samples whose active clock-event reasons include the software power cap.
A tool, not part of the model package: it starts a process, which the remote code never does.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Optional

import torch

FIELDS = "clocks.sm,power.draw,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4


class GpuTelemetry:
    def __init__(self, device: Optional[int] = None, interval_ms: int = 200):
        if device is None and torch.cuda.is_available():
            device = torch.cuda.current_device()
        self.device = device
        self.interval_ms = interval_ms
        self.process: Optional[subprocess.Popen] = None
        self.lines: list[str] = []

    def _target(self) -> list[str]:
        if self.device is None:
            return []
        uuid = getattr(torch.cuda.get_device_properties(self.device), "uuid", None)
        return ["-i", f"GPU-{uuid}"] if uuid is not None else []

    def __enter__(self) -> "GpuTelemetry":
        if shutil.which("nvidia-smi") and self.device is not None:
            self.process = subprocess.Popen(
                ["nvidia-smi", *self._target(), f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            out, _ = self.process.communicate(timeout=10)
            self.lines = out.splitlines()

    def summary(self) -> dict:
        """Means over the samples taken ({} when nvidia-smi is missing or gave nothing usable)."""
        clocks, powers, capped = [], [], 0
        for line in self.lines:
            parts = [p.strip() for p in line.split(",")]
            try:
                clock, power, reasons = float(parts[0]), float(parts[1]), int(parts[2], 16)
            except (IndexError, ValueError):
                continue
            clocks.append(clock)
            powers.append(power)
            capped += bool(reasons & SW_POWER_CAP)
        if not clocks:
            return {}
        return {"sm_mhz_mean": round(sum(clocks) / len(clocks)), "sm_mhz_min": round(min(clocks)),
                "power_w_mean": round(sum(powers) / len(powers), 1), "power_capped": round(capped / len(clocks), 2),
                "samples": len(clocks)}
