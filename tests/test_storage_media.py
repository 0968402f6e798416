"""The S3-compatible media store against a local S3 emulator (moto's server on 127.0.0.1):
objects in, found, out; keys it did not make refused; an upload through the app lands there."""

from __future__ import annotations

import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

from powerbank.http.app import create_app
from powerbank.http.testing import TEST_AUTH_POLICY, client_for, sign_up
from powerbank.storage.media import S3Store, build_media_store

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture(scope="module")
def s3_endpoint():
    from powerbank.demo import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"media-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


async def test_objects_go_in_are_found_and_go_out(s3_endpoint, bucket, tmp_path):
    store = build_media_store(tmp_path, {"MEDIA_STORE": "s3", "S3_BUCKET": bucket, "S3_ENDPOINT_URL": s3_endpoint, "S3_PREFIX": "app"})
    assert isinstance(store, S3Store)
    key = f"avatar/{uuid.uuid4()}.png"
    assert not await store.exists(key)
    await store.put(key, PNG, "image/png")
    assert await store.exists(key)
    stored = store.client.get_object(Bucket=bucket, Key=f"app/{key}")
    assert stored["Body"].read() == PNG and stored["ContentType"] == "image/png"
    await store.delete(key)
    await store.delete(key)  # a retried delete is fine
    assert not await store.exists(key)
    with pytest.raises(ValueError):
        await store.put("../../etc/passwd", PNG, "image/png")


async def test_an_upload_through_the_app_lands_in_the_bucket(s3_endpoint, bucket, app_services):
    store = S3Store(bucket, endpoint_url=s3_endpoint, region="us-east-1")
    async with client_for(create_app(app_services, auth_policy=TEST_AUTH_POLICY, media_store=store)) as client:
        headers, _ = await sign_up(client, "+9779819000001")
        response = await client.post("/api/app/upload", headers=headers, files={"file": ("a.png", PNG, "image/png")}, data={"purpose": "avatar"})
    assert response.status_code == 201, response.text
    keys = [item["Key"] for item in store.client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 1 and keys[0].startswith("avatar/") and keys[0].endswith(".png")
