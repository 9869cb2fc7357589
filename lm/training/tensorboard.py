"""TensorBoard scalar event files without TensorFlow: the trainer process never imports it.

An event file is a TFRecord stream of `Event` protos (tensorboard ships the protos); each record
is `uint64 length, masked crc32c(length), data, masked crc32c(data)`. The file is rewritten whole
on each flush through the storage layer, because object stores cannot append.
"""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid

import google_crc32c
from tensorboard.compat.proto import event_pb2, summary_pb2

from lm import storage


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


class EventWriter:
    """Scalars to `<logdir>/events.out.tfevents.<time>.<host>.<pid>.<random>`, readable by
    TensorBoard. The name is unique per writer, so a run resumed within the same second (or
    another writer of the same logdir) never overwrites an earlier file."""

    def __init__(self, logdir: str):
        now = time.time()
        unique = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{unique}"
        self.path = storage.join(logdir, name)
        version = event_pb2.Event(wall_time=now, file_version="brain.Event:2")
        self._data = bytearray(tfrecord(version.SerializeToString()))

    def scalars(self, step: int, values: dict[str, float], wall_time: float) -> None:
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        event = event_pb2.Event(wall_time=wall_time, step=step, summary=summary)
        self._data += tfrecord(event.SerializeToString())
        storage.write_bytes(self.path, bytes(self._data))

    def close(self) -> None:
        storage.write_bytes(self.path, bytes(self._data))
