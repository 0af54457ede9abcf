"""The ``netloader`` command line: serve a checkpoint, pull from a server, inspect a server.

Exit status: 0 on success, 1 when the operation failed (one line on stderr names the cause),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from netloader import auth
from netloader.checkpoint import SafetensorsOutput, load_checkpoint
from netloader.client import PullResult, info, pull
from netloader.errors import AllSourcesFailed, ConfigError, NetloaderError, PullError
from netloader.identity import Identity
from netloader.manifest import Manifest
from netloader.options import (
    CLIENT_HANDSHAKE_TIMEOUT,
    DEFAULT_CHUNK,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_SOURCES,
    SERVER_HANDSHAKE_TIMEOUT,
    Limits,
    PullHooks,
    PullOptions,
    ServeOptions,
    Timeouts,
    parse_rate,
)
from netloader.plan import MAX_CHUNK, MIN_CHUNK
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
    _replica_args(serve)
    serve.add_argument("--listen-port", type=int, default=None, help="port (default: a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument(
        "--model",
        default=None,
        help="model name clients must ask for (default: the folder name, or the source's)",
    )
    serve.add_argument(
        "--output-prefix", default=None, help="write the address to PREFIX0.txt once listening"
    )
    serve.add_argument(
        "--max-clients", type=int, default=Limits.max_clients, help="concurrent transfers"
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=Limits.max_waiting,
        help="clients that may queue for a slot; more are refused as busy",
    )
    serve.add_argument(
        "--max-upload-rate",
        type=_rate,
        default=None,
        metavar="RATE",
        help="send at most this much per second to all clients together, e.g. 100MB/s or "
        "800Mbit/s (default: no cap)",
    )
    serve.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=DEFAULT_CHUNK,
        metavar="SIZE",
        help="with PATH: the unit of scheduling and checking (default 4MiB); smaller chunks "
        "shorten each relay hop of a fan-out on slow links, larger ones cost less per byte",
    )
    serve.add_argument(
        "--verify-before-send",
        action="store_true",
        help="hash every chunk again just before sending it (refuse tensors changed since load)",
    )
    _timeout_args(serve, SERVER_HANDSHAKE_TIMEOUT, connect=False)
    _token_arg(serve)
    serve.set_defaults(run=_serve)


def _replica_args(serve: argparse.ArgumentParser) -> None:
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
        "--no-discovery",
        action="store_true",
        help="with --from: use only the given sources, never peers they name",
    )
    serve.add_argument(
        "--max-sources",
        type=int,
        default=DEFAULT_MAX_SOURCES,
        help=f"with --from: sources delivering at once (default {DEFAULT_MAX_SOURCES})",
    )


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
    pull_.add_argument(
        "--streams",
        type=int,
        default=None,
        help="parallel TCP streams per source (default: per core, 2..8)",
    )
    pull_.add_argument(
        "--max-sources",
        type=int,
        default=DEFAULT_MAX_SOURCES,
        help=f"sources delivering at once; the rest stand by (default {DEFAULT_MAX_SOURCES})",
    )
    _timeout_args(pull_, CLIENT_HANDSHAKE_TIMEOUT, connect=True)
    _token_arg(pull_)
    pull_.set_defaults(run=_pull)


def _info_parser(sub: Any) -> None:
    info_ = sub.add_parser("info", help="print what a server serves, as JSON; no weights move")
    info_.add_argument("source", help="HOST:PORT")
    info_.add_argument(
        "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, help="seconds"
    )
    _token_arg(info_)
    info_.set_defaults(run=_info)


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


def _timeout_args(parser: argparse.ArgumentParser, handshake: float, *, connect: bool) -> None:
    if connect:
        parser.add_argument(
            "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, help="seconds"
        )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=handshake,
        help="seconds for a whole handshake, queueing included",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, help="seconds without progress"
    )


def parse_size(text: str) -> int:
    """A byte count like ``1GiB``, ``256MiB`` or ``1.5GB`` (at least 1 MiB), for argparse."""
    value = _bytes(text)
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is too small; use at least 1MiB")
    return value


def _chunk_size(text: str) -> int:
    value = _bytes(text)
    if not MIN_CHUNK <= value <= MAX_CHUNK:
        raise argparse.ArgumentTypeError(
            f"--chunk-size {text!r} is outside {MIN_CHUNK >> 10}KiB..{MAX_CHUNK >> 20}MiB"
        )
    return value


def _bytes(text: str) -> int:
    units = {"gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10, "gb": 10**9, "mb": 10**6, "b": 1}
    lowered = text.strip().lower()
    unit = next((u for u in units if lowered.endswith(u)), None)
    number, factor = (lowered.removesuffix(unit), units[unit]) if unit else (lowered, 1)
    try:
        return int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1GiB or 256MiB") from None


def _rate(text: str) -> float:
    try:
        return parse_rate(text, "--max-upload-rate")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        default=None,
        help=f"shared secret for authentication (or set {auth.TOKEN_ENV})",
    )


def _serve(args: argparse.Namespace) -> int:
    if args.listen_port is not None and not 1024 <= args.listen_port <= 65535:
        raise ConfigError(f"--listen-port {args.listen_port} is outside 1024..65535")
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
    pull_options = PullOptions(
        token=options.token,
        timeouts=Timeouts(idle=args.idle_timeout),
        max_sources=args.max_sources,
        discovery=not args.no_discovery,
    )
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
    print(_pulled_line(result, " (verified, serving)"), flush=True)
    return server


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
    return ServeOptions(
        host=args.host,
        listen_port=args.listen_port,
        output_prefix=args.output_prefix,
        token=auth.load_token(args.token_file),
        limits=Limits(max_clients=args.max_clients, max_waiting=args.max_waiting),
        timeouts=Timeouts(handshake=args.handshake_timeout, idle=args.idle_timeout),
        verify_before_send=args.verify_before_send,
        max_upload_rate=args.max_upload_rate,
        chunk_size=args.chunk_size,
    )


def _info(args: argparse.Namespace) -> int:
    reply = info(
        args.source, token=auth.load_token(args.token_file), connect_timeout=args.connect_timeout
    )
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
            }
        )
    )
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
    options = PullOptions(
        token=auth.load_token(args.token_file),
        streams=args.streams,
        timeouts=Timeouts(
            connect=args.connect_timeout, handshake=args.handshake_timeout, idle=args.idle_timeout
        ),
        max_sources=args.max_sources,
    )
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
