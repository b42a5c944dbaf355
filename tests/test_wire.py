"""Unit tests for dist_ckpt.wire: round trips, authentication, limits, fuzzing."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct

import msgpack
import numpy as np
import pytest
import zmq
from fuzz_gen import Gen, fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ckpt import wire
from dist_ckpt.errors import WireError
from dist_ckpt.wire import (
    Aborted,
    BadMessage,
    CommitInProgress,
    Committed,
    Done,
    Failed,
    Heartbeat,
    HeartbeatAck,
    Limits,
    PlanReply,
    PlanRequest,
    StopAck,
    StopAt,
    StopReady,
    StopRequest,
    StopSubscribe,
    decode,
    encode,
)

SECRET = b"s" * 32
COMMON = {"job": "job-1", "ckpt": "step-100", "rank": 3}

SAMPLES = [
    PlanRequest(**COMMON, path="/ckpt/step-100", world_size=8, desc_digest=2**64 - 1, desc=b"d" * 1000, overwrite=False),
    PlanReply(**COMMON, tmp_path="/ckpt/.tmp-step-100", same=False, plan=b"\x00plan\xff"),
    PlanReply(**COMMON, tmp_path="/ckpt/.tmp-step-100", same=True, plan=b""),
    Heartbeat(**COMMON, phase="write"),
    HeartbeatAck(job="job-1", ckpt="", rank=0),
    Done(**COMMON, records=b"records", objects=b""),
    Failed(**COMMON, phase="stage", error="OSError: disk full"),
    CommitInProgress(**COMMON),
    Committed(**COMMON, path="/ckpt/step-100"),
    StopSubscribe(job="job-1", ckpt="", rank=2),
    StopRequest(job="job-1", ckpt="", rank=2, step=41),
    StopAt(job="job-1", ckpt="", rank=2, stop_at=42),
    StopAck(job="job-1", ckpt="", rank=2, stop_at=42),
    StopReady(job="job-1", ckpt="", rank=2, stop_at=42),
    Aborted(**COMMON, reasons={0: "ok?", 5: "timeout in write", -1: "weird but legal"}),
]


def sign(header: object, *payload: bytes, raw: bytes | None = None) -> list[bytes]:
    """Frames with a valid MAC, computed independently of wire.py."""
    head = msgpack.packb(header, use_bin_type=True) if raw is None else raw
    mac = hmac.new(SECRET, digestmod=hashlib.sha256)
    for part in (head, *payload):
        mac.update(struct.pack("<Q", len(part)) + part)
    return [head, mac.digest(), *payload]


def header_of(msg: wire.Message) -> dict[str, object]:
    """The header map ``encode`` would send, for tampering with in tests."""
    return msgpack.unpackb(encode(msg, SECRET)[0], strict_map_key=False)


def reason_of(frames: list, **kw: object) -> str:
    with pytest.raises(WireError) as info:
        decode(frames, SECRET, **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, BadMessage)
    return info.value.reason


# --- round trips -----------------------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: wire.Message) -> None:
    frames = encode(msg, SECRET)
    assert len(frames) == 2 + len(type(msg).PAYLOAD)
    assert len(frames[1]) == 32
    assert decode(frames, SECRET) == msg
    # The independent signer agrees with encode on the MAC construction.
    assert sign(None, *map(bytes, frames[2:]), raw=bytes(frames[0]))[1] == frames[1]


def test_aborted_keeps_int_keys() -> None:
    got = decode(encode(SAMPLES[-1], SECRET), SECRET)
    assert isinstance(got, Aborted)
    assert got.reasons == {0: "ok?", 5: "timeout in write", -1: "weird but legal"}
    assert all(type(k) is int for k in got.reasons)


def test_payload_frames_are_zero_copy() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = encode(Done(**COMMON, records=memoryview(arr), objects=bytearray(b"ob")), SECRET)
    assert isinstance(frames[2], memoryview) and frames[2].obj is arr
    assert frames[2].nbytes == arr.nbytes
    got = decode([bytearray(f) for f in frames], SECRET)
    assert isinstance(got, Done) and isinstance(got.records, memoryview)
    assert bytes(got.records) == arr.tobytes() and bytes(got.objects) == b"ob"


def test_every_tag_is_unique_and_registered() -> None:
    tags = [type(m).TAG for m in SAMPLES]
    assert set(tags) == set(wire._REGISTRY) and all(tags)


# --- authentication -------------------------------------------------------


def flip(frame: bytes | memoryview, i: int = 0) -> bytes:
    b = bytearray(frame)
    b[i] ^= 1
    return bytes(b)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_tampering_any_frame_fails_mac(msg: wire.Message) -> None:
    frames = [bytes(f) for f in encode(msg, SECRET)]
    for i in [0, 1, *range(2, len(frames))]:
        bad = list(frames)
        bad[i] = flip(bad[i], len(bad[i]) // 2) if bad[i] else b"x"
        assert reason_of(bad) == "mac", i


def test_moving_a_frame_boundary_fails_mac() -> None:
    head, mac, a, b = (bytes(f) for f in encode(Done(**COMMON, records=b"ab", objects=b"c"), SECRET))
    assert reason_of([head, mac, b"a", b"bc"]) == "mac"
    assert reason_of([head, mac, a + b, b""]) == "mac"


def test_wrong_secret_and_short_mac() -> None:
    frames = encode(SAMPLES[3], SECRET)
    with pytest.raises(BadMessage, match="mac"):
        decode(frames, b"t" * 32)
    assert reason_of([frames[0], frames[1][:31]]) == "mac"
    assert reason_of([frames[0], b""]) == "mac"


def test_bad_secret_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        encode(SAMPLES[3], b"short")
    with pytest.raises(ValueError):
        decode([b"", b""], "s" * 32)  # type: ignore[arg-type]


# --- header validation (correctly MAC'ed, so only the content is wrong) ---------


def test_wrong_version() -> None:
    head = header_of(SAMPLES[3])
    assert reason_of(sign({**head, "v": 2})) == "version"
    assert reason_of(sign({**head, "v": True})) == "version"
    assert reason_of(sign({k: v for k, v in head.items() if k != "v"})) == "version"


def test_unknown_type() -> None:
    head = header_of(SAMPLES[3])
    assert reason_of(sign({**head, "t": "nope"})) == "type"
    assert reason_of(sign({**head, "t": 7})) == "type"
    assert reason_of(sign({k: v for k, v in head.items() if k != "t"})) == "type"


def test_not_msgpack_or_not_a_map() -> None:
    assert reason_of(sign(None, raw=b"\xc1")) == "header"
    assert reason_of(sign(None, raw=b"\x92\x01")) == "header"  # truncated array
    assert reason_of(sign(None, raw=msgpack.packb({"v": 1}) + b"\x00")) == "header"  # extra data
    assert reason_of(sign([1, 2, 3])) == "header"
    assert reason_of(sign(None, raw=b"\xa2\xff\xfe")) == "header"  # invalid utf-8 str


def test_missing_and_extra_fields() -> None:
    head = header_of(SAMPLES[3])
    assert reason_of(sign({k: v for k, v in head.items() if k != "phase"})) == "field"
    assert reason_of(sign({**head, "extra": 1})) == "field"
    assert reason_of(sign({**head, 5: 1})) == "field"


@pytest.mark.parametrize(
    "msg, field, value",
    [
        (SAMPLES[3], "rank", True),
        (SAMPLES[0], "world_size", False),
        (SAMPLES[0], "desc_digest", True),
        (SAMPLES[0], "desc_digest", -1),
        (SAMPLES[0], "desc_digest", 1.0),
        (SAMPLES[1], "same", 1),
        (SAMPLES[3], "phase", b"write"),
        (SAMPLES[3], "job", None),
        (SAMPLES[-1], "reasons", {"0": "x"}),
        (SAMPLES[-1], "reasons", {True: "x"}),
        (SAMPLES[-1], "reasons", {0: b"x"}),
        (SAMPLES[-1], "reasons", [[0, "x"]]),
    ],
)
def test_wrongly_typed_field(msg: wire.Message, field: str, value: object) -> None:
    payload = [bytes(f) for f in encode(msg, SECRET)[2:]]
    assert reason_of(sign({**header_of(msg), field: value}, *payload)) == "field"


def test_encode_refuses_what_decode_would() -> None:
    with pytest.raises(BadMessage, match="field"):
        encode(Heartbeat(job="j", ckpt="", rank=True, phase="x"), SECRET)
    with pytest.raises(BadMessage, match="field"):
        encode(PlanRequest(**COMMON, path="p", world_size=1, desc_digest=2**64, desc=b"", overwrite=True), SECRET)
    with pytest.raises(BadMessage, match="field"):
        encode(Done(**COMMON, records="not bytes", objects=b""), SECRET)  # type: ignore[arg-type]
    with pytest.raises(BadMessage, match="field"):  # not contiguous
        encode(Done(**COMMON, records=memoryview(np.zeros((4, 4))[:, 1]), objects=b""), SECRET)
    with pytest.raises(BadMessage, match="rank"):
        encode(Heartbeat(job="j", ckpt="", rank=-1, phase="x"), SECRET)
    with pytest.raises(TypeError):
        encode(wire.Message(job="j", ckpt="", rank=0), SECRET)


def test_rank_out_of_range() -> None:
    frames = encode(Heartbeat(job="j", ckpt="", rank=4, phase="x"), SECRET)
    assert decode(frames, SECRET, max_rank=5).rank == 4
    assert reason_of(frames, max_rank=4) == "rank"
    assert reason_of(sign({**header_of(SAMPLES[3]), "rank": -1})) == "rank"


def test_wrong_payload_frame_count() -> None:
    head = header_of(SAMPLES[5])
    assert reason_of(sign(head, b"only one")) == "frames"
    assert reason_of(sign(head, b"a", b"b", b"c")) == "frames"
    assert reason_of(sign(header_of(SAMPLES[3]), b"unexpected")) == "frames"


# --- sizes and frame counts ----------------------------------------------------


def test_too_few_or_too_many_frames() -> None:
    frames = [bytes(f) for f in encode(SAMPLES[5], SECRET)]
    assert reason_of([]) == "frames"
    assert reason_of(frames[:1]) == "frames"
    assert reason_of(frames + [b""] * 5) == "frames"  # 9 > max_frames
    assert reason_of(frames, limits=Limits(max_frames=3)) == "frames"
    assert decode(tuple(frames), SECRET) == SAMPLES[5]  # a tuple is as good as a list


def test_non_buffer_frames() -> None:
    assert reason_of([b"h", "mac-as-str"]) == "frames"
    assert reason_of([b"h", None]) == "frames"
    assert reason_of("not a list") == "frames"  # type: ignore[arg-type]
    assert reason_of(None) == "frames"  # type: ignore[arg-type]


def test_oversized_frames() -> None:
    msg = Done(**COMMON, records=b"r" * 11, objects=b"")
    frames = encode(msg, SECRET)
    assert reason_of(frames, limits=Limits(max_frame=10)) == "size"
    assert reason_of(frames, limits=Limits(max_header=len(frames[0]) - 1)) == "size"
    assert reason_of(frames, limits=Limits(max_total=sum(len(f) for f in frames) - 1)) == "size"
    assert decode(frames, SECRET, limits=Limits(max_frame=11)) == msg
    with pytest.raises(BadMessage, match="size"):
        encode(msg, SECRET, limits=Limits(max_frame=10))


def test_limits_are_validated() -> None:
    for bad in ({"max_header": 0}, {"max_frame": -1}, {"max_frames": 1}, {"max_total": True}):
        with pytest.raises(ValueError):
            Limits(**bad)  # type: ignore[arg-type]


# --- fuzzing -------------------------------------------------------------------

# Hypothesis (shrinking, its own edge cases) on 100 inputs; the seeded
# twin of each fuzzer runs the 10,000 (see fuzz_gen.py: hypothesis' per-example
# cost, not the decoder, made 10,000 examples take a minute).
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FRAME_KINDS = [bytes, bytearray, memoryview]
frame_kinds = st.sampled_from(FRAME_KINDS)


def check_random_frames(raw: list[tuple[bytes, type]]) -> None:
    """Unsigned junk frames are refused with a ``BadMessage`` and nothing else."""
    frames = [kind(b) for b, kind in raw]
    try:
        decode(frames, SECRET, limits=Limits(max_frame=40, max_header=40), max_rank=8)
    except BadMessage:
        pass


@FUZZ
@given(st.lists(st.tuples(st.binary(max_size=48), frame_kinds), max_size=10))
def test_fuzz_random_frames(raw: list[tuple[bytes, type]]) -> None:
    check_random_frames(raw)


def test_fuzz_random_frames_seeded() -> None:
    fuzz("random_frames", lambda g: [(g.binary(48), g.choice(FRAME_KINDS)) for _ in range(g.size(10))], check_random_frames)


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
# Keys a map may really carry: the field names, other short strings, ranks.
keys = st.sampled_from(["v", "t", "job", "ckpt", "rank", "phase"]) | st.text(max_size=4) | st.integers(-9, 9)
# Kept small: on a 2-core box each leaf costs hypothesis ~0.2 ms per example.
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)


def _shaped(msg: wire.Message) -> st.SearchStrategy[tuple[dict[object, object], int]]:
    """``msg``'s header with a few values replaced at random; mostly the right frame count."""
    good = header_of(msg)
    overrides = st.dictionaries(st.sampled_from(sorted(good)), values, max_size=3)
    n_payload = st.just(len(type(msg).PAYLOAD)) | st.integers(0, 4)
    return st.tuples(overrides.map(lambda o: {**good, **o}), n_payload)


