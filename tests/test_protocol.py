"""Control messages: round trips (property-based), and hostile bytes only ever raise ProtocolError."""

import json
import math
import os
import re
import socket
import string
import struct
import threading
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netloader.artifacts.entry import FileDigest
from netloader.artifacts.wire import ArtifactsOffer, ArtifactsRequest
from netloader.errors import ProtocolError
from netloader.identity import Identity
from netloader.manifest import DTYPES, MAX_TENSORS, Manifest, TensorSpec
from netloader.protocol import (
    HEADER,
    MAGIC,
    MESSAGES,
    Accept,
    Attached,
    Channel,
    Done,
    Hello,
    InfoReply,
    InfoRequest,
    PullRequest,
    Refuse,
    StatusReply,
    StatusRequest,
    StreamAttach,
    decode,
    encode,
)
from netloader.protocol.fanout import Moved, Progress
from netloader.transport.cuda_ipc_wire import IpcOffer, IpcReply, IpcStorage

hexes = lambda n: st.binary(min_size=n, max_size=n).map(bytes.hex)  # noqa: E731
names = st.text(min_size=1, max_size=40)
identities = st.builds(
    lambda model, ws, tp, pp, rank: Identity(
        model, rank % ws, ws, min(tp, ws), max(1, min(pp, ws // min(tp, ws)))
    ),
    names,
    st.integers(1, 64),
    st.integers(1, 64),
    st.integers(1, 8),
    st.integers(0, 63),
)
specs = st.builds(
    TensorSpec,
    names,
    st.sampled_from(list(DTYPES.values())),
    st.lists(st.integers(0, 1 << 10), max_size=4).map(tuple),
)
manifests = st.lists(specs, max_size=20, unique_by=lambda s: s.name).map(Manifest)
texts = st.text(max_size=200)


addresses = st.builds(
    lambda host, port: f"{host}:{port}",
    st.sampled_from(["10.0.0.1", "host.example", "[::1]", "x" * 250]),
    st.integers(1, 65535),
)


@st.composite
def accepts(draw):
    manifest = draw(manifests)
    n = len(manifest)
    aliases = {}
    if n >= 2:
        specs = list(manifest.specs)
        for i in draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True)):
            j = draw(st.integers(0, i - 1))
            if (
                j not in aliases and i not in aliases.values()
            ):  # an alias is the same dtype and shape as a tensor that is not one
                aliases[i] = j
                specs[i] = TensorSpec(specs[i].name, specs[j].dtype, specs[j].shape)
        manifest = Manifest(specs)
    return Accept(
        session=draw(hexes(16)),
        identity=draw(identities),
        manifest=manifest,
        aliases=aliases,
        transport=draw(st.sampled_from(["tcp", "gloo", "nccl"])),
        streams=draw(st.integers(1, 64)),
        chunk_size=draw(st.integers(64 << 10, 256 << 20)),
        digests=draw(st.none() | st.lists(st.integers(0, (1 << 64) - 1), max_size=10)),
        offer=draw(st.dictionaries(st.text(max_size=10), st.integers(), max_size=3)),
        mac=draw(st.none() | hexes(32)),
        peers=draw(st.lists(addresses, max_size=4)),
        delivers=draw(st.booleans()),
        digest=draw(st.sampled_from(["xxh3-64", "wsum64"])),
        data=draw(st.none() | addresses),
    )


ipc_storages = st.builds(
    IpcStorage,
    st.sampled_from([b"", b"\x02c"]).flatmap(
        lambda p: st.binary(min_size=64, max_size=64).map(lambda h: (p + h).hex())
    ),
    st.integers(1, 1 << 48),
    st.integers(0, 1 << 48),
    st.from_regex(r"/[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True),
    st.integers(0, 9999),
    hexes(64),
    st.booleans(),
)


@st.composite
def ipc_offers(draw):
    storages = draw(st.lists(ipc_storages, max_size=4))
    slot = st.none()
    if storages:
        slot = slot | st.tuples(st.integers(0, len(storages) - 1), st.integers(0, (1 << 48) - 1))
    slots = [None if s is None else list(s) for s in draw(st.lists(slot, max_size=6))]
    if draw(st.booleans()):
        return IpcOffer("", [], [], draw(texts.filter(bool)))
    gpu = draw(st.from_regex(r"[A-Za-z0-9-]{1,64}", fullmatch=True))
    return IpcOffer(gpu, storages, slots)


artifact_keys = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True)

