"""The command line, as scripts use it: serve + info + pull in separate processes."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Proxy, Serve, ServerProcess, all_cases, assert_same, kill_after
from safetensors.torch import load_file, save_file

from netloader.protocol import PROTOCOL_VERSION
from netloader.synthetic import llm_like

NETLOADER = str(Path(sys.executable).with_name("netloader"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llm"
    folder.mkdir()
    tensors = llm_like(24 << 20, seed=1)
    names = list(tensors)
    # Two shards, like a Hugging Face folder.
    save_file(
        {n: tensors[n] for n in names[: len(names) // 2]},
        folder / "model-00001-of-00002.safetensors",
    )
    save_file(
        {n: tensors[n] for n in names[len(names) // 2 :]},
        folder / "model-00002-of-00002.safetensors",
    )
    return folder, tensors


@pytest.fixture(scope="module")
def served(checkpoint):
    srv = Serve(checkpoint[0])
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def run(*args, check=True):
    proc = subprocess.run([NETLOADER, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_info(served, checkpoint):
    out = json.loads(run("info", served.address).stdout)
    tensors = checkpoint[1]
    assert out["model"] == "tiny-llm"  # the folder name
    assert out["layout"] == {
        "world_size": 1,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "rank": 0,
    }
    assert out["protocol"] == PROTOCOL_VERSION
    assert out["tensors"] == len(tensors)
    assert out["total_bytes"] == sum(t.nbytes for t in tensors.values())


def test_pull_to_file_is_bit_exact(served, checkpoint, tmp_path):
    out = tmp_path / "pulled"
    proc = run("pull", served.address, "--out", out, "--model", "tiny-llm")
    total = sum(t.nbytes for t in checkpoint[1].values())
    assert re.search(rf"pulled {total} bytes in [\d.]+ s \([\d.]+ GB/s\)", proc.stdout)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert_same(checkpoint[1], load_file(out / "model.safetensors"))


def test_pull_to_file_holds_every_dtype_and_shape_case(tmp_path):
    """0-dim, empty, non-contiguous and tied tensors of every dtype, written by `pull --out`."""
    with ServerProcess(chunk_size=64 << 10) as srv:
        run("pull", srv.address, "--out", tmp_path)
    assert_same(all_cases(), load_file(tmp_path / "model.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_pull_to_memory(served, checkpoint):
    proc = run("pull", served.address, check=False)
    assert proc.returncode == 0, proc.stderr
    total = sum(t.nbytes for t in checkpoint[1].values())
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"pulled {total} bytes in [\d.]+ s \([\d.]+ GB/s\) from {re.escape(served.address)} "
        r"over tcp x[1-8] \(verified, discarded\)",
        last,
    ), last


def test_wrong_model_fails_and_leaves_nothing(served, tmp_path):
    out = tmp_path / "nothing"
    proc = run("pull", served.address, "--out", out, "--model", "other", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert "model differs" in proc.stderr and "'other'" in proc.stderr
    assert not out.exists()


def test_existing_out_dir_keeps_only_its_own_files(served, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = run("pull", served.address, "--out", out, "--model", "other", check=False)
    assert proc.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unreachable_source_fails_with_one_line(tmp_path):
    proc = run("pull", "127.0.0.1:9", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "127.0.0.1:9" in proc.stderr and "cannot connect" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bad_arguments_exit_2(tmp_path):
    assert run("pull", "nonsense", check=False).returncode == 2
    assert run("serve", tmp_path / "missing", check=False).returncode == 2
    assert run("serve", tmp_path, "--listen-port", "80", check=False).returncode == 2


def test_server_killed_mid_transfer_leaves_no_file(tmp_path):
    """The server dies (SIGKILL) after 1 MB of 20 MB went out: the pull fails, no file is left."""
    folder = tmp_path / "big"
    folder.mkdir()
    save_file({"w": torch.ones(20 << 20, dtype=torch.uint8)}, folder / "model.safetensors")
    srv = Serve(folder)

    proxy = Proxy(srv.address, kill_after(1 << 20, lambda: os.kill(srv.proc.pid, signal.SIGKILL)))
    out = tmp_path / "out"
    proc = run("pull", proxy.address, "--out", out, "--idle-timeout", "5", check=False)
    proxy.close()
    srv.proc.wait(10)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "lost" in proc.stderr or "closed" in proc.stderr, proc.stderr
    assert not out.exists()


def test_serve_exits_zero_on_sigterm(checkpoint):
    srv = Serve(checkpoint[0])
    code, err = srv.stop()
    assert code == 0, err
