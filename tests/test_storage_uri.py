"""The URI layer of cycleprune.storage: local paths and gs:// (on a real GCS emulator process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from cycleprune import storage

BACKENDS = ("local", "gcs")


@pytest.fixture(params=BACKENDS)
def root(request, tmp_path) -> str:
    """An empty place to write: a local folder, or a fresh bucket on the emulator."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("gcs_bucket") + "/some/prefix"


def _tree(folder) -> None:
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"alpha")
    (folder / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (folder / "sub" / "deeper" / "c.json").write_text('{"c": 1}')


def test_uri_helpers():
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/gs://x")
    assert not storage.is_gcs(os.path.join("gs:", "b"))
    assert storage.split_gcs("gs://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.join_uri("gs://b/p/", "x", "/y") == "gs://b/p/x/y"
    assert storage.join_uri("/tmp/p", "x") == "/tmp/p/x"
    with pytest.raises(ValueError, match="must name a bucket"):
        storage.split_gcs("gs:///x")


def test_bytes_round_trip_exists_list_remove(root):
    storage.write_bytes(storage.join_uri(root, "x/1.txt"), b"one")
    storage.write_bytes(storage.join_uri(root, "x/2.txt"), b"two")
    storage.write_bytes(storage.join_uri(root, "top.txt"), b"top")
    assert storage.read_bytes(storage.join_uri(root, "x/2.txt")) == b"two"
    assert storage.exists(storage.join_uri(root, "top.txt"))
    assert not storage.exists(storage.join_uri(root, "nope.txt"))
    assert storage.list_uri(root) == ["top.txt", "x/1.txt", "x/2.txt"]
    assert storage.list_uri(root, recursive=False) == ["top.txt", "x/"]
    with storage.open_uri(storage.join_uri(root, "x/1.txt")) as handle:
        assert handle.read() == b"one"
    storage.remove(storage.join_uri(root, "top.txt"))
    storage.remove(storage.join_uri(root, "top.txt"))  # already gone: fine
    assert storage.list_uri(root) == ["x/1.txt", "x/2.txt"]
    with pytest.raises(storage.StorageError, match="limit 2"):
        storage.read_bytes(storage.join_uri(root, "x/1.txt"), max_bytes=2)


def test_prefix_round_trip_both_ways(root, tmp_path):
    src = tmp_path / "src"
    _tree(src)
    uri = storage.join_uri(root, "model")
    manifest = storage.write_prefix(src, uri, metadata={"kind": "test"})
    assert [e["path"] for e in manifest["files"]] == ["a.txt", "sub/b.bin", "sub/deeper/c.json"]
    assert manifest["total_bytes"] == 5 + 3000 + 8 and manifest["metadata"] == {"kind": "test"}
    assert storage.is_complete(uri)
    back = storage.read_prefix(uri, tmp_path / "back")
    assert back["files"] == manifest["files"]
    for entry in manifest["files"]:
        assert (tmp_path / "back" / entry["path"]).read_bytes() == (
            src / entry["path"]
        ).read_bytes()
    only = storage.read_prefix(uri, tmp_path / "only", files=["sub/deeper"])
    assert sorted(p.name for p in (tmp_path / "only").rglob("*") if p.is_file()) == [
        storage.MANIFEST,
        "c.json",
    ]
    assert only == manifest
    with pytest.raises(storage.ObjectNotFoundError, match="has no nope"):
        storage.read_prefix(uri, tmp_path / "none", files=["nope"])
    # copy_tree: a plain copy, either direction.
    copied = storage.copy_tree(uri, storage.join_uri(root, "copy"))
    assert copied == sorted([storage.MANIFEST, "a.txt", "sub/b.bin", "sub/deeper/c.json"])
    storage.copy_tree(storage.join_uri(root, "copy"), tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.bin").read_bytes() == (
        src / "sub" / "b.bin"
    ).read_bytes()


def test_prefix_without_manifest_is_refused(root, tmp_path):
    uri = storage.join_uri(root, "half")
    storage.write_bytes(storage.join_uri(uri, "weights.bin"), b"w" * 10)
    assert not storage.is_complete(uri)
    with pytest.raises(storage.IncompletePrefixError, match=r"half is incomplete"):
        storage.read_prefix(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overwriting_a_prefix_deletes_its_manifest_first(gcs_bucket, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _tree(src)
    uri = f"{gcs_bucket}/ckpt"
    storage.write_prefix(src, uri)
    (src / "a.txt").write_bytes(b"new alpha")
    calls = []
    real = storage.upload_file

    def upload_then_die(path, target, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed half-way through the second file
        return real(path, target, **kwargs)

    monkeypatch.setattr(storage, "upload_file", upload_then_die)
    with pytest.raises(KeyboardInterrupt):
        storage.write_prefix(src, uri)
    assert not storage.is_complete(uri)  # the old manifest no longer vouches for mixed files


def test_resumable_upload_of_a_large_file(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "RESUMABLE_THRESHOLD", 256 * 1024)
    monkeypatch.setattr(storage, "CHUNK_SIZE", 256 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(700_000))  # three chunks
    sums = storage.upload_file(big, f"{gcs_bucket}/big.bin", create_only=True)
    assert sums["size"] == 700_000
    got = storage.download_file(f"{gcs_bucket}/big.bin", tmp_path / "got.bin")
    assert got.read_bytes() == big.read_bytes()
    # create_only: the same content again is a no-op, other content is refused.
    storage.upload_file(big, f"{gcs_bucket}/big.bin", create_only=True)
    (tmp_path / "other.bin").write_bytes(b"other")
    # The emulator does not enforce generation preconditions, so only the local path can
    # show the refusal; on GCS the server answers 412 and the same check runs.
    storage.upload_file(big, tmp_path / "dst.bin", create_only=True)
    with pytest.raises(storage.ConcurrentUpdateError, match="other content"):
        storage.upload_file(tmp_path / "other.bin", tmp_path / "dst.bin", create_only=True)


def test_corrupted_object_is_detected(gcs_emulator, gcs_bucket, tmp_path):
    src = tmp_path / "src"
    _tree(src)
    uri = f"{gcs_bucket}/model"
    storage.write_prefix(src, uri)
    stored = gcs_emulator.object_path(f"{uri}/sub/b.bin")
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF  # a bit flip at rest, behind the server's back
    stored.write_bytes(bytes(data))
    with pytest.raises(storage.ChecksumError, match=r"model/sub/b\.bin"):
        storage.read_bytes(f"{uri}/sub/b.bin")
    with pytest.raises(storage.ChecksumError, match=r"model/sub/b\.bin"):
        storage.read_prefix(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(storage.ChecksumError):
        storage.download_file(f"{uri}/sub/b.bin", tmp_path / "b.bin")
    assert not (tmp_path / "b.bin").exists()


def test_manifest_mismatch_is_detected_locally(tmp_path):
    src = tmp_path / "src"
    _tree(src)
    storage.write_prefix(src, tmp_path / "pub")
    (tmp_path / "pub" / "a.txt").write_bytes(b"alphA")  # same size, other bytes
    with pytest.raises(storage.ChecksumError, match=r"a\.txt has md5"):
        storage.read_prefix(tmp_path / "pub", tmp_path / "out")


def test_hostile_manifest_paths_are_refused(tmp_path):
    (tmp_path / "pub").mkdir()
    manifest = {"format": storage.MANIFEST_FORMAT, "files": []}
    manifest["files"].append({"path": "../escape", "size": 1, "md5": "x", "crc32c": "y"})
    (tmp_path / "pub" / storage.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(storage.StorageError, match=r"invalid file name '\.\./escape'"):
        storage.read_prefix(tmp_path / "pub", tmp_path / "out")


def test_missing_bucket_object_and_folder_errors_name_the_uri(gcs_emulator, gcs_bucket, tmp_path):
    with pytest.raises(storage.ObjectNotFoundError, match=r"gs://no-such-bucket-x1/a: bucket"):
        storage.read_bytes("gs://no-such-bucket-x1/a")
    with pytest.raises(storage.ObjectNotFoundError, match=r"bucket 'no-such-bucket-x1'"):
        storage.list_uri("gs://no-such-bucket-x1/prefix")
    with pytest.raises(storage.ObjectNotFoundError, match=rf"No such object: {gcs_bucket}/nope"):
        storage.read_bytes(f"{gcs_bucket}/nope")
    with pytest.raises(FileNotFoundError, match=r"No such file or folder: .*nope"):
        storage.read_bytes(tmp_path / "nope")
    assert storage.list_uri(f"{gcs_bucket}/empty") == []
    with pytest.raises(storage.ObjectNotFoundError, match="No such folder"):
        storage.list_uri(tmp_path / "nope")


def test_permission_errors_name_the_uri_and_the_credentials(gcs_bucket, monkeypatch):
    from google.api_core import exceptions as api

    def forbidden(self, *args, **kwargs):
        raise api.Forbidden("caller does not have storage.objects.get access")

    monkeypatch.setattr("google.cloud.storage.blob.Blob.download_to_file", forbidden)
    with pytest.raises(storage.StoragePermissionError, match=rf"read {gcs_bucket}/x: .*access"):
        storage.read_bytes(f"{gcs_bucket}/x")
    with pytest.raises(PermissionError, match="Workload Identity"):
        storage.read_bytes(f"{gcs_bucket}/x")


def test_transient_errors_are_retried(gcs_bucket, monkeypatch):
    import requests

    storage.write_bytes(f"{gcs_bucket}/flaky", b"payload")
    http = storage._gcs_client()._http
    real = http.request
    failures = []

    def flaky(method, url, *args, **kwargs):
        if "alt=media" in url and len(failures) < 2:  # the download answers 503, twice
            failures.append(url)
            response = requests.Response()
            response.status_code, response._content, response.url = 503, b"busy", url
            response.request = requests.Request(method, url).prepare()
            return response
        return real(method, url, *args, **kwargs)

    monkeypatch.setattr(http, "request", flaky)
    monkeypatch.setattr("google.api_core.retry.retry_unary.time.sleep", lambda seconds: None)
    assert storage.read_bytes(f"{gcs_bucket}/flaky") == b"payload"
    assert len(failures) == 2


def test_compare_and_swap_local(tmp_path):
    pointer = tmp_path / "p.json"
    data, token = storage.read_with_token(pointer)
    assert data is None and token == "0"
    token1 = storage.compare_and_swap(pointer, b"one", token)
    with pytest.raises(storage.ConcurrentUpdateError, match="changed since it was read"):
        storage.compare_and_swap(pointer, b"two", token)  # stale token
    assert pointer.read_bytes() == b"one"
    storage.compare_and_swap(pointer, b"two", token1)
    assert storage.read_with_token(pointer) == (b"two", storage._sha256(b"two"))


def test_compare_and_swap_gcs_uses_generations(gcs_bucket):
    uri = f"{gcs_bucket}/p.json"
    data, token = storage.read_with_token(uri)
    assert data is None and token == "0"
    token1 = storage.compare_and_swap(uri, b"one", token)
    data, token2 = storage.read_with_token(uri)
    assert data == b"one" and token2 == token1 and int(token1) > 0


def test_compare_and_swap_gcs_precondition_failure_is_a_conflict(gcs_bucket, monkeypatch):
    # The emulator does not enforce if_generation_match; a real server's 412 looks like this.
    from google.api_core import exceptions as api

    uri = f"{gcs_bucket}/p.json"
    _, token = storage.read_with_token(uri)
    storage.compare_and_swap(uri, b"theirs", token)
    seen = {}

    def precondition_failed(self, *args, **kwargs):
        seen["if_generation_match"] = kwargs.get("if_generation_match")
        raise api.PreconditionFailed("conditionNotMet")

    monkeypatch.setattr("google.cloud.storage.blob.Blob.upload_from_file", precondition_failed)
    with pytest.raises(storage.ConcurrentUpdateError, match=r"p\.json changed"):
        storage.compare_and_swap(uri, b"mine", token)
    assert seen["if_generation_match"] == int(token) == 0


def test_killed_upload_leaves_nothing_readers_accept(gcs_emulator, gcs_bucket, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"part-{i:02d}.bin").write_bytes(os.urandom(20_000))
    uri = f"{gcs_bucket}/model/v1"
    marker = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        import pathlib
        from cycleprune import storage
        real = storage.upload_file
        def slow(path, target, **kwargs):
            out = real(path, target, **kwargs)
            pathlib.Path({str(marker)!r}).touch()
            import time; time.sleep(0.2)
            return out
        storage.upload_file = slow
        storage.write_prefix({str(src)!r}, {uri!r})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, "the uploader finished or died before being killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        process.kill()
    finally:
        process.wait(timeout=30)
    uploaded = storage.list_uri(uri)
    assert 0 < len(uploaded) < 40 and storage.MANIFEST not in uploaded
    assert not storage.is_complete(uri)
    with pytest.raises(storage.IncompletePrefixError):
        storage.read_prefix(uri, tmp_path / "out")