by_kind = {
    "hello": st.builds(Hello, st.integers(0, 100), hexes(16), st.booleans()),
    "pull": st.builds(
        PullRequest,
        st.integers(0, 100),
        identities,
        st.none() | manifests,
        st.lists(st.sampled_from(["tcp", "gloo", "nccl"]), min_size=1, max_size=3),
        st.integers(1, 64),
        hexes(16),
        st.none() | hexes(32),
        st.none() | addresses,
        st.booleans(),
        st.lists(addresses, max_size=4),
    ),
    "info": st.builds(InfoRequest, st.integers(0, 100), hexes(16), st.none() | hexes(32)),
    "status": st.builds(StatusRequest, st.integers(0, 100), hexes(16), st.none() | hexes(32)),
    "status_reply": st.builds(
        StatusReply,
        st.integers(0, 100),
        st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=4),
        st.none() | hexes(32),
    ),
    "stream": st.builds(StreamAttach, hexes(16), st.integers(0, 63), st.booleans()),
    "attached": st.builds(Attached),
    "accept": accepts(),
    "refuse": st.builds(Refuse, st.text(max_size=64), texts),
    "info_reply": st.builds(
        InfoReply,
        st.integers(0, 100),
        identities,
        st.integers(0, 1 << 40),
        st.integers(0, 1 << 62),
        st.none() | hexes(32),
    ),
    "done": st.builds(Done, st.booleans(), texts, st.text(max_size=64)),
    "ipc_offer": ipc_offers(),
    "ipc_reply": st.builds(IpcReply, st.booleans(), texts, st.none() | st.integers(0, 1000)),
    "artifacts": st.builds(
        ArtifactsRequest,
        st.integers(0, 100),
        st.text(max_size=64),
        artifact_keys,
        st.dictionaries(st.text(max_size=64), st.text(max_size=50), max_size=32),
        hexes(16),
        st.none() | hexes(32),
    ),
    "artifacts_offer": st.builds(
        ArtifactsOffer,
        st.lists(
            st.builds(
                FileDigest, st.text(min_size=1, max_size=50), st.integers(0, 1 << 44), hexes(32)
            ),
            max_size=5,
        ),
        texts,
        st.just("") | artifact_keys,
        st.none() | hexes(32),
    ),
    "progress": st.builds(Progress, st.integers(0, 1 << 62)),
    "moved": st.builds(
        Moved, st.booleans(), st.lists(addresses, max_size=4), st.lists(addresses, max_size=4)
    ),
}
messages = st.one_of(*by_kind.values())


def roundtrip(msg):
    frame = encode(msg)
    magic, length = HEADER.unpack(frame[: HEADER.size])
    assert magic == MAGIC and length == len(frame) - HEADER.size
    return decode(frame[HEADER.size :], (type(msg),))


@settings(max_examples=300, deadline=None)
@given(messages)
def test_roundtrip(msg):
    assert roundtrip(msg) == msg


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_protocol_error_only(body):
    with pytest.raises(ProtocolError):
        decode(body, tuple(MESSAGES.values()))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


# --- what a valid message is, field by field (the specification the decoder must follow) ---


def with_edges(check, *edges):
    """Attach values at the edge of what ``check`` allows, to try in every field it guards."""
    check.edges = list(edges)
    return check


def is_int(lo, hi):
    # JSON true is not a number, 1.0 is not an int.
    return with_edges(lambda v, o: type(v) is int and lo <= v <= hi, lo - 1, lo, hi, hi + 1)