# Strategies are built once: building them inside a draw costs more than drawing.
shaped_headers = st.one_of([_shaped(m) for m in SAMPLES])


def check_signed_header(case: tuple[object, int], blob: bytes) -> None:
    """A validly signed header of any shape is refused with a known reason, or decodes to a message that round-trips."""
    header, n_payload = case
    frames = sign(header, *[blob] * n_payload)
    try:
        msg = decode(frames, SECRET, max_rank=8)
    except BadMessage as e:
        assert e.reason in wire.REASONS
        return
    # Anything accepted is a well-formed message that survives a round trip.
    assert isinstance(msg, wire.Message) and 0 <= msg.rank < 8
    assert decode(encode(msg, SECRET), SECRET) == msg


@FUZZ
@given(st.tuples(values, st.integers(0, 3)) | shaped_headers, st.binary(max_size=8))
def test_fuzz_signed_headers(case: tuple[object, int], blob: bytes) -> None:
    check_signed_header(case, blob)


KEYS = ["v", "t", "job", "ckpt", "rank", "phase"]
SAMPLE_HEADERS = [(header_of(m), len(type(m).PAYLOAD)) for m in SAMPLES]


def _seeded_value(g: Gen) -> object:
    """What ``values`` draws: scalars nested in lists and maps (keys as ``keys`` draws them), at most 6 leaves."""
    return g.value(6, 3, key=lambda: g.choice(KEYS) if g.random() < 0.4 else (g.text(4) if g.random() < 0.5 else g.randint(-9, 9)))


