"""Core demo: serve a generated checkpoint with `netloader serve`, pull it with `netloader pull`,
check every byte, and say how fast it went. Runs from `make demo-core`."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from netloader.synthetic import llm_like

WORK = Path("demo-out/core")
SIZE = 384 << 20


def main() -> int:
    bin_dir = Path(sys.executable).parent
    netloader = str(bin_dir / "netloader")
    shutil.rmtree(WORK, ignore_errors=True)
    model_dir = WORK / "demo-llm"
    model_dir.mkdir(parents=True)
    tensors = llm_like(SIZE, seed=0)
    save_file(tensors, model_dir / "model.safetensors")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    total = sum(t.nbytes for t in tensors.values())
    print(
        f"generated {model_dir}: {len(tensors)} tensors, {total / 1e6:.1f} MB, dtypes {', '.join(dtypes)}"
    )

    server = subprocess.Popen(
        [netloader, "serve", str(model_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = server.stdout.readline() if server.stdout else ""
        match = re.fullmatch(r"listening on (\S+)\n", line)
        if not match:
            print(f"server did not start: {line!r}")
            return 1
        address = match.group(1)
        print(f"$ netloader serve {model_dir}  ->  listening on {address}")
        info = subprocess.run(
            [netloader, "info", address], capture_output=True, text=True, check=True
        )
        print(f"$ netloader info {address}\n{info.stdout.strip()}")
        start = time.perf_counter()
        pulled = subprocess.run(
            [netloader, "pull", address, "--out", str(WORK / "pulled")],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        print(f"$ netloader pull {address} --out {WORK / 'pulled'}\n{pulled.stdout.strip()}")
        if pulled.returncode != 0:
            print(pulled.stderr)
            return 1
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)

    got = load_file(WORK / "pulled" / "model.safetensors")
    same = set(got) == set(tensors) and all(
        got[n].dtype == t.dtype
        and got[n].shape == t.shape
        and torch.equal(got[n].view(torch.uint8), t.view(torch.uint8))
        for n, t in tensors.items()
    )
    print(f"bit-exact: {'yes' if same else 'NO'} ({len(got)} tensors compared byte for byte)")
    print(f"pull command wall time, including Python start-up and writing the file: {wall:.2f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