def is_text(limit):
    return with_edges(
        lambda v, o: type(v) is str and len(v) <= limit, "x" * limit, "x" * (limit + 1)
    )


def is_hex(nbytes, optional=False):
    def check(v, o):
        if v is None:
            return optional  # an absent or null mac means "no proof"
        return type(v) is str and len(v) == 2 * nbytes and all(c in string.hexdigits for c in v)

    return with_edges(
        check, "AB" * nbytes, "ab" * nbytes + "a", "ab" * (nbytes - 1), "ab" * (nbytes - 1) + "a "
    )


def is_bool(v, o):
    return type(v) is bool


def identity_json(model="m", rank=0, ws=1, tp=1, pp=1, **extra):
    return {
        "model": model,
        "rank": rank,
        "world_size": ws,
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        **extra,
    }


def is_identity(v, o=None):
    keys = {"model", "rank", "world_size", "tensor_parallel_size", "pipeline_parallel_size"}
    if type(v) is not dict or set(v) != keys:
        return False
    if type(v["model"]) is not str or not 0 < len(v["model"]) <= 4096:
        return False
    if not all(type(v[k]) is int for k in keys - {"model"}):
        return False
    ws, tp, pp = v["world_size"], v["tensor_parallel_size"], v["pipeline_parallel_size"]
    return ws >= 1 and tp >= 1 and pp >= 1 and 0 <= v["rank"] < ws and tp * pp <= ws


with_edges(
    is_identity,
    identity_json(),
    identity_json(rank=3, ws=4, tp=2, pp=2),
    identity_json(model="m" * 4096),
    identity_json(model="m" * 4097),
    identity_json(model=""),
    identity_json(rank=1),
    identity_json(rank=-1, ws=2),
    identity_json(ws=2, tp=2, pp=2),
    identity_json(ws=0),
    identity_json(rank=False),
    identity_json(ws=2.0),
    identity_json(extra=1),
    {k: v for k, v in identity_json().items() if k != "rank"},
)


def is_manifest(v, o=None):
    if type(v) is not list or len(v) > 1_000_000:
        return False
    names = set()
    for entry in v:
        if type(entry) is not list or len(entry) != 3:
            return False
        name, dtype, shape = entry
        if type(name) is not str or not 0 < len(name) <= 1024 or name in names:
            return False
        names.add(name)
        if type(dtype) is not str or dtype not in DTYPES:
            return False
        if type(shape) is not list or len(shape) > 32:
            return False
        if not all(type(d) is int and 0 <= d < 1 << 48 for d in shape):
            return False
        if math.prod(shape) * DTYPES[dtype].itemsize > 1 << 48:
            return False
    return True


with_edges(
    is_manifest,
    [["w", "float32", [2, 3]], ["b", "bool", []]],
    [["w", "float32", [1]], ["w", "float32", [1]]],
    [["", "float32", [1]]],
    [["w", "float128", [1]]],
    [["w", "float32", [-1]]],
    [["w", "float32", [1 << 46]]],
    [["w", "float32", [1 << 47]]],
    [["w", "float32", [1] * 33]],
    [["w", "float32"]],
)


def is_transports(v, o):
    return (
        type(v) is list and 0 < len(v) <= 8 and all(type(t) is str and 0 < len(t) <= 32 for t in v)
    )


with_edges(is_transports, ["tcp"] * 8, ["tcp"] * 9, [""], ["x" * 32], ["x" * 33], [1])


def is_digest_kind(v, o):
    return v is None or v in ("xxh3-64", "wsum64")  # absent or null: XXH3, as before the field


with_edges(is_digest_kind, "xxh3-64", "wsum64", "XXH3-64", "md5", "x" * 33)


def is_hex_text(v, limit):
    return (
        type(v) is str
        and len(v) <= limit
        and len(v) % 2 == 0
        and all(c in string.hexdigits for c in v)
    )