def _seeded_signed_case(g: Gen) -> tuple[tuple[object, int], bytes]:
    """What the hypothesis fuzzer draws: any value as a header, or a real message's header with up to 3 fields replaced."""
    if g.random() < 0.5:
        case: tuple[object, int] = (_seeded_value(g), g.randint(0, 3))
    else:
        good, n_payload = g.choice(SAMPLE_HEADERS)
        fields = sorted(good)
        overrides = {g.choice(fields): _seeded_value(g) for _ in range(g.randint(0, 3))}
        case = ({**good, **overrides}, n_payload if g.random() < 0.5 else g.randint(0, 4))
    return case, g.binary(8)


def test_fuzz_signed_headers_seeded() -> None:
    fuzz("signed_headers", _seeded_signed_case, lambda c: check_signed_header(*c))


def test_deep_nesting_is_a_header_error() -> None:
    deep = b"\x91" * 5000 + b"\xc0"  # 5000 nested one-element arrays
    assert reason_of(sign(None, raw=deep)) == "header"
    deep_map = b"\x81\x00" * 5000 + b"\xc0"
    assert reason_of(sign(None, raw=deep_map)) == "header"


# --- real sockets ----------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("copy", [True, False])
def test_through_zmq_dealer_router(copy: bool) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        big = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
        sent = [Done(**COMMON, records=memoryview(big), objects=b"objs"), *SAMPLES]
        for msg in sent:
            dealer.send_multipart(encode(msg, SECRET), copy=copy)
        for msg in sent:
            assert router.poll(10_000), "nothing arrived"
            identity, *frames = router.recv_multipart(copy=copy)
            got = decode(frames, SECRET, max_rank=8)
            assert got == msg
            if not copy:
                assert all(isinstance(getattr(got, n), memoryview) for n in type(got).PAYLOAD)
        # A tampered message through the socket is dropped with a reason.
        bad = [bytes(f) for f in encode(SAMPLES[3], SECRET)]
        dealer.send_multipart([flip(bad[0]), bad[1]])
        assert router.poll(10_000)
        _, *frames = router.recv_multipart(copy=copy)
        assert reason_of(frames) == "mac"
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


