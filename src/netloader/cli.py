"""The ``netloader`` command line: serve a checkpoint, pull from a server, inspect a server.

Exit status: 0 on success, 1 when the operation failed (one line on stderr names the cause),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from netloader import auth, settings, transport
from netloader.checkpoint import SafetensorsOutput, load_checkpoint
from netloader.client import PullResult, info, pull, status
from netloader.errors import AllSourcesFailed, ConfigError, NetloaderError, PullError
from netloader.identity import Identity
from netloader.manifest import Manifest
from netloader.options import TOKEN_FILE, PullHooks, PullOptions, ServeOptions
from netloader.rules import size
from netloader.server import Server

log = logging.getLogger("netloader.cli")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = (
        logging.DEBUG
        if args.verbose
        else (logging.INFO if args.command == "serve" else logging.ERROR)
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"netloader {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except NetloaderError as exc:
        print(f"netloader {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"netloader {args.command}: failed: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netloader", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_serve_parser, _pull_parser, _info_parser, _bench_parser):
        add(sub)
    return parser


def _serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a safetensors checkpoint, or a replica pulled from sources, as rank 0 "
        "until SIGINT/SIGTERM",
    )
    serve.add_argument("path", nargs="?", help="a .safetensors file or a folder of them")
    serve.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="SOURCE",
        help="no checkpoint: pull the model from SOURCE (repeat for several) while relaying "
        "what has arrived, then keep serving it",
    )
    serve.add_argument(
        "--model",
        default=None,
        help="model name clients must ask for (default: the folder name, or the source's)",
    )
    settings.add_flags(serve, ServeOptions())
    settings.add_flags(serve, PullOptions(), only=_REPLICA_FLAGS, prefix="with --from: ")
    _token_arg(serve)
    serve.set_defaults(run=_serve)


#: The client's settings ``serve --from`` takes for its pull, besides --idle-timeout, which it
#: shares with its server. Its pull keeps the client's handshake timeout (60 s), however
#: --handshake-timeout (the server's) is set.
_REPLICA_FLAGS = ("max_sources", "placement")


def _pull_parser(sub: Any) -> None:
    pull_ = sub.add_parser(
        "pull", help="pull every tensor from one server, or from several at once"
    )
    pull_.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="HOST:PORT; with several, the first that accepts defines the content and up to "
        "--max-sources deliver chunks at once",
    )
    pull_.add_argument(
        "--out", default=None, help="write DIR/model.safetensors (default: only measure)"
    )
    pull_.add_argument("--model", default=None, help="refuse a server that serves another model")
    # `netloader pull` does not relay, so no source places it: no --no-placement.
    settings.add_flags(pull_, PullOptions(), skip=("placement",))
    _token_arg(pull_)
    pull_.set_defaults(run=_pull)


def _info_parser(sub: Any) -> None:
    info_ = sub.add_parser("info", help="print what a server serves, as JSON; no weights move")
    info_.add_argument("source", help="HOST:PORT")
    settings.add_flags(info_, PullOptions(), only=("timeouts.connect",))
    _token_arg(info_)
    info_.set_defaults(run=_info)
    status_ = sub.add_parser(
        "status", help="print what a live server is doing, as one JSON object; no weights move"
    )
    status_.add_argument("source", help="HOST:PORT")
    settings.add_flags(status_, PullOptions(), only=("timeouts.connect",))
    _token_arg(status_)
    status_.set_defaults(run=_status)


def _bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="compare netloader with raw sockets, gloo and disk loads")
    bench.add_argument(
        "--size", type=parse_size, default=1 << 30, help="payload, e.g. 1GiB, 256MiB (default 1GiB)"
    )
    bench.add_argument(
        "--streams", type=int, default=None, help="TCP streams (default: per core, 2..8)"
    )
    bench.add_argument(
        "--repeats", type=int, default=5, help="runs per method; the median is reported"
    )
    bench.add_argument("--workdir", default=None, help="where to write the temporary checkpoint")
    bench.add_argument("--json", default=None, help="also write the results as JSON")
    bench.add_argument("--plot", default=None, help="also draw a PNG bar chart (needs matplotlib)")
    bench.set_defaults(run=_bench)


_AT_LEAST_1MIB = size(1 << 20)


def parse_size(text: str) -> int:
    """A byte count like ``1GiB``, ``256MiB`` or ``1.5GB`` (at least 1 MiB), for argparse."""
    try:
        return _AT_LEAST_1MIB.check("size", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token_arg(parser: argparse.ArgumentParser) -> None:
    settings.add_flag(parser, "token_file", TOKEN_FILE, None, keep=None)


def _serve(args: argparse.Namespace) -> int:
    if (args.path is None) == (not args.sources):
        raise ConfigError("give either a checkpoint PATH to serve or --from SOURCE, not both")
    options = _serve_options(args)
    stop = _Stop()
    if args.path is not None:
        path = Path(args.path)
        model = args.model or (
            path.resolve().parent.name if path.is_file() else path.resolve().name
        )
        server = Server(load_checkpoint(path), Identity(model), options).start()
        _freeze_heap()
        print(f"listening on {server.address}", flush=True)
    else:
        server = _replica(args, options, stop)
    try:
        stop.requested.wait()
    finally:
        server.close()
    log.info("stopped after serving %d transfer(s)", server.served)
    return 0


def _replica(args: argparse.Namespace, options: ServeOptions, stop: _Stop) -> Server:
    """``serve --from``: listen at once, pull from the sources while relaying what arrives,
    print the pull's line, then serve. A failed pull closes the server and fails the command."""
    pull_options = _replica_pull_options(args, options.token)
    server = Server(None, _identity(args, pull_options), options).start()
    print(f"listening on {server.address}", flush=True)
    stop.pulling = True
    try:
        result = pull(args.sources, server.identity, options=pull_options, relay=server)
    except KeyboardInterrupt:
        server.close()
        raise NetloaderError("stopped (SIGINT/SIGTERM) before the pull finished") from None
    except BaseException:
        server.close()
        raise
    finally:
        stop.pulling = False
    _freeze_heap()
    print(_pulled_line(result, " (verified, serving)"), flush=True)
    return server