def is_ipc_storage(v):
    keys = {"handle", "size", "offset", "ref", "ref_offset", "event", "sync"}
    if type(v) is not dict or set(v) != keys or not is_hex_text(v["handle"], 132):
        return False
    handle = bytes.fromhex(v["handle"])
    if not (len(handle) == 64 or (len(handle) == 66 and handle[:2] == b"\x02c")):
        return False
    ref = v["ref"]
    if type(ref) is not str or len(ref) > 200:
        return False
    if not re.fullmatch(r"/[A-Za-z0-9_][A-Za-z0-9_.-]*", ref):
        return False
    return (
        all(type(v[k]) is int for k in ("size", "offset", "ref_offset"))
        and 1 <= v["size"] <= 1 << 48
        and 0 <= v["offset"] <= 1 << 48
        and 0 <= v["ref_offset"] < 10_000
        and is_hex_text(v["event"], 128)
        and len(v["event"]) == 128
        and type(v["sync"]) is bool
    )


STORAGE = {
    "handle": "ab" * 64,
    "size": 1,
    "offset": 0,
    "ref": "/torch_1_2_3",
    "ref_offset": 0,
    "event": "cd" * 64,
    "sync": True,
}


def is_ipc_storages(v, o):
    return type(v) is list and len(v) <= 1_000_000 and all(is_ipc_storage(s) for s in v)


with_edges(
    is_ipc_storages,
    [STORAGE],
    [{**STORAGE, "handle": "0263" + "ab" * 64}],  # torch's version 2, cudaMalloc memory
    [{**STORAGE, "handle": "0265" + "ab" * 64}],  # expandable segments: not opened
    [{**STORAGE, "handle": "ab" * 65}],
    [{**STORAGE, "handle": "ab" * 63}],
    [{**STORAGE, "handle": "zz" * 64}],
    [{**STORAGE, "size": 0}],
    [{**STORAGE, "size": (1 << 48) + 1}],
    [{**STORAGE, "offset": -1}],
    [{**STORAGE, "ref": "/torch_" + "1" * 193}],
    [{**STORAGE, "ref": "/torch_" + "1" * 194}],
    [{**STORAGE, "ref": "/../etc/passwd"}],
    [{**STORAGE, "ref": "/a/b"}],
    [{**STORAGE, "ref": "torch_1"}],
    [{**STORAGE, "ref": "/.."}],
    [{**STORAGE, "ref_offset": 9999}],
    [{**STORAGE, "ref_offset": 10_000}],
    [{**STORAGE, "event": "cd" * 63}],
    [{**STORAGE, "sync": 1}],
    [{**STORAGE, "extra": 1}],
    [{k: v for k, v in STORAGE.items() if k != "event"}],
    ["ab" * 64],
)


def is_ipc_slots(v, o):
    storages = o.get("storages")
    count = len(storages) if type(storages) is list else 0
    return (
        type(v) is list
        and len(v) <= 1_000_000
        and all(
            s is None
            or (
                type(s) is list
                and len(s) == 2
                and all(type(x) is int for x in s)
                and 0 <= s[0] < count
                and 0 <= s[1] < 1 << 48
            )
            for s in v
        )
    )


with_edges(is_ipc_slots, [None, [0, 0]], [[1, 0]], [[0, -1]], [[0, 1 << 48]], [[0]], [[0, True]])


def is_gpu_id(v, o):
    if type(v) is not str or len(v) > 64:
        return False
    reason = o.get("reason")
    return bool(reason) or re.fullmatch(r"[A-Za-z0-9-]{1,64}", v) is not None


with_edges(is_gpu_id, "GPU-1234-abcd", "", "g" * 64, "g" * 65, "gpu 0", "../0")


def is_aliases(v, o):
    """[[index, earlier index], ...] joining tensors of one dtype and shape, no chains."""
    manifest = o.get("manifest")
    if type(v) is not list or not is_manifest(manifest):
        return False
    n = len(manifest)
    for pair in v:
        if type(pair) is not list or len(pair) != 2 or not all(type(x) is int for x in pair):
            return False
        if not 0 <= pair[1] < pair[0] < n:
            return False
        if manifest[pair[0]][1:] != manifest[pair[1]][1:]:
            return False
    aliases = dict(map(tuple, v))
    return not any(target in aliases for target in aliases.values())


