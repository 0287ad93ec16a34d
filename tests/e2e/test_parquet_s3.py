"""A Hugging Face-style Parquet data set in an S3 bucket, read through pyarrow's S3 filesystem and cached.

The bucket is served by ``rclone serve s3`` on 127.0.0.1 (:func:`servers.s3_server`); the
tables go in with boto3, as a user would upload them; ddray reads them with the
filesystem that :func:`ddray.store.storage.filesystem` makes from the AWS_* environment.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.config import Config
from PIL import Image

from ddray.data import parquet
from ddray.store.storage import filesystem
from servers import S3_CLIENT_COMPAT, s3_server

pytestmark = pytest.mark.e2e

KEY, SECRET, BUCKET = "ddray-data", "ddray-data-secret", "datasets"
NAMES = ["cat", "dog", "emu"]


def _table(pixels: np.ndarray, labels: list[int]) -> bytes:
    """An HF ``datasets`` Parquet file: Image feature as {bytes, path}, ClassLabel names in the metadata."""
    blobs = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        blobs.append({"bytes": buf.getvalue(), "path": None})
    features = {"image": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}
    table = pa.table({"image": pa.array(blobs, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels, pa.int64())})
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def test_hf_parquet_in_a_bucket_loads_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8), rng.integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    y_train, y_test = [0, 1, 2, 2, 1, 0], [2, 0, 1]
    with s3_server([(KEY, SECRET)], [BUCKET]) as s3:
        for name, value in {**S3_CLIENT_COMPAT, "AWS_ENDPOINT_URL_S3": s3.url, "AWS_ACCESS_KEY_ID": KEY,
                            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                              region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
        client.put_object(Bucket=BUCKET, Key="mini/data/train-00000-of-00001.parquet", Body=_table(train, y_train))
        client.put_object(Bucket=BUCKET, Key="mini/data/test-00000-of-00001.parquet", Body=_table(test, y_test))
        assert s3.objects(BUCKET) == ["mini/data/test-00000-of-00001.parquet",
                                      "mini/data/train-00000-of-00001.parquet"]

        calls = []
        load = parquet._load
        monkeypatch.setattr(parquet, "_load", lambda *a, **k: calls.append(1) or load(*a, **k))
        fs, path = filesystem(f"s3://{BUCKET}/mini", "--data-root")
        assert path == f"{BUCKET}/mini"
        data = parquet.load_parquet_cached(path, filesystem=fs, cache_dir=tmp_path / "cache")
        again = parquet.load_parquet_cached(path, filesystem=fs, cache_dir=tmp_path / "cache")

        with pytest.raises(ValueError, match=f"^--data-root: {BUCKET}/nothing-here does not exist$"):
            parquet.load_parquet_cached(f"{BUCKET}/nothing-here", filesystem=fs, cache_dir=tmp_path / "cache")

    assert data.classes == tuple(NAMES)
    np.testing.assert_array_equal(data.x_train, train.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data.x_test, test.transpose(0, 3, 1, 2))
    assert data.y_train.tolist() == y_train and data.y_test.tolist() == y_test
    assert calls == [1]  # the second load read the cache
    np.testing.assert_array_equal(again.x_train, data.x_train)
    assert again.classes == data.classes
