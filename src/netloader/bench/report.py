"""What `netloader bench` reports: one row per method, as a table, JSON or a bar chart."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    note: str = ""
    nbytes: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def gbps(self) -> float:
        return self.nbytes / 1e9 / self.median_s if self.seconds else float("nan")


@dataclass
class Report:
    machine: str
    payload_bytes: int
    tensors: int
    streams: int
    repeats: int
    rows: list[Row]
    date: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict[str, Any]:
        base = self.row("netloader")
        out = asdict(self)
        for r, d in zip(self.rows, out["rows"], strict=True):
            d.update(median_s=r.median_s, gbps=r.gbps, netloader_ratio=_ratio(base, r))
        return out

    def table(self) -> str:
        base = self.row("netloader")
        lines = [
            f"payload {self.payload_bytes / 2**30:.2f} GiB in {self.tensors} tensors, "
            f"{self.streams} TCP streams, median of {self.repeats}; machine: {self.machine}",
            f"{'method':30} {'seconds':>8} {'GB/s':>7} {'netloader is':>13} {'peak MiB':>9}  note",
        ]
        for r in self.rows:
            ratio = _ratio(base, r)
            peak = f"{max(r.peak_mib):9.0f}" if r.peak_mib else f"{'-':>9}"
            if r.seconds:
                lines.append(
                    f"{r.name:30} {r.median_s:8.3f} {r.gbps:7.2f} {ratio:12.2f}x {peak}  {r.note}"
                )
            else:
                lines.append(f"{r.name:30} {'-':>8} {'-':>7} {'-':>13} {peak}  {r.note}")
        return "\n".join(lines)


def _ratio(base: Row, other: Row) -> float:
    """How many times faster netloader is than ``other`` (1.0 for itself)."""
    if not base.seconds or not other.seconds:
        return float("nan")
    return other.median_s / base.median_s


def machine_description() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def plot(report: Report, path: str) -> None:
    """A bar chart of GB/s per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.seconds]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    names = [r.name for r in rows][::-1]
    speeds = [r.gbps for r in rows][::-1]
    colors = ["tab:blue" if n.startswith("netloader") else "tab:gray" for n in names]
    bars = ax.barh(names, speeds, color=colors)
    for bar, speed in zip(bars, speeds, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {speed:.2f}", va="center")
    ax.set_xlabel("GB/s (median)")
    ax.set_title(
        f"{report.payload_bytes / 2**30:.2f} GiB, {report.tensors} tensors, receiver in a fresh process\n"
        f"{report.machine}",
        fontsize=9,
    )
    ax.set_xlim(0, max(speeds) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: Report, path: str) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