def is_digests(v, o):
    return v is None or (type(v) is list and all(type(d) is int and 0 <= d < 1 << 64 for d in v))


with_edges(is_digests, [0, (1 << 64) - 1], [1 << 64], [-1], [True], [1.0])


def is_offer(v, o):
    return type(v) is dict and len(json.dumps(v)) <= 4096


with_edges(is_offer, {"store_port": 7000}, {"k": "x" * 4087}, {"k": "x" * 4088})


def is_address(v, o=None):
    """``host:port``: a non-empty host, an ASCII decimal port in 1..65535, 300 characters."""
    if type(v) is not str or len(v) > 300:
        return False
    host, sep, port = v.rpartition(":")
    return bool(sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536)


with_edges(is_address, "h:1", "h:65535", "h:0", "h:65536", ":80", "h:", "h:²", "h:" + "9" * 299)


def is_addresses(v, o):
    return type(v) is list and len(v) <= 64 and all(is_address(a) for a in v)


with_edges(is_addresses, ["h:1"] * 64, ["h:1"] * 65, ["h:x"], [None])


def is_artifact_key(v, o):
    """A plain file name of 1..128 characters, never a path."""
    return type(v) is str and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", v) is not None


with_edges(is_artifact_key, "a", "a" * 128, "a" * 129, ".a", "a/b", "..", "")


def is_factors(v, o):
    return (
        type(v) is dict
        and len(v) <= 32
        and all(len(k) <= 64 and type(x) is str and len(x) <= 4096 for k, x in v.items())
    )


with_edges(
    is_factors,
    {},
    {"k" * 64: "v"},
    {"k" * 65: "v"},
    {"k": "v" * 4097},
    {"k": 1},
    {f"k{i}": "v" for i in range(33)},
)


def is_offered_files(v, o):
    """[[path, size, sha256], ...]: a path of 1..1024 characters, a size up to 2^44."""
    return type(v) is list and all(
        type(f) is list
        and len(f) == 3
        and type(f[0]) is str
        and 0 < len(f[0]) <= 1024
        and type(f[1]) is int
        and 0 <= f[1] <= 1 << 44
        and is_hex(32)(f[2], o)
        for f in v
    )


with_edges(
    is_offered_files,
    [["a", 0, "ab" * 32]],
    [["", 0, "ab" * 32]],
    [["a", -1, "ab" * 32]],
    [["a", 1 << 45, "ab" * 32]],
    [["a", 0, "ab"]],
    [["a", 0]],
    [["x" * 1025, 0, "ab" * 32]],
)


