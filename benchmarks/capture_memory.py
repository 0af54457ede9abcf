"""Memory of each CAPTURE mode against vLLM's plain loader, side by side in one run (CPU build).

    .venv/bin/python benchmarks/capture_memory.py [--json FILE] [--smoke]

Each row is a fresh vLLM instance (offline API, TP1) of one generated Llama (about 300 MB of
float32 weights) that loads from storage and answers a prompt: vLLM's default loader
(``--load-format auto``), then netloader with ``CAPTURE=reference`` (the CPU default), ``host``
and ``device`` (on the CPU backend the "device" is host memory too). Once the instance has
answered (and a netloader seed serves), the resident memory (``VmRSS``) of every process of the
instance is read from ``/proc`` and summed; the figure that matters is the difference to the
plain loader. One run, no repetition: memory does not drift like time does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from netloader.bench import machine_description

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.harness import OfflineInstance
from netloader_testing.models import tiny_llama

MODEL = {"hidden": 1024, "layers": 6, "intermediate": 2816, "heads": 16, "vocab": 512}
SMOKE = {"hidden": 256, "layers": 2, "intermediate": 512, "heads": 4, "vocab": 512}
ROWS = {
    "plain": ("auto", None),
    "reference": ("netloader", "reference"),
    "host": ("netloader", "host"),
    "device": ("netloader", "device"),
}


def rss_of_group(pgid: int) -> dict[int, int]:
    """VmRSS in bytes of every live process in process group ``pgid``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out[int(entry.name)] = int(line.split()[1]) * 1024
    return out


def measure(model: Path, logs: Path, row: str) -> dict:
    load_format, mode = ROWS[row]
    extra = None if mode is None else {"CAPTURE": mode}
    inst = OfflineInstance(
        model,
        logs / f"{row}.log",
        prompts=["hello"],
        load_format=load_format,
        extra=extra,
        hold=True,
        max_tokens=2,
    )
    try:
        inst.outputs()
        rss = rss_of_group(inst.proc.pid)
        phases = inst.weights_phases()
    finally:
        inst.stop()
    return {
        "rss_total": sum(rss.values()),
        "rss_largest": max(rss.values()),
        "processes": len(rss),
        "weights_gb": phases[0].gigabytes if phases else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a 6 MB model, to try the script")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(Path(tmp) / "model", **(SMOKE if args.smoke else MODEL))
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        rows = {row: measure(model, Path(tmp), row) for row in ROWS}
    plain = rows["plain"]["rss_total"]
    report = {"machine": machine_description(), "weights_bytes": weights, "rows": rows}
    print(f"weights file: {weights / 2**20:.1f} MiB; {report['machine']}")
    print(f"{'row':10} {'RSS MiB':>9} {'vs plain MiB':>13} {'x weights':>10}")
    for row, got in rows.items():
        extra = got["rss_total"] - plain
        print(
            f"{row:10} {got['rss_total'] / 2**20:9.1f} {extra / 2**20:13.1f} {extra / weights:10.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
