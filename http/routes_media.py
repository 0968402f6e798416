"""POST /api/app/upload: a person's photo or document (avatar, KYC document, issue photo).

Limits are checked before anything is stored: the body may not exceed `MAX_UPLOAD_BYTES` (plus
the multipart envelope), the declared type must be allowed for the purpose, and the first bytes
must really be that type (a renamed executable is refused). The bytes go to the `MediaStore`
(local disk by default, storage/media.py), then the row is committed; a failed commit deletes the
file again, so no row ever points at a missing file.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from litestar import Controller, Request, post
from litestar.datastructures import State, UploadFile
from litestar.enums import RequestEncodingType
from litestar.params import Body

from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas_app import MediaView
from powerbank.storage.media import MediaStore
from powerbank.storage.models import MediaUpload
from powerbank.storage.types import new_id, utcnow

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 16 * 1024
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
ALLOWED_TYPES = {
    "avatar": IMAGE_TYPES,
    "kyc": (*IMAGE_TYPES, "application/pdf"),
    "station_issue": IMAGE_TYPES,
    "rental_issue": IMAGE_TYPES,
}
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "application/pdf": "pdf"}

MediaPurpose = Literal["avatar", "kyc", "station_issue", "rental_issue"]


# --- pure decisions ---------------------------------------------------------------------------


def sniff_content_type(head: bytes) -> str | None:
    """The type the first bytes prove, whatever the client declared."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    return None


def upload_refusal(purpose: str, declared_type: str, size_bytes: int, head: bytes) -> ApiError | None:
    """Why an upload is refused, or None: empty or too large (413), a type the purpose does not
    take, or bytes that are not the declared type (415)."""
    if size_bytes == 0:
        return ApiError(400, "file_empty", "the file is empty")
    if size_bytes > MAX_UPLOAD_BYTES:
        return ApiError(413, "file_too_large", f"at most {MAX_UPLOAD_BYTES} bytes", max_bytes=MAX_UPLOAD_BYTES)
    allowed = ALLOWED_TYPES[purpose]
    declared = declared_type.split(";")[0].strip().lower()
    if declared not in allowed:
        return ApiError(415, "unsupported_media_type", f"{purpose} takes {', '.join(allowed)}", allowed=list(allowed))
    if sniff_content_type(head) != declared:
        return ApiError(415, "content_mismatch", f"the file is not a valid {declared}", allowed=list(allowed))
    return None


def storage_key(purpose: str, media_id: uuid.UUID, content_type: str) -> str:
    return f"{purpose}/{media_id}.{EXTENSIONS[content_type]}"


# --- the flow ---------------------------------------------------------------------------------


@dataclass
class UploadForm:
    file: UploadFile
    purpose: MediaPurpose = "avatar"


def media_store_of(state: State) -> MediaStore:
    return state.media_store


async def store_upload(state: State, user_id: uuid.UUID, form: UploadForm) -> MediaView:
    data = await form.file.read(MAX_UPLOAD_BYTES + 1)
    refusal = upload_refusal(form.purpose, form.file.content_type or "", len(data), data[:16])
    if refusal is not None:
        raise refusal
    content_type = sniff_content_type(data[:16]) or ""
    media_id = new_id()
    row = MediaUpload(
        id=media_id, user_id=user_id, purpose=form.purpose, content_type=content_type, size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), storage_key=storage_key(form.purpose, media_id, content_type),
        created_at=utcnow(),
    )
    store = media_store_of(state)
    await store.put(row.storage_key, data, content_type)
    try:
        async with services_of(state).sessions.begin() as session:
            session.add(row)
    except BaseException:
        await store.delete(row.storage_key)
        raise
    return MediaView(
        id=row.id, purpose=row.purpose, content_type=row.content_type, size_bytes=row.size_bytes,
        sha256=row.sha256, created_at=row.created_at,
    )


class MediaController(Controller):
    path = "/api/app"
    tags = ["app"]
    security = BEARER_SECURITY

    @post(
        "/upload",
        status_code=201,
        request_max_body_size=MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES,
        responses=error_responses(400, 401, 413, 415),
    )
    async def upload(
        self,
        state: State,
        request: Request,
        data: Annotated[UploadForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    ) -> MediaView:
        """Upload one file as multipart form data (`file`, `purpose`). At most 5 MiB; avatars and
        issue photos take JPEG, PNG or WebP, KYC also PDF. Refusals: 413 `file_too_large`,
        415 `unsupported_media_type` or `content_mismatch`. Use the returned id in KYC, profile
        or issue reports."""
        return await store_upload(state, request.user.id, data)