PROTOCOL = is_int(0, 1 << 31)
NONCE = is_hex(16)
MAC = is_hex(32, optional=True)
FIELDS = {
    "hello": {"protocol": PROTOCOL, "nonce": NONCE, "auth": is_bool},
    "pull": {
        "protocol": PROTOCOL,
        "identity": is_identity,
        "manifest": lambda v, o: v is None or is_manifest(v),  # no manifest: "send me yours"
        "transports": is_transports,
        "streams": is_int(1, 64),
        "nonce": NONCE,
        "mac": MAC,
        "advertise": lambda v, o: v is None or is_address(v),  # absent: the client relays not
        "discover": is_bool,
        "avoid": is_addresses,
    },
    "info": {"protocol": PROTOCOL, "nonce": NONCE, "mac": MAC},
    "status": {"protocol": PROTOCOL, "nonce": NONCE, "mac": MAC},
    "status_reply": {"protocol": PROTOCOL, "status": lambda v, o: type(v) is dict, "mac": MAC},
    "stream": {
        "session": is_hex(16),
        "index": is_int(0, 63),
        "confirm": lambda v, o: v is None or type(v) is bool,  # absent: false
    },
    "attached": {},
    "accept": {
        "session": is_hex(16),
        "identity": is_identity,
        "manifest": is_manifest,
        "aliases": is_aliases,
        "transport": is_text(32),
        "streams": is_int(1, 64),
        "chunk_size": is_int(64 << 10, 256 << 20),
        "digests": is_digests,
        "offer": is_offer,
        "mac": MAC,
        "peers": is_addresses,
        "stay": is_bool,
        "digest": is_digest_kind,
        "data": lambda v, o: v is None or is_address(v),  # absent: the address dialled
    },
    "refuse": {"code": is_text(64), "reason": is_text(4096)},  # an empty reason is allowed
    "info_reply": {
        "protocol": PROTOCOL,
        "identity": is_identity,
        "tensors": is_int(0, 1 << 40),
        "total_bytes": is_int(0, 1 << 62),
        "mac": MAC,
    },
    "done": {"ok": is_bool, "reason": is_text(4096), "code": is_text(64)},
    "ipc_offer": {
        "gpu": is_gpu_id,
        "storages": is_ipc_storages,
        "slots": is_ipc_slots,
        "reason": is_text(4096),
    },
    "ipc_reply": {
        "ok": is_bool,
        "reason": is_text(4096),
        # storages opened, absent or null: all if ok, else none
        "mapped": with_edges(
            lambda v, o: v is None or (type(v) is int and 0 <= v <= MAX_TENSORS),
            -1,
            0,
            MAX_TENSORS,
            MAX_TENSORS + 1,
        ),
    },
    "artifacts": {
        "protocol": PROTOCOL,
        "artifact": is_text(64),
        "key": is_artifact_key,
        "factors": is_factors,
        "nonce": NONCE,
        "mac": MAC,
    },
    "artifacts_offer": {
        "files": is_offered_files,
        "reason": is_text(4096),
        "key": lambda v, o: v == "" or is_artifact_key(v, o),  # empty: nothing offered
        "mac": MAC,
    },
    "progress": {"held": is_int(0, 1 << 62)},
    "moved": {
        "here": is_bool,
        "peers": is_addresses,
        "drop": lambda v, o: v is None or is_addresses(v, o),  # absent: keep every source
    },
}
LIMITS = {
    kind: (64 << 20 if kind in ("pull", "accept", "ipc_offer") else 64 << 10) for kind in FIELDS
} | {"status_reply": 1 << 20, "artifacts_offer": 24 << 20}


def invalid_fields(obj: dict, body_size: int) -> list[str]:
    """The fields of ``obj`` that make it an invalid message (empty: it must decode)."""
    kind = obj["kind"]
    bad = [key for key, ok in FIELDS[kind].items() if not ok(obj.get(key), obj)]
    return bad + (["<frame size>"] if body_size > LIMITS[kind] else [])


def canonical(kind: str, fields: dict) -> str:
    """The message's fields as JSON, absent optional ones as null, aliases as a mapping."""
    out = {key: fields.get(key) for key in FIELDS[kind]}
    if kind == "accept":
        out["aliases"] = sorted(dict(map(tuple, out["aliases"])).items())
        out["digest"] = out["digest"] or "xxh3-64"  # absent: the digests are XXH3
    if kind == "stream":
        out["confirm"] = bool(out["confirm"])  # absent: false
    if kind == "moved":
        out["drop"] = out["drop"] or []  # absent: none
    return json.dumps(out, sort_keys=True)


def check_decoding(obj: dict) -> None:
    """Decode ``obj`` and hold the decoder to the specification above: a message with any
    invalid field raises ProtocolError; a valid one decodes to a message of the same kind that
    encodes back to exactly the fields that were sent (values and JSON types)."""
    body = json.dumps(obj).encode()
    bad = invalid_fields(obj, len(body))
    if bad:
        with pytest.raises(ProtocolError):
            decoded = decode(body, tuple(MESSAGES.values()))
            pytest.fail(f"accepted a message with invalid {bad}: {decoded!r}")
        return
    decoded = decode(body, tuple(MESSAGES.values()))  # a ProtocolError here: a valid one refused
    assert decoded.kind == obj["kind"]
    again = json.loads(encode(decoded)[HEADER.size :])
    assert canonical(obj["kind"], again) == canonical(obj["kind"], obj)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_specification_agrees_with_every_valid_message(msg):
    """The field checks above accept whatever the real message classes produce."""
    obj = msg.to_json()
    assert invalid_fields(obj, 0) == []
    check_decoding(obj)


