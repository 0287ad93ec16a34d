"""Storage URIs (``--storage``, Tune's ``storage_path``) → a pyarrow filesystem, with errors for people.

Any URI pyarrow understands works (``file://``, ``s3://``, ``gs://``, ``hdfs://``,
``abfs://``, …). ``s3://BUCKET/PREFIX`` gets the settings an S3-compatible server
(MinIO, Ceph, …) needs, all from the environment, never from the URI:

* the endpoint: ``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL`` (unset: AWS itself);
* path-style addressing (``http://endpoint/bucket/key``), which such servers expect;
* credentials: ``$AWS_ACCESS_KEY_ID`` / ``$AWS_SECRET_ACCESS_KEY`` (else AWS's own
  chain: web identity, instance profile, …); the region: ``$AWS_REGION`` /
  ``$AWS_DEFAULT_REGION``, default ``us-east-1``.

On Kubernetes the credentials come from a Secret. ``$DDRAY_S3_KEYS_FROM`` names it (the
ConfigMap ``ddray-env`` sets it), so that an error can say which Secret to check.
A URI that carries credentials itself (``user:pass@``, ``?secret_key=``) is refused:
URIs end up in configs, logs and MLflow params.

Every failure — bad URI, missing or wrong credentials, endpoint unreachable, no such
bucket — is a one-line :class:`ValueError` naming the URI and the endpoint, never a
traceback from inside pyarrow. :func:`storage_error` turns pyarrow's ``OSError``\\ s
into those.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SECRET_ENV = "DDRAY_S3_KEYS_FROM"  # the Kubernetes Secret the S3 keys come from (named in messages)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# URI query keys that would put a credential into a config / log line
CREDENTIAL_QUERY_KEYS = ("access_key", "secret_key", "session_token")
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0

# pyarrow/AWS error fragments → what they mean for the user
_DENIED = ("SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "ACCESS_DENIED", "InvalidAccessKeyId",
           "SignatureDoesNotMatch", "AccessDenied", "HTTP status 403", "HTTP status 401")
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Could not resolve", "Timeout was reached")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket does not exist")


def is_uri(location: object) -> bool:
    """True for ``scheme://…`` locations (handled by pyarrow.fs), False for plain paths."""
    return isinstance(location, str) and "://" in location


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def where(uri: str) -> str:
    """``uri`` plus the server it goes to, for messages: ``s3://b/x (S3 endpoint http://minio:9000)``."""
    if uri.startswith("s3://"):
        return f"{uri} (S3 endpoint {s3_endpoint() or 'AWS'})"
    return uri


def _credentials_hint() -> str:
    secret = os.environ.get(SECRET_ENV)
    keys = " and ".join(CREDENTIAL_ENV)
    if secret:
        return f"{keys} come from the Secret {secret!r}: check that it exists and holds both keys"
    return f"set {keys}"


def check_uri(uri: str, option: str = "--storage") -> None:
    """Refuse a URI that embeds credentials (they would be printed and logged with it)."""
    parts = urlsplit(uri)
    leaked = [k for k in parse_qs(parts.query) if k.lower() in CREDENTIAL_QUERY_KEYS]
    if parts.password or leaked:
        what = "a user:password part" if parts.password else f"credentials ({', '.join(leaked)})"
        raise ValueError(f"{option}: the URI holds {what}; remove them and set "
                         f"{' / '.join(CREDENTIAL_ENV)} in the environment instead (a Secret on Kubernetes)")