def _freeze_heap() -> None:
    """Leave what start-up made (torch's modules, the checkpoint's objects) out of every later
    garbage collection, as vLLM does in its own processes: in a ``serve`` process with torch
    loaded a full collection took about 120 ms and stalled every stream of a running transfer
    (measured on the 2-core development machine: 4 such servers at 200 Mbit/s each, one full
    collection each during a 256 MiB pull, which took 5% longer)."""
    gc.collect()
    gc.freeze()


class _Stop:
    """SIGINT/SIGTERM set ``requested``; while ``pulling``, they also end the pull."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.pulling = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested.set()
        if self.pulling:
            raise KeyboardInterrupt


def _serve_options(args: argparse.Namespace) -> ServeOptions:
    return settings.from_flags(args, ServeOptions(token=auth.load_token(args.token_file)))


def _replica_pull_options(args: argparse.Namespace, token: bytes | None) -> PullOptions:
    """``serve --from``'s pull: a client's options with the serve flags that apply to it
    (see ``_REPLICA_FLAGS``); --handshake-timeout is its server's, not its pull's."""
    return settings.from_flags(args, PullOptions(token=token), skip=("timeouts.handshake",))


def _pull_options(args: argparse.Namespace) -> PullOptions:
    return settings.from_flags(args, PullOptions(token=auth.load_token(args.token_file)))


def _info(args: argparse.Namespace) -> int:
    options = _pull_options(args)
    reply = info(args.source, token=options.token, connect_timeout=options.timeouts.connect)
    ident = reply.identity
    print(
        json.dumps(
            {
                "source": args.source,
                "model": ident.model,
                "layout": {
                    "world_size": ident.world_size,
                    "tensor_parallel_size": ident.tensor_parallel_size,
                    "pipeline_parallel_size": ident.pipeline_parallel_size,
                    "rank": ident.rank,
                },
                "protocol": reply.protocol,
                "tensors": reply.tensors,
                "total_bytes": reply.total_bytes,
                "transports_here": transport.availability(),
            }
        )
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    options = _pull_options(args)
    found = status(args.source, token=options.token, connect_timeout=options.timeouts.connect)
    print(json.dumps({"source": args.source, **found}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from netloader import bench

    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib (pip install 'netloader[bench]')") from None
    report = bench.run(
        args.size,
        streams=args.streams,
        repeats=args.repeats,
        workdir=args.workdir,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(report.table())
    if args.json:
        bench.write_json(report, args.json)
    if args.plot:
        bench.plot(report, args.plot)
    return 0


def _pull(args: argparse.Namespace) -> int:
    options = _pull_options(args)
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} exists and is not a directory")
    result = _pull_to(out_dir, args.sources, _identity(args, options), options)
    where = f", wrote {out_dir / 'model.safetensors'}" if out_dir else " (verified, discarded)"
    print(_pulled_line(result, where), flush=True)
    return 0


def _pulled_line(result: PullResult, where: str) -> str:
    """The last line of a pull, which scripts read: bytes, seconds, speed, from whom."""
    again = f", {result.refetched} bytes fetched again" if result.refetched else ""
    return (
        f"pulled {result.total_bytes} bytes in {result.seconds:.3f} s ({result.gbps:.2f} GB/s) "
        f"from {result.describe_sources()} over {result.transport} x{result.streams}{where}"
        f"{again}"
    )


def _identity(args: argparse.Namespace, options: PullOptions) -> Identity:
    """What to ask for: the first answering source's model and layout (``--model`` wins)."""
    errors: list[PullError] = []
    for source in args.sources:  # pull's SOURCE arguments, or serve's --from
        try:
            served = info(
                source, token=options.token, connect_timeout=options.timeouts.connect
            ).identity
        except PullError as exc:
            errors.append(exc)
            continue
        return dataclasses.replace(served, model=args.model or served.model)
    raise errors[0] if len(errors) == 1 else AllSourcesFailed(errors)


def _pull_to(
    out_dir: Path | None, sources: list[str], identity: Identity, options: PullOptions
) -> PullResult:
    """Pull into memory, or straight into ``out_dir/model.safetensors``: that file only gets
    its name once complete and verified, and a folder this command made is removed again if
    the pull fails."""
    bar = tqdm(
        unit="B", unit_scale=True, unit_divisor=1024, disable=not sys.stderr.isatty(), desc="pull"
    )
    created = out_dir is not None and not out_dir.exists()
    outputs: list[SafetensorsOutput] = []

    def into_file(manifest: Manifest) -> dict[str, torch.Tensor]:
        assert out_dir is not None
        outputs.append(SafetensorsOutput(out_dir / "model.safetensors", manifest))
        return outputs[-1].tensors

    hooks = PullHooks(
        progress=bar.update,
        on_accept=lambda a: setattr(bar, "total", a.manifest.total_bytes),
        allocate=into_file if out_dir is not None else None,
    )
    try:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        result = pull(sources, identity, options=options, hooks=hooks)
        if outputs:
            outputs[-1].commit()
        return result
    except BaseException:
        for output in outputs:
            output.abort()
        if created and out_dir is not None and out_dir.is_dir() and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir)
        raise
    finally:
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