@st.composite
def mutated_objects(draw):
    """A valid message with some fields replaced by arbitrary JSON, removed, or added."""
    obj = draw(messages).to_json()
    keys = sorted(k for k in obj if k != "kind")
    own = st.sampled_from(keys) if keys else st.nothing()  # a kind may have no fields
    for key in draw(st.sets(own, max_size=2)) if keys else ():
        del obj[key]
    changes = draw(st.dictionaries(own | st.text(max_size=12), json_values, max_size=3))
    return {**obj, **changes, "kind": obj["kind"]}


@settings(max_examples=500, deadline=None)
@given(
    st.builds(
        lambda kind, fields: {**fields, "kind": kind},
        st.sampled_from(sorted(MESSAGES)),
        st.dictionaries(st.text(max_size=12), json_values, max_size=8),
    )
    | mutated_objects()
)
def test_wrong_json_types_raise_protocol_error_only(obj):
    """Any JSON object with a valid kind either decodes to exactly what was sent, or (when a
    field is invalid) is refused with a ProtocolError and nothing else."""
    check_decoding(obj)


MUTATIONS = [[], {}, "x" * 5000, -1, 0, 1.5, True, None, 1 << 70, "", "zz" * 16, "ab" * 16]


@pytest.mark.parametrize("kind", sorted(by_kind))
def test_mutated_field_types_are_refused(kind):
    """Every field of valid messages of each kind, replaced by each value of a list of wrong
    types plus the edge values of that field's own rule, or removed: refused unless the new
    value is itself valid there (a null mac, an empty reason, the highest stream count, ...),
    in which case it is taken exactly as sent."""

    @settings(max_examples=25, deadline=None)
    @given(by_kind[kind])
    def check_every_field(msg):
        original = msg.to_json()
        for key in sorted(FIELDS[kind]):
            for value in [*MUTATIONS, *getattr(FIELDS[kind][key], "edges", [])]:
                check_decoding({**original, key: value})
            check_decoding({k: v for k, v in original.items() if k != key})

    check_every_field()


def test_specification_knows_which_replacements_are_valid():
    """Spot checks of the per-field knowledge the property tests rely on."""
    pull_json = PullRequest(1, Identity("m"), None, ["tcp"], 2, "ab" * 16).to_json()
    for key, value in (("mac", None), ("manifest", None), ("manifest", []), ("streams", 64)):
        assert invalid_fields({**pull_json, key: value}, 0) == [], (key, value)
        check_decoding({**pull_json, key: value})
    for key, value in (("streams", 0), ("streams", True), ("streams", 1.0), ("mac", "")):
        assert invalid_fields({**pull_json, key: value}, 0) == [key], (key, value)
        check_decoding({**pull_json, key: value})
    done_json = Done(False, "why", "integrity").to_json()
    for key, value in (("reason", ""), ("code", ""), ("ok", True)):
        check_decoding({**done_json, key: value})
    for key, value in (("reason", None), ("ok", 0), ("code", "x" * 65)):
        assert invalid_fields({**done_json, key: value}, 0) == [key]
        check_decoding({**done_json, key: value})


def test_unknown_kind_and_unexpected_kind():
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode(b'{"kind": "shutdown"}', tuple(MESSAGES.values()))
    with pytest.raises(ProtocolError, match="unexpected 'done' message"):
        decode(encode(Done(True))[HEADER.size :], (Hello,))


