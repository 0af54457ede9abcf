"""The weights phase of a vLLM CPU instance: from a peer vs vLLM's default loader (cold and warm
page cache), side by side in one run, on a generated Llama of about 1.1 GB.

    .venv/bin/python benchmarks/vllm_weights.py [--rounds 3] [--json FILE] [--omp-bind auto]

Each measurement is a fresh vLLM instance (offline API, TP1, float32) whose worker logs
netloader's "weights phase" line: for the peer path the whole pull (connect, handshake, every
byte into the parameters); for storage vLLM's DefaultModelLoader.load_weights (read the
safetensors file, copy into the parameters). The rounds are interleaved so that drift on a
noisy machine hits every method alike. Cold means `echo 1 > /proc/sys/vm/drop_caches` right
before the instance starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from netloader.bench import drop_page_cache, machine_description

# The test scaffolding is not installed: take netloader_testing/ from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.harness import OfflineInstance
from netloader_testing.models import tiny_llama

# About 284 M parameters: 1.13 GB in float32. Head dim 64 (the CPU attention kernels need it).
MODEL = {"hidden": 1536, "layers": 10, "intermediate": 4096, "heads": 24, "vocab": 512}
SMOKE = {"hidden": 256, "layers": 2, "intermediate": 512, "heads": 4, "vocab": 512}


def weights_phase(inst: OfflineInstance) -> tuple[str, float, float]:
    inst.outputs()  # waits until the instance is up (no prompts: nothing is generated)
    inst.stop()
    phases = inst.weights_phases()
    if len(phases) != 1:
        raise RuntimeError(f"expected one weights phase line:\n{inst.log()[-4000:]}")
    p = phases[0]
    return p.path, p.seconds, p.gigabytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--omp-bind",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND for every instance (default: vLLM's own, 'auto')",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script runs")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else MODEL
    if args.omp_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="netloader-vllm-bench-") as tmp:
        work = Path(tmp)
        print(f"generating a Llama {shape} ...", flush=True)
        model = tiny_llama(work / "llama", **shape)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"  {size / 1e9:.2f} GB of safetensors", flush=True)

        prefix = work / "seed_"
        seed = OfflineInstance(
            model, work / "seed.log", prompts=[], extra={"OUTPUT_PREFIX": str(prefix)}, hold=True
        )
        try:
            seed.outputs()
            address = (work / "seed_0.txt").read_text().strip()
            print(f"seed serving on {address}", flush=True)
            cold_note = drop_page_cache()
            results: dict[str, list[float]] = {
                "peer": [],
                "storage, cold cache": [],
                "storage, warm cache": [],
            }
            gigabytes = 0.0
            for r in range(args.rounds):
                runs = {
                    "peer": {"SOURCE": [{"device_id": 0, "sources": [address]}]},
                    "storage, cold cache": {} if cold_note is None else None,
                    "storage, warm cache": {},
                }
                for name, extra in runs.items():
                    if extra is None:
                        continue
                    if name.endswith("cold cache"):
                        drop_page_cache()
                    log = work / f"{name.split(',')[0]}-{r}.log"
                    path, seconds, gigabytes = weights_phase(
                        OfflineInstance(model, log, prompts=[], extra=extra)
                    )
                    expected = "peer" if name == "peer" else "storage"
                    if not path.startswith(expected):
                        raise RuntimeError(f"{name}: took the {path} path")
                    results[name].append(seconds)
                    print(f"  round {r + 1}/{args.rounds} {name}: {seconds:.2f} s", flush=True)
        finally:
            seed.stop()

    peer = statistics.median(results["peer"])
    print(
        f"\nvLLM CPU weights phase, {gigabytes:.2f} GB, median of {args.rounds}; "
        f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto (default)')}"
    )
    print(f"machine: {machine_description()}")
    print(f"{'method':24} {'seconds':>8} {'GB/s':>7} {'peer is':>9}")
    table = {}
    for name, values in results.items():
        if not values:
            print(f"{name:24} {'-':>8} {'-':>7} {'-':>9}  {cold_note}")
            continue
        median = statistics.median(values)
        table[name] = {"seconds": values, "median_s": median, "gbps": gigabytes / median}
        print(f"{name:24} {median:8.2f} {gigabytes / median:7.2f} {median / peer:8.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine_description(),
                    "gigabytes": gigabytes,
                    "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                    "rows": table,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