def _s3(uri: str, option: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    if not parts.netloc:
        raise ValueError(f"{option} {uri}: expected s3://BUCKET[/PREFIX]")
    have = [k for k in CREDENTIAL_ENV if os.environ.get(k)]
    if os.environ.get(SECRET_ENV) and len(have) < len(CREDENTIAL_ENV):
        missing = [k for k in CREDENTIAL_ENV if k not in have]
        raise ValueError(f"{option} {where(uri)}: no S3 credentials ({', '.join(missing)} not set); "
                         f"{_credentials_hint()}")
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
        "force_virtual_addressing": False,  # path style: http://endpoint/bucket/key
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise ValueError(f"{option} {uri}: the S3 endpoint {endpoint!r} (AWS_ENDPOINT_URL) is not "
                             "http(s)://HOST[:PORT]")
        kwargs.update(endpoint_override=ep.netloc, scheme=ep.scheme)
    if len(have) == len(CREDENTIAL_ENV):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                      session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    path = (parts.netloc + parts.path).rstrip("/")
    return pafs.S3FileSystem(**kwargs), path


def filesystem(uri: str, option: str = "--storage") -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for ``uri``; a ValueError naming the URI otherwise."""
    import pyarrow.fs as pafs

    check_uri(uri, option)
    if uri.startswith("s3://") and not urlsplit(uri).query:  # with ?endpoint_override=…: as pyarrow says
        return _s3(uri, option)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, … depending on the scheme
        raise ValueError(f"{option} {uri}: not a usable filesystem URI ({_first_line(e)})") from None
    return fs, path.rstrip("/")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def storage_error(uri: str, e: BaseException, doing: str, option: str = "--storage") -> ValueError:
    """A one-line ValueError for a pyarrow error ``e`` raised while ``doing`` something at ``uri``."""
    text = str(e)
    if any(s in text for s in _DENIED):
        return ValueError(f"{option} {where(uri)}: the server refused the credentials while {doing}; "
                          f"{_credentials_hint()}, with a key that may use this bucket")
    if any(s in text for s in _UNREACHABLE):
        return ValueError(f"{option} {where(uri)}: the endpoint is unreachable while {doing}; "
                          "check AWS_ENDPOINT_URL and that the S3 server runs and admits this pod")
    if any(s in text for s in _NO_BUCKET):
        return ValueError(f"{option} {where(uri)}: the bucket does not exist; create it first")
    return ValueError(f"{option} {where(uri)}: {doing} failed ({_first_line(e)})")


# ----------------------------------------------------------------------------- small files at a location


def join(location: str | Path, name: str) -> str | Path:
    """``location/name`` for a path or a URI."""
    return f"{str(location).rstrip('/')}/{name}" if is_uri(location) else Path(location) / name


def read_text(location: str | Path, option: str = "--storage-path") -> str | None:
    """The text of the file at ``location`` (path or URI), or None if there is none."""
    if not is_uri(location):
        p = Path(location)
        return p.read_text() if p.is_file() else None
    uri = str(location)
    fs, path = filesystem(uri, option)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode()
    except FileNotFoundError:
        return None
    except OSError as e:
        if "NoSuchKey" in str(e) or "NOT_FOUND" in str(e).upper() or "does not exist" in str(e):
            return None
        raise storage_error(uri, e, "reading it", option) from None


def write_text(location: str | Path, text: str, option: str = "--storage-path") -> None:
    """Write ``text`` to the file at ``location`` (path or URI; parents created as needed)."""
    write_bytes(location, text.encode(), option)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to the local file ``path`` whole or not at all: a temporary file beside it, flushed to disk,
    renamed into place (parents created as needed). The one atomic write of the package."""
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=p.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(location: str | Path, data: bytes, option: str = "--storage-path") -> None:
    """Write ``data`` to the file at ``location`` (path or URI; parents created as needed; a local file
    atomically, an object store's object is whole once written)."""
    if not is_uri(location):
        write_atomic(location, data)
        return
    uri = str(location)
    fs, path = filesystem(uri, option)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise storage_error(uri, e, "writing it", option) from None


def has_entries(location: str | Path, option: str = "--storage-path") -> bool:
    """Whether the directory (or URI prefix) ``location`` holds anything."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        p = Path(location)
        return p.is_dir() and any(p.iterdir())
    uri = str(location)
    fs, path = filesystem(uri, option)
    try:
        return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    except OSError as e:
        raise storage_error(uri, e, "listing it", option) from None


def without_directory_markers(fs: Any) -> Any:
    """``fs`` (an object store) as a pyarrow filesystem whose ``create_dir`` does nothing.

    Object stores have no directories: a key's prefix exists once an object under it does.
    pyarrow's S3 ``create_dir`` writes an empty ``prefix/`` marker object instead, which
    clutters the bucket and which some S3-compatible servers cannot store next to objects
    under that prefix (``rclone serve s3``). Ray Tune calls ``create_dir`` for every trial
    and checkpoint directory; this wrapper is what it gets for ``s3://`` storage paths.
    """
    import pyarrow.fs as pafs

    class Handler(pafs.FileSystemHandler):  # type: ignore[misc]
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def get_type_name(self) -> str:
            return f"{self.inner.type_name}-nomarkers"

        def equals(self, other: Any) -> bool:
            return isinstance(other, Handler) and self.inner.equals(other.inner)

        def normalize_path(self, path: str) -> str:
            return str(self.inner.normalize_path(path))

        def create_dir(self, path: str, recursive: bool) -> None:
            pass

        def get_file_info(self, paths: list[str]) -> Any:
            return self.inner.get_file_info(paths)

        def get_file_info_selector(self, selector: Any) -> Any:
            return self.inner.get_file_info(selector)

        def delete_dir(self, path: str) -> None:
            self.inner.delete_dir(path)

        def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
            self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self) -> None:
            raise OSError("refusing to delete a whole bucket store")

        def delete_file(self, path: str) -> None:
            self.inner.delete_file(path)

        def move(self, src: str, dest: str) -> None:
            self.inner.move(src, dest)

        def copy_file(self, src: str, dest: str) -> None:
            self.inner.copy_file(src, dest)

        def open_input_stream(self, path: str) -> Any:
            return self.inner.open_input_stream(path)

        def open_input_file(self, path: str) -> Any:
            return self.inner.open_input_file(path)

        def open_output_stream(self, path: str, metadata: Any) -> Any:
            return self.inner.open_output_stream(path, metadata=metadata)

        def open_append_stream(self, path: str, metadata: Any) -> Any:
            return self.inner.open_append_stream(path, metadata=metadata)

    return pafs.PyFileSystem(Handler(fs))
