"""The raw shard streams of the agent's data plane: a protobuf header, then unframed bytes.

``UploadRaw`` and ``DownloadRaw`` are the byte-path twins of ``Upload`` and ``Download`` in
``protos/gpupool/v1/agent.proto`` (which documents the contract). They are registered with identity
serializers, so a chunk crosses gRPC as the bytes of the array and nothing else: no protobuf framing, no
per-chunk parse or copy on either side. The first message of each stream, and the upload's reply, are
protobuf messages the peer encodes and parses by hand with the helpers here.
"""

from __future__ import annotations

from typing import Final, TypeVar

from google.protobuf.message import DecodeError, Message

from gpupool._errors import FrameDecodeError

__all__ = ["ACCEPTED", "DOWNLOAD_RAW", "SERVICE", "UPLOAD_RAW", "decode_message"]

#: The gRPC service both raw methods belong to (the generated ``Agent`` service's name).
SERVICE: Final = "gpupool.v1.Agent"
#: Stream-unary: a serialized ``UploadHeader``, then raw chunks; replies a serialized ``UploadReply``.
UPLOAD_RAW: Final = f"/{SERVICE}/UploadRaw"
#: Unary-stream: a serialized ``DownloadRequest``; answers a serialized ``ArrayMeta``, then raw chunks.
DOWNLOAD_RAW: Final = f"/{SERVICE}/DownloadRaw"

#: The initial metadata an agent sends once it has accepted an upload's header: the go-ahead for its data.
ACCEPTED: Final = ("gpupool-upload", "accepted")

M = TypeVar("M", bound=Message)


def decode_message(data: bytes, message_type: type[M], *, what: str) -> M:
    """Parse the protobuf message that opens (or answers) a raw stream.

    Raises:
        FrameDecodeError: ``data`` is not a ``message_type``.
    """
    try:
        return message_type.FromString(data)
    except (DecodeError, TypeError) as exc:
        raise FrameDecodeError(what, str(exc)) from exc
