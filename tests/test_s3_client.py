"""dist_ckpt.storage.s3_client against a real S3-API server (moto, over HTTP).

Faults are injected at the HTTP level by tests/s3_fault_proxy.py: the client
talks to the proxy, the proxy to the server.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("boto3", reason="boto3 is not installed: pip install -e '.[test]'")

from dist_ckpt.errors import DataFileError, StorageError
from dist_ckpt.storage.s3_client import (
    MIN_PART_SIZE,
    ObjectChanged,
    ObjectExists,
    RetryPolicy,
    S3Client,
    S3Url,
    multipart_etag,
    parse_s3_url,
)

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def client(s3_bucket: str):
    c = S3Client(s3_bucket, retry=FAST_RETRY)  # endpoint and credentials from AWS_* only
    yield c
    c.close()


@pytest.fixture
def proxied(s3_bucket: str, s3_fault_proxy):
    c = S3Client(s3_bucket, endpoint_url=s3_fault_proxy.endpoint, retry=FAST_RETRY)
    yield c, s3_fault_proxy
    c.close()


def actions(proxy, method: str) -> list[str]:
    return [a for m, _, a in proxy.log if m == method]


def test_parse_s3_url():
    assert parse_s3_url("s3://b") == S3Url("b", "")
    assert parse_s3_url("s3://b/run//step-1/") == S3Url("b", "run/step-1")
    assert parse_s3_url("s3://b/p").key("MANIFEST") == "p/MANIFEST"
    assert str(parse_s3_url("s3://b/p/")) == "s3://b/p"
    for bad in ("b/p", "s3://", "s3:///p", "s3://b/../x", "s3://b/p/./q"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_endpoint_and_credentials_from_a_profile(s3_server, s3_bucket, tmp_path, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    (tmp_path / "config").write_text(f"[profile ckpt]\nendpoint_url = {s3_server.endpoint}\nregion = us-east-1\n")
    (tmp_path / "credentials").write_text("[ckpt]\naws_access_key_id = a\naws_secret_access_key = b\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "ckpt")
    client = S3Client(s3_bucket)  # nothing passed: the AWS chain finds it all
    client.put("k", b"v")
    assert client.get("k", 10) == b"v"
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}: cannot configure"):
        S3Client(s3_bucket, profile="no-such-profile")


def test_put_head_get_list_delete(client):
    keys = [f"p/k{i}" for i in range(5)]
    for k in keys:
        client.put(k, k.encode())
    client.put("q/other", b"x")
    info = client.head("p/k3")
    assert info is not None and info.size == 4
    assert client.head("p/none") is None
    assert client.get("p/k1", max_size=100) == b"p/k1"
    with pytest.raises(DataFileError, match="over the limit"):
        client.get("p/k1", max_size=3)
    # page_size 2 makes the listing take 3 pages
    assert [o.key for o in client.list("p/", page_size=2)] == keys
    client.delete_many(keys + ["p/never-there"])
    assert list(client.list("p/")) == []
    assert [o.key for o in client.list("q/")] == ["q/other"]


def test_put_if_absent_refuses_second_writer(client, s3_bucket):
    etag = client.put_if_absent("ck/MANIFEST", b"first")
    with pytest.raises(ObjectExists) as ei:
        client.put_if_absent("ck/MANIFEST", b"second")
    assert isinstance(ei.value, FileExistsError) and isinstance(ei.value, StorageError)
    assert f"s3://{s3_bucket}/ck/MANIFEST" in str(ei.value)
    assert client.get("ck/MANIFEST", 100) == b"first"
    assert client.head("ck/MANIFEST").etag == etag


def test_replace_if_match(client):
    old = client.put_if_absent("ck/MANIFEST", b"v1")
    new = client.replace_if_match("ck/MANIFEST", b"v2", old)
    assert new != old and client.get("ck/MANIFEST", 100) == b"v2"
    with pytest.raises(ObjectChanged, match="ck/MANIFEST"):
        client.replace_if_match("ck/MANIFEST", b"v3", old)  # stale ETag: someone replaced it
    with pytest.raises(ObjectChanged):
        client.replace_if_match("ck/absent", b"v1", old)
    assert client.get("ck/MANIFEST", 100) == b"v2"


def test_multipart_writer_parts_in_flight(client):
    data = os.urandom(2 * MIN_PART_SIZE + 12345)
    w = client.open_writer("d/r0.bin", part_size=MIN_PART_SIZE, max_in_flight=2)
    for i in range(0, len(data), 1 << 20):  # pieces that do not line up with parts
        w.write(memoryview(data)[i : i + (1 << 20)])
    etag = w.complete()
    assert etag.endswith('-3"')
    assert client.head("d/r0.bin").size == len(data)
    buf = bytearray(100 + 4000)
    got = client.get_range("d/r0.bin", MIN_PART_SIZE - 2000, 4000, out=memoryview(buf)[100:])
    assert bytes(got) == data[MIN_PART_SIZE - 2000 : MIN_PART_SIZE + 2000] == bytes(buf[100:])
    assert list(client.list_uploads("d/")) == []


def test_small_object_through_writer_is_one_put(client):
    with client.open_writer("d/small", part_size=MIN_PART_SIZE) as w:
        w.write(b"abc")
        w.complete()
    assert client.get("d/small", 10) == b"abc"
    assert list(client.list_uploads("d/")) == []


def test_multipart_abort_leaves_no_object(client):
    w = client.open_writer("d/aborted", part_size=MIN_PART_SIZE, max_in_flight=2)
    w.write(os.urandom(MIN_PART_SIZE + 10))  # one part uploaded: the upload exists
    assert [k for k, _ in client.list_uploads("d/")] == ["d/aborted"]
    w.abort()
    assert client.head("d/aborted") is None
    assert list(client.list_uploads("d/")) == []
    with pytest.raises(StorageError, match="already completed or aborted"):
        w.write(b"x")


def test_writer_closed_by_exception_leaves_no_object(client):
    with pytest.raises(RuntimeError):
        with client.open_writer("d/crashed", part_size=MIN_PART_SIZE) as w:
            w.write(os.urandom(MIN_PART_SIZE * 2))
            raise RuntimeError("the rank failed mid-save")
    assert client.head("d/crashed") is None
    assert list(client.list_uploads("d/")) == []


def test_writer_rejects_parts_below_s3_minimum(client):
    with pytest.raises(ValueError, match="part_size"):
        client.open_writer("d/x", part_size=MIN_PART_SIZE - 1)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_writer_has_max_in_flight_parts_uploading_and_never_more(proxied, in_flight):
    client, proxy = proxied
    # The first `in_flight` parts wait at the proxy until all of them have
    # arrived: a writer uploading fewer at once breaks the barrier.
    proxy.inject("hold", nth=1, times=in_flight, method="PUT", path_contains="partNumber=")
    data = os.urandom(6 * MIN_PART_SIZE + 7)
    w = client.open_writer("d/par.bin", part_size=MIN_PART_SIZE, max_in_flight=in_flight)
    w.write(data)
    w.complete()
    assert proxy.broken_holds == 0
    assert proxy.peak_in_flight <= in_flight
    assert actions(proxy, "PUT").count("hold") == in_flight
    assert bytes(client.get_range("d/par.bin", 0, len(data))) == data


def test_get_range_past_the_end(client):
    client.put("d/short", b"0123456789")
    assert bytes(client.get_range("d/short", 2, 3)) == b"234"
    with pytest.raises(DataFileError, match="ends at 10"):
        client.get_range("d/short", 5, 10)  # the store answers the 5 bytes there are
    with pytest.raises(DataFileError, match="shorter than range"):
        client.get_range("d/short", 20, 1)


def test_multipart_etag_matches_store():
    # S3's documented rule; the completion retry relies on it.
    assert multipart_etag(['"' + "00" * 16 + '"']) == '"4ae71336e44bf9bf79d2752e234818a5-1"'


@pytest.mark.parametrize("action", ["500", "reset"])
def test_failed_request_is_retried(proxied, action):
    client, proxy = proxied
    proxy.inject(action, nth=1, method="PUT")
    client.put("k", b"v")
    assert actions(proxy, "PUT") == [action, "pass"]
    assert client.get("k", 10) == b"v"


def test_download_cut_off_mid_body_resumes_where_it_stopped(proxied):
    client, proxy = proxied
    data = os.urandom(3 << 20)
    client.put("k", data)
    proxy.inject("truncate", nth=1, method="GET")
    out = bytearray(len(data) - 1000)
    client.get_range("k", 1000, len(data) - 1000, out=out)
    assert actions(proxy, "GET") == ["truncate", "pass"]
    assert out == data[1000:]


def test_too_many_failures_raise_storage_error(proxied, s3_bucket):
    client, proxy = proxied
    proxy.inject("500", nth=1, times=FAST_RETRY.attempts, method="GET")
    client.put("k", b"v")
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/k failed after 3 tries") as ei:
        client.get_range("k", 0, 1)
    assert "InternalError" in str(ei.value)
    assert actions(proxy, "GET") == ["500"] * 3


def test_failed_part_is_retried(proxied):
    client, proxy = proxied
    data = os.urandom(2 * MIN_PART_SIZE)
    proxy.inject("reset", nth=2, method="PUT", path_contains="partNumber=")
    w = client.open_writer("d/r1.bin", part_size=MIN_PART_SIZE, max_in_flight=2)
    w.write(data)
    w.complete()
    assert actions(proxy, "PUT").count("reset") == 1
    assert bytes(client.get_range("d/r1.bin", 0, len(data))) == data


def test_part_failing_every_try_aborts_the_upload(proxied, s3_bucket):
    client, proxy = proxied
    proxy.inject("500", nth=1, times=100, method="PUT", path_contains="partNumber=2")
    w = client.open_writer("d/r2.bin", part_size=MIN_PART_SIZE, max_in_flight=2)
    w.write(os.urandom(2 * MIN_PART_SIZE))
    with pytest.raises(StorageError, match=f"UploadPart\\(2\\) s3://{s3_bucket}/d/r2.bin failed after 3 tries"):
        w.complete()
    assert client.head("d/r2.bin") is None
    assert list(client.list_uploads("d/")) == []  # aborted: no parts left behind


def test_conditional_put_whose_answer_was_lost(proxied):
    # The server applies the create, the answer never arrives; the retry is
    # refused (412) but finds its own bytes there, so it is a success.
    client, proxy = proxied
    proxy.inject("reset_after", nth=1, method="PUT")
    etag = client.put_if_absent("ck/MANIFEST", b"manifest of save 1234")
    assert actions(proxy, "PUT") == ["reset_after", "pass"]
    assert client.head("ck/MANIFEST").etag == etag
    # Someone else's bytes there still mean "exists".
    proxy.inject("reset_after", nth=1, method="PUT")
    with pytest.raises(ObjectExists):
        client.put_if_absent("ck/MANIFEST", b"manifest of save 5678")


def test_completion_whose_answer_was_lost(proxied):
    # moto accepts a second CompleteMultipartUpload of a completed upload, so
    # this covers the retried completion end to end; the NoSuchUpload branch
    # (what S3 may answer instead) is not reached against moto.
    client, proxy = proxied
    data = os.urandom(MIN_PART_SIZE + 1)
    proxy.inject("reset_after", nth=1, method="POST", path_contains="uploadId=")
    w = client.open_writer("d/r3.bin", part_size=MIN_PART_SIZE)
    w.write(data)
    etag = w.complete()
    assert client.head("d/r3.bin").etag == etag
    assert bytes(client.get_range("d/r3.bin", 0, len(data))) == data
