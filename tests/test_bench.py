"""Smoke tests of the benchmarks (tiny payloads), so they do not rot. No timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netbed_fixtures import require_netbed

ROOT = Path(__file__).parent.parent
NETLOADER = str(Path(sys.executable).with_name("netloader"))


def test_netloader_bench_small(tmp_path):
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [NETLOADER, "bench", "--size", "8MiB", "--repeats", "1", "--json", out, "--plot", chart],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[:2] == ["netloader", "netloader, no digests"]
    assert {"gloo per tensor", "safetensors, warm cache"} <= set(names)
    for row in report["rows"]:
        if row["seconds"]:  # the cold row may be skipped where caches cannot be dropped
            assert row["gbps"] > 0 and row["peak_mib"]
    assert report["rows"][0]["netloader_ratio"] == 1.0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "netloader is" in proc.stdout and "machine:" in proc.stdout


def run_script(name: str, *args: object, timeout: float) -> None:
    """Run ``benchmarks/NAME`` with ``args``; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_pull_to_disk_bench_small(tmp_path):
    out = tmp_path / "pull.json"
    run_script("pull_to_disk.py", "--size", "8MiB", "--rounds", "1", "--json", out, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"pull --out", "pull, then save_file"}
    assert all(r["bit_exact"] and r["median_s"] > 0 for r in rows.values())


def test_bench_rejects_bad_sizes():
    proc = subprocess.run([NETLOADER, "bench", "--size", "lots"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert (
        "size = 'lots' is not a size; give a number of bytes or a string like 4MiB" in proc.stderr
    )


@pytest.mark.skipif(
    os.environ.get("NETLOADER_REQUIRE_VLLM") != "1" and importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (make test installs it); CI requires it",
)
def test_vllm_weights_bench_smoke(tmp_path):
    out = tmp_path / "vllm.json"
    run_script("vllm_weights.py", "--smoke", "--rounds", "1", "--json", out, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    assert {"peer", "storage, warm cache"} <= set(rows)
    assert all(r["median_s"] > 0 for r in rows.values())


def test_striping_bench_small(tmp_path):
    """benchmarks/striping.py on network namespaces, tiny: every row runs, the killed row is
    bit-exact."""
    require_netbed()
    out = tmp_path / "striping.json"
    run_script("striping.py", "--size", "8MiB", "--repeats", "1", "--json", out, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(r["median_s"] > 0 for r in rows)
    assert all(run["bit_exact"] for run in rows[-1]["runs"])


def test_fanout_bench_small(tmp_path):
    """benchmarks/fanout.py on network namespaces, tiny: both modes and the killed relay run."""
    require_netbed()
    out = tmp_path / "fanout.json"
    args = ["--size", "8MiB", "--rate", "50mbit", "--clients", "1,2", "--json", out]
    run_script("fanout.py", *args, timeout=600)
    runs = json.loads(out.read_text())["runs"]
    assert [(r["mode"], r["clients"]) for r in runs] == [
        ("seed only", 1),
        ("seed only", 2),
        ("fan-out", 1),
        ("fan-out", 2),
        ("fan-out, 1 MiB chunks", 1),
        ("fan-out, 1 MiB chunks", 2),
        ("fan-out", 4),
    ]
    assert runs[3]["seed_uplink_models"] < 1.5  # two clients, the seed sent the model ~once
