"""POST /api/app/upload: limits on size and type, the local-disk store, the row."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlalchemy import func, select

from powerbank.http.routes_media import MAX_UPLOAD_BYTES, sniff_content_type, upload_refusal
from powerbank.http.testing import sign_up
from powerbank.storage.media import LocalDiskStore, build_media_store
from powerbank.storage.models import MediaUpload

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
PDF = b"%PDF-1.7\n" + b"\x00" * 64


def test_sniffing_trusts_bytes_not_names():
    assert sniff_content_type(PNG) == "image/png"
    assert sniff_content_type(JPEG) == "image/jpeg"
    assert sniff_content_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_content_type(b"MZ\x90\x00") is None


def test_refusals():
    assert upload_refusal("avatar", "image/png", len(PNG), PNG) is None
    assert upload_refusal("kyc", "application/pdf", len(PDF), PDF) is None
    assert upload_refusal("avatar", "application/pdf", len(PDF), PDF).error == "unsupported_media_type"
    assert upload_refusal("avatar", "image/png", len(JPEG), JPEG).error == "content_mismatch"
    assert upload_refusal("avatar", "image/png", MAX_UPLOAD_BYTES + 1, PNG).status_code == 413
    assert upload_refusal("avatar", "image/png", 0, b"").error == "file_empty"


def test_local_store_refuses_keys_it_did_not_make(tmp_path):
    store = LocalDiskStore(tmp_path)
    with pytest.raises(ValueError):
        store.path_of("../etc/passwd")
    assert isinstance(build_media_store(tmp_path, {}), LocalDiskStore)
    with pytest.raises(ValueError):
        build_media_store(tmp_path, {"MEDIA_STORE": "s3"})  # no bucket
    with pytest.raises(ValueError):
        build_media_store(tmp_path, {"MEDIA_STORE": "ftp"})


async def upload(client, headers, data: bytes, content_type: str, purpose: str = "avatar"):
    return await client.post(
        "/api/app/upload", headers=headers, files={"file": ("x.bin", data, content_type)}, data={"purpose": purpose}
    )


async def test_upload_stores_the_file_and_a_row(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779815000001")
    response = await upload(app_client, headers, PNG, "image/png")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["content_type"] == "image/png" and body["size_bytes"] == len(PNG)
    assert body["sha256"] == hashlib.sha256(PNG).hexdigest()
    async with app_services.sessions() as session:
        row = await session.get(MediaUpload, uuid.UUID(body["id"]))
    assert row.user_id == user_id and row.purpose == "avatar"
    path = app_services.settings.data_dir / "media" / row.storage_key
    assert path.read_bytes() == PNG


async def test_upload_refuses_size_and_type(app_client, app_services):
    headers, _ = await sign_up(app_client, "+9779815000002")
    too_big = await upload(app_client, headers, PNG + b"\x00" * MAX_UPLOAD_BYTES, "image/png")
    assert too_big.status_code == 413 and too_big.json()["error"] == "file_too_large"
    pdf_avatar = await upload(app_client, headers, PDF, "application/pdf")
    assert pdf_avatar.status_code == 415 and pdf_avatar.json()["error"] == "unsupported_media_type"
    disguised = await upload(app_client, headers, b"MZ\x90\x00" * 20, "image/png")
    assert disguised.status_code == 415 and disguised.json()["error"] == "content_mismatch"
    bad_purpose = await upload(app_client, headers, PNG, "image/png", purpose="selfie-video")
    assert bad_purpose.status_code == 400
    async with app_services.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(MediaUpload)) == 0
    assert not list((app_services.settings.data_dir / "media").rglob("*.*"))


async def test_kyc_takes_pdf_and_upload_needs_a_token(app_client):
    headers, _ = await sign_up(app_client, "+9779815000003")
    assert (await upload(app_client, headers, PDF, "application/pdf", purpose="kyc")).status_code == 201
    anonymous = await upload(app_client, {}, PNG, "image/png")
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