def test_manifest_rejects_unknown_dtype_and_bad_shapes():
    for bad in (
        [["w", "float128", [1]]],
        [["w", "float32", [-1]]],
        [["w", "float32", [1.5]]],
        [["w", "float32", [True]]],
        [["w", "float32", [1] * 33]],
        [["w", "float32", [1 << 40, 1 << 40]]],
        [["w", "float32", [1]], ["w", "float32", [1]]],
        [["", "float32", [1]]],
        {"w": 1},
    ):
        with pytest.raises(ProtocolError):
            Manifest.from_json(bad)


def test_accept_refuses_aliases_a_client_could_not_honour():
    manifest = Manifest(
        [
            TensorSpec("a", torch.float32, (2, 3)),
            TensorSpec("b", torch.float32, (2, 3)),
            TensorSpec("c", torch.float32, (3, 2)),
            TensorSpec("d", torch.float32, (2, 3)),
        ]
    )
    good = Accept(
        "00" * 16, Identity("m", 0, 1, 1, 1), manifest, {1: 0, 3: 0}, "tcp", 1, 1 << 20, None
    )
    assert roundtrip(good) == good
    for aliases, reason in (
        ({2: 0}, "different dtype or shape"),  # a copy into a tensor of another shape
        ({1: 0, 3: 1}, "itself an alias"),  # a chain, filled in an order the client cannot know
    ):
        bad = Accept("00" * 16, good.identity, manifest, aliases, "tcp", 1, 1 << 20, None)
        with pytest.raises(ProtocolError, match=reason):
            roundtrip(bad)


def test_manifest_of_tensors():
    m = Manifest.of({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.tensor(1)})
    assert m.to_json() == [["a", "bfloat16", [2, 3]], ["b", "int64", []]]
    assert m.total_bytes == 12 + 8


def pair():
    a, b = socket.socketpair()
    return Channel(a, idle=2.0), b


def test_huge_length_prefix_is_refused_before_reading():
    channel, peer = pair()
    peer.sendall(HEADER.pack(MAGIC, 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        channel.recv(Done)


def test_frame_limit_depends_on_expected_kind():
    channel, peer = pair()
    body = json.dumps({"kind": "done", "ok": True, "reason": "x" * 70_000}).encode()
    peer.sendall(HEADER.pack(MAGIC, len(body)) + body)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        channel.recv(Done)


def test_bad_magic():
    channel, peer = pair()
    peer.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="bad frame magic"):
        channel.recv(Done)


def test_truncated_frame_is_a_connection_error():
    channel, peer = pair()
    frame = encode(Done(True))
    peer.sendall(frame[:-3])
    peer.close()
    with pytest.raises(ConnectionError):
        channel.recv(Done)


def test_slow_sender_hits_the_deadline():
    import time

    channel, peer = pair()
    frame = encode(Done(True))

    def trickle():
        for byte in frame:
            time.sleep(0.05)
            try:
                peer.send(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    with pytest.raises(TimeoutError):
        channel.recv(Done, deadline=time.monotonic() + 0.3)
    peer.close()


def test_body_grows_only_as_bytes_arrive():
    """A length prefix of 60 MiB with 10 bytes behind it costs memory for what arrived, not for
    what was announced (measured: the peak of Python allocations while receiving)."""
    channel, peer = pair()
    peer.sendall(HEADER.pack(MAGIC, 60 << 20) + os.urandom(10))
    peer.shutdown(socket.SHUT_WR)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(ConnectionError):
            channel.recv(PullRequest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"receiving 10 bytes peaked at {peak / 2**20:.1f} MiB"


def test_frame_layout_on_the_wire():
    """b"NLDR", the body length as 4 big-endian bytes, then the JSON body: the layout peers of
    other versions rely on, built by hand here rather than with the module's own constants."""
    body = b'{"kind":"done","ok":true,"reason":"","code":""}'
    frame = b"NLDR" + struct.pack(">I", len(body)) + body
    assert encode(Done(True)) == frame
    channel, peer = pair()
    peer.sendall(frame)
    assert channel.recv(Done) == Done(True)
