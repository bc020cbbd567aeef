"""TFRecord framing: record offsets, CRC32C, and positioned reads of single records.

A TFRecord is `uint64 length | uint32 masked CRC32C(length) | data | uint32 masked
CRC32C(data)`. The P×K reader (`ish_tf.data.pipeline.pk_dataset`) and `bin/embed` find
a record by its byte offset (`record_offsets`, kept beside each uncompressed shard as
`.offsets.npy`) and check its framing before parsing, so a flipped byte or a truncated
shard is named (shard, record, byte offset) instead of being read silently.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np

from ish_tf.data.records import RecordsError
from ish_tf.io_utils import atomic_write_bytes

# TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC.
FRAMING_BYTES = 16
OFFSETS_SUFFIX = ".offsets.npy"


def offsets_path(shard_path: str) -> str:
    """The offsets sidecar of a shard: `<shard>.offsets.npy`."""
    return shard_path + OFFSETS_SUFFIX


def write_offsets(shard_path: str, offsets: np.ndarray) -> None:
    """Writes a shard's record byte offsets (int64, one per record plus the end) to its
    sidecar `<shard>.offsets.npy`, atomically."""
    buf = io.BytesIO()
    np.save(buf, offsets, allow_pickle=False)
    atomic_write_bytes(offsets_path(shard_path), buf.getvalue())


def scan_record_offsets(shard_path: str) -> np.ndarray:
    """Byte position of every record of an uncompressed shard, by reading its headers.

    Returns:
      int64 (N+1,): record i spans bytes [o[i], o[i+1]); o[N] is the file size.

    Raises:
      RecordsError: the shard is compressed or truncated.
    """
    from ish_tf.data.shards import compression_of  # shards imports this module

    if compression_of(shard_path):
        raise RecordsError(f"{shard_path}: compressed shards have no record offsets")
    from ish_tf import fs

    size = fs.getsize(shard_path)
    offsets = [0]
    with fs.open(shard_path, "rb") as f:
        pos = 0
        while pos < size:
            header = f.read(8)
            if len(header) < 8:
                raise RecordsError(f"{shard_path}: truncated record header at byte {pos}")
            (length,) = struct.unpack("<Q", header)
            pos += FRAMING_BYTES + length
            if pos > size:
                raise RecordsError(f"{shard_path}: record at byte {offsets[-1]} runs past the "
                                   "end of the file (truncated shard)")
            f.seek(pos)
            offsets.append(pos)
    return np.asarray(offsets, np.int64)


def record_offsets(shard_path: str) -> np.ndarray:
    """Byte positions of the records of an uncompressed shard (sidecar, else a scan).

    The sidecar written by `ShardWriter` is memory-mapped, so millions of offsets cost
    no load time; a missing or inconsistent sidecar falls back to
    `scan_record_offsets`.

    Returns:
      int64 (N+1,) as in `scan_record_offsets`.
    """
    side = offsets_path(shard_path)
    if os.path.exists(side):
        try:
            offsets = np.load(side, mmap_mode="r", allow_pickle=False)
            if (offsets.ndim == 1 and len(offsets) >= 1 and offsets[0] == 0
                    and int(offsets[-1]) == os.path.getsize(shard_path)):
                return offsets
        except (OSError, ValueError):
            pass
    return scan_record_offsets(shard_path)


# --------------------------------------------------------------------------- CRC32C
# TFRecord framing protects the length and the data each with a masked CRC32C
# (Castagnoli). Python has no CRC32C, so it is computed with numpy: the record is cut
# into lanes of `_CRC_LANE` bytes; one table gather gives every byte's contribution to
# its lane's CRC register (the CRC of zero-initialised data is linear in the bytes),
# an XOR over each lane gives the lanes' registers, and a second table carries each
# lane's register past the lanes after it. About 0.1 ms for a 33 kB record (a 256x256
# JPEG patch); see `crc32c`.
_CRC_POLY = 0x82F63B78
_CRC_LANE = 256


def _crc_byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint64)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ _CRC_POLY, t >> 1)
    return t.astype(np.uint32)


_CRC_TABLE = _crc_byte_table()
_CRC_TABLE_LIST = [int(v) for v in _CRC_TABLE]


def _crc_zero_bytes(register: np.ndarray, n: int) -> np.ndarray:
    """Registers carried through `n` zero bytes."""
    for _ in range(n):
        register = _CRC_TABLE[register & 0xFF] ^ (register >> 8)
    return register


def _crc_apply(columns: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The GF(2)-linear map with these 32 column images applied to every value of x."""
    bits = ((x[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool)
    return np.bitwise_xor.reduce(np.where(bits, columns, np.uint32(0)), axis=-1).astype(np.uint32)


def _crc_lane_table() -> np.ndarray:
    """(L*256,): the register after a lane whose byte k is v and every other byte 0."""
    table = np.empty((_CRC_LANE, 256), np.uint32)
    current = _CRC_TABLE.copy()  # a byte in the lane's last position: one step
    for k in range(_CRC_LANE - 1, -1, -1):
        table[k] = current
        current = _crc_zero_bytes(current, 1)
    return table.ravel()


_CRC_LANE_TABLE = _crc_lane_table()
_CRC_LANE_OFFSETS = np.arange(_CRC_LANE, dtype=np.intp) * 256
_CRC_BITS = np.uint32(1) << np.arange(32, dtype=np.uint32)
# _CRC_CARRY[d, j]: register bit j carried past d lanes of zero bytes (grown on demand).
_CRC_CARRY = np.stack([_CRC_BITS, _crc_zero_bytes(_CRC_BITS.copy(), _CRC_LANE)])


def _crc_carry(lanes: int) -> np.ndarray:
    global _CRC_CARRY
    carry = _CRC_CARRY  # one read: parallel readers may grow it meanwhile
    while len(carry) < lanes:
        n = len(carry)
        past_n = _crc_apply(carry[1], carry[n - 1])  # carry past n lanes
        carry = np.concatenate([carry, _crc_apply(past_n, carry)])
        _CRC_CARRY = carry
    return carry[:lanes]


def _crc32c_small(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE_LIST
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses it.

    Returns:
      The CRC as an int in [0, 2**32).
    """
    n = len(data)
    if n < 64:
        return _crc32c_small(data)
    lanes = -(-n // _CRC_LANE)
    # Zero bytes in front change nothing while the register is 0; the initial register
    # 0xFFFFFFFF is the same as inverting the first 4 bytes of the data.
    buf = np.zeros((lanes, _CRC_LANE), np.uint8)
    flat = buf.reshape(-1)
    pad = lanes * _CRC_LANE - n
    flat[pad:] = np.frombuffer(data, np.uint8)
    flat[pad:pad + 4] ^= 0xFF
    registers = np.bitwise_xor.reduce(_CRC_LANE_TABLE.take(buf + _CRC_LANE_OFFSETS), axis=1)
    bits = np.unpackbits(registers.view(np.uint8), bitorder="little").view(bool)
    carried = _crc_carry(lanes)[::-1][bits.reshape(lanes, 32)]
    return int(np.bitwise_xor.reduce(carried)) ^ 0xFFFFFFFF if carried.size else 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C TFRecord stores: `((crc >> 15) | (crc << 17)) + 0xa282ead8`."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def check_record_framing(raw: bytes, name: str = "<shard>", record: int | None = None,
                         start: int = 0) -> bytes:
    """Checks one framed TFRecord (length, masked CRC of the length, data, masked CRC of
    the data); returns the data.

    Args:
      raw: the framed record's bytes.
      name: the shard, for the error message.
      record: the record's number in the shard, for the error message.
      start: the record's byte offset in the shard, for the error message.

    Raises:
      RecordsError: naming the shard, the record and its byte offset.
    """
    where = f"{name}: record {'?' if record is None else record} at byte {start}"
    if len(raw) < FRAMING_BYTES:
        raise RecordsError(f"{where}: {len(raw)} bytes, shorter than a record's framing "
                           "(truncated shard?)")
    length, length_crc = struct.unpack("<QI", raw[:12])
    if masked_crc32c(raw[:8]) != length_crc:
        raise RecordsError(f"{where}: the length header fails its CRC check (corrupt "
                           "shard); extract it again")
    if length != len(raw) - FRAMING_BYTES:
        raise RecordsError(f"{where}: the header says {length} bytes of data, the offsets "
                           f"{len(raw) - FRAMING_BYTES} (offsets sidecar out of date? delete it "
                           "to rescan)")
    data = raw[12:-4]
    (data_crc,) = struct.unpack("<I", raw[-4:])
    if masked_crc32c(data) != data_crc:
        raise RecordsError(f"{where}: the data fails its CRC check (corrupt shard); "
                           "extract it again")
    return data


def read_record_at(fd: int, start: int, span: int, name: str = "<shard>",
                   record: int | None = None, verify: bool = True) -> bytes:
    """Reads one framed record spanning [start, start + span) of an open shard.

    Args:
      fd: OS file descriptor of the shard.
      start, span: from `record_offsets` (span = o[i+1] - o[i]).
      name: shard name for error messages.
      record: the record's number, for error messages.
      verify: check both CRCs of the framing (`check_record_framing`); without it, only
        the length header is compared with the span.

    Returns:
      The record's serialized bytes.

    Raises:
      RecordsError: short read, a length header that disagrees with the offsets, or
        (with `verify`) a CRC mismatch; the message names the shard, record and offset.
    """
    raw = os.pread(fd, span, start)
    if len(raw) != span:
        raise RecordsError(f"{name}: record {'?' if record is None else record} at byte "
                           f"{start}: read {len(raw)} of {span} bytes (truncated shard?)")
    if verify:
        return check_record_framing(raw, name, record, start)
    if struct.unpack("<Q", raw[:8])[0] != span - FRAMING_BYTES:
        raise RecordsError(f"{name}: no record of {span - FRAMING_BYTES} bytes at byte {start} "
                           "(offsets sidecar out of date? delete it to rescan)")
    return raw[12:span - 4]


def count_complete_records(shard_path: str) -> tuple[int, bool]:
    """Records of an uncompressed shard whose framing ends within the file, by reading
    the length headers.

    Returns:
      (complete records, whether a partial record follows them).
    """
    from ish_tf import fs

    size = fs.getsize(shard_path)
    n = pos = 0
    with fs.open(shard_path, "rb") as f:
        while pos < size:
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                return n, True
            end = pos + FRAMING_BYTES + struct.unpack("<Q", header)[0]
            if end > size:
                return n, True
            n, pos = n + 1, end
    return n, False


def checked_record_offsets(shard_path: str, expected: int) -> np.ndarray:
    """`record_offsets` of a shard, checked against the record count its index lists.

    A shard truncated by a crash or a full disk must never read as fewer records.

    Args:
      shard_path: an uncompressed shard.
      expected: the shard's `num_records` in index.json.

    Returns:
      int64 (expected + 1,) offsets.

    Raises:
      RecordsError: naming the shard and both counts ("index.json says N records, the
        shard holds M").
    """
    from ish_tf.data.shards import INDEX_NAME  # shards imports this module

    try:
        offsets = record_offsets(shard_path)
    except RecordsError as e:
        held, partial = count_complete_records(shard_path)
        raise RecordsError(
            f"{shard_path}: {INDEX_NAME} says {expected} records, the shard holds {held}"
            f"{' and a partial one' if partial else ''} (truncated shard: extract it again): "
            f"{e}") from e
    held = len(offsets) - 1
    if held != expected:
        raise RecordsError(f"{shard_path}: {INDEX_NAME} says {expected} records, the shard "
                           f"holds {held} ({'truncated shard' if held < expected else 'stale index'}"
                           f": extract it again)")
    return offsets


