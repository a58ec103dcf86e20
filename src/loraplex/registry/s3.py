"""The S3-compatible blob store (AWS S3, MinIO, moto...), through boto3.

``LORAPLEX_BLOB_URL=s3://bucket/prefix`` selects it; ``LORAPLEX_S3_ENDPOINT_URL`` points it at
a non-AWS server. Credentials come from boto3's usual chain (environment, profile, role).
Blobs are keyed ``prefix/sha256/ab/<digest>`` and written once. Connects and reads time out
after ``timeout`` seconds and a whole download after ``fetch_timeout``; any failure on the
way (an error status, a truncated or corrupt body, a stalled connection) is ``Unavailable``.
Only storage lives here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidRequest, NotFound, Unavailable
from loraplex.registry.blobs import blob_key, copy_verified, is_digest, sha256_file

_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    """Blobs as objects in one bucket under a prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        timeout: float = 10.0,
        fetch_timeout: float = 120.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.fetch_timeout = fetch_timeout
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None, **timeouts: float) -> S3BlobStore:
        """Parse ``s3://bucket[/prefix]``; ``timeouts``: ``timeout``, ``fetch_timeout``."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise InvalidRequest(f"Blob URL {url!r} names no bucket; use s3://bucket/prefix.")
        return cls(bucket, prefix, endpoint_url, **timeouts)

    def _key(self, digest: str) -> str:
        key = blob_key(digest)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, digest: str, source: Path) -> None:
        if self.exists(digest):
            self._call(  # a copy onto itself refreshes LastModified (see adapters gc)
                self.client.copy_object,
                Bucket=self.bucket,
                Key=self._key(digest),
                CopySource={"Bucket": self.bucket, "Key": self._key(digest)},
                Metadata={"sha256": digest},
                MetadataDirective="REPLACE",
            )
            return
        if sha256_file(source) != digest:
            raise InvalidRequest(f"{source} changed while it was being stored; push it again.")
        self._call(
            self.client.upload_file,
            str(source),
            self.bucket,
            self._key(digest),
            ExtraArgs={"Metadata": {"sha256": digest}},
        )

    def get(self, digest: str, dest: Path) -> None:
        deadline = time.monotonic() + self.fetch_timeout
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
            if _is_missing(exc):
                raise NotFound(f"Blob {digest[:12]} is missing from {self.url}.") from None
            raise Unavailable(f"Cannot read {self.url}: {exc}; retry later.") from exc
        try:
            with response["Body"] as body:
                copy_verified(body, dest, digest, deadline, response.get("ContentLength"))
        except Unavailable as exc:
            raise Unavailable(f"Reading from {self.url}: {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001 - truncated body, read timeout, reset...
            raise Unavailable(
                f"Reading blob {digest[:12]} from {self.url} failed: {exc}; retry later."
            ) from exc

    def exists(self, digest: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except Exception as exc:  # noqa: BLE001
            if _is_missing(exc):
                return False
            raise Unavailable(f"Cannot reach {self.url}: {exc}") from exc
        return True

    def delete(self, digest: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(digest))

    def stored(self) -> Iterator[tuple[str, float]]:
        root = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    digest = item["Key"].rsplit("/", 1)[-1]
                    if is_digest(digest) and item["Key"] == self._key(digest):
                        yield digest, item["LastModified"].timestamp()
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"Cannot list {self.url}: {exc}") from exc

    def stored_at(self, digest: str) -> float | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except Exception as exc:  # noqa: BLE001
            if _is_missing(exc):
                return None
            raise Unavailable(f"Cannot reach {self.url}: {exc}") from exc
        return head["LastModified"].timestamp()

    def check(self) -> None:
        self._call(self.client.head_bucket, Bucket=self.bucket)

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"S3 blob store {self.url} failed: {exc}") from exc


def _is_missing(exc: Exception) -> bool:
    """Whether a botocore error means 'no such object'."""
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("Code")) in _MISSING