# -- one message for many ranks (the coordinator's broadcasts) ----------------------------------------------------

RANK_EDGES = (0, 1, 127, 128, 255, 256, 65535, 65536, 2**31, 2**32, 2**63 - 1)


@pytest.mark.parametrize(
    "msg",
    [
        CommitInProgress("job", "c1", 7),
        Committed("job", "c1", 0, "/ckpt/step-10"),
        Aborted("job", "c1", 3, {0: "commit failed", 70000: "rank 70000 died"}, "CheckpointExists"),
        PlanReply("job", "c1", 5, "/ckpt/step-10.tmp-job-1/data", True, b"\x93\x01\xc4\x00" * 100),
        StopAt("job", "", 2, 41),
    ],
    ids=lambda m: type(m).__name__,
)
def test_rank_frames_are_encode_of_each_ranks_message_byte_for_byte(msg):
    """Packed and checked once, signed per rank: what decode sees is exactly encode's message for that rank."""
    shared = wire.RankFrames(msg, SECRET)
    payloads = None
    for r in RANK_EDGES:
        got = shared.frames(r)
        assert [bytes(f) for f in got] == [bytes(f) for f in encode(dataclasses.replace(msg, rank=r), SECRET)]
        assert decode(got, SECRET) == dataclasses.replace(msg, rank=r)
        payloads = payloads or got[2:]
        assert all(a is b for a, b in zip(got[2:], payloads))  # one payload object for every rank
    with pytest.raises(BadMessage, match="mac"):  # each rank's MAC is its own: another rank's header fails it
        decode([shared.frames(1)[0], shared.frames(2)[1], *shared.frames(1)[2:]], SECRET)


def test_rank_frames_check_the_message_once_and_every_rank():
    with pytest.raises(BadMessage, match="field"):
        wire.RankFrames(Committed("job", "c1", 0, 5), SECRET)  # type: ignore[arg-type]
    fits = len(encode(Committed("job", "c1", 0, "p" * 90), SECRET, Limits(max_header=140))[0])  # 135 bytes for rank 0
    with pytest.raises(BadMessage, match="size"):  # a header that fits for rank 0 but not for every rank (2**63 - 1: 8 more bytes)
        wire.RankFrames(Committed("job", "c1", 0, "p" * 90), SECRET, Limits(max_header=fits + 7))
    wire.RankFrames(Committed("job", "c1", 0, "p" * 90), SECRET, Limits(max_header=fits + 8)).frames(2**63 - 1)
    shared = wire.RankFrames(CommitInProgress("job", "c1", 0), SECRET)
    for bad in (-1, True, 1.0, "3"):
        with pytest.raises(BadMessage, match="rank"):
            shared.frames(bad)  # type: ignore[arg-type]
