"""Storage URIs without a server: what is refused before anything is contacted.

(The S3 paths against a real S3 server — credentials, endpoint, bucket — are in tests/e2e.)
"""

from __future__ import annotations

import pytest

from ddray.store.storage import check_uri, filesystem, join, where


@pytest.mark.parametrize("uri, what", [
    ("s3://key:secret@bucket/run", "user:password"),
    ("s3://bucket/run?access_key=AKIA&secret_key=x", "credentials (access_key, secret_key)"),
    ("gs://bucket/run?session_token=t", "credentials (session_token)"),
])
def test_uris_that_carry_credentials_are_refused_without_echoing_them(uri: str, what: str) -> None:
    with pytest.raises(ValueError, match=r"--storage: the URI holds") as e:
        check_uri(uri)
    assert what in str(e.value)
    assert "secret" not in str(e.value).replace("AWS_SECRET_ACCESS_KEY", "").replace("secret_key", "")


def test_missing_keys_name_the_secret_they_come_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDRAY_S3_KEYS_FROM", "ddray-s3-credentials")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ddray")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ValueError) as e:
        filesystem("s3://ddray/run-1")
    msg = str(e.value)
    assert msg.startswith("--storage s3://ddray/run-1 (S3 endpoint http://minio.example:9000): no S3 credentials")
    assert "AWS_SECRET_ACCESS_KEY not set" in msg and "'ddray-s3-credentials'" in msg and "\n" not in msg


def test_endpoint_and_path_style_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    fs, path = filesystem("s3://ddray/ddray-distill/run-1/")
    assert path == "ddray/ddray-distill/run-1" and fs.type_name == "s3"
    assert where("s3://ddray/x") == "s3://ddray/x (S3 endpoint http://minio.example:9000)"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.example:9000")
    with pytest.raises(ValueError, match="is not http\\(s\\)://HOST\\[:PORT\\]"):
        filesystem("s3://ddray/x")


def test_join_keeps_uris_and_paths_apart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert join("s3://b/p/", "x") == "s3://b/p/x"
    assert join(tmp_path, "x") == tmp_path / "x"


def test_tracking_uri_with_a_password_is_refused() -> None:
    from ddray.tracking.tracker import TrackingUnavailable, check_tracking_reachable

    with pytest.raises(TrackingUnavailable, match="user:password part") as e:
        check_tracking_reachable("http://ddray:hunter2-secret@127.0.0.1:9/")
    assert "hunter2" not in str(e.value)
