#!/usr/bin/env python3
"""Ask fieldllmd a question over a serial line in framed mode; print the answer as it streams.

    python3 framed_client.py /dev/ttyUSB0 "Why does the pump cavitate?" [BAUD]

Needs pyserial (Debian: python3-serial). The few protobuf fields it uses are encoded by hand,
so nothing else is needed. A frame on the wire is
    COBS( kind u8 | protobuf body | CRC-32 (zlib) of kind+body, little-endian u32 ) 0x00
"""
import os
import struct
import sys
import zlib

import serial

REQUEST, CHUNK, DONE, ERROR = 0x01, 0x81, 0x82, 0x83
FINISH = {1: "stop", 2: "length", 3: "cancelled", 4: "deadline", 5: "thermal", 6: "error"}


def cobs_encode(data: bytes) -> bytes:
    out, block = bytearray(), bytearray()
    for b in data:
        if b == 0:
            out += bytes([len(block) + 1]) + block
            block.clear()
        else:
            block.append(b)
            if len(block) == 254:
                out += b"\xff" + block
                block.clear()
    return bytes(out + bytes([len(block) + 1]) + block)


def cobs_decode(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        code = data[i]
        if code == 0 or i + code > len(data):
            raise ValueError("bad COBS")
        out += data[i + 1 : i + code]
        i += code
        if code < 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def fields(body: bytes):
    """Yields (field number, value) of a protobuf message: ints for varints, bytes else."""
    i = 0
    while i < len(body):
        key, i = read_varint(body, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(body, i)
        elif wire == 2:
            n, i = read_varint(body, i)
            value, i = body[i : i + n], i + n
        elif wire == 5:
            value, i = body[i : i + 4], i + 4
        elif wire == 1:
            value, i = body[i : i + 8], i + 8
        else:
            raise ValueError(f"wire type {wire}")
        yield number, value


def read_varint(b: bytes, i: int):
    n = shift = 0
    while True:
        byte = b[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i


def frame(kind: int, body: bytes) -> bytes:
    raw = bytes([kind]) + body
    return cobs_encode(raw + struct.pack("<I", zlib.crc32(raw))) + b"\x00"


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    port = serial.Serial(sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 else 115200, timeout=60)
    rid = f"py-{os.getpid()}"
    # Request: id = 1, prompt = 2, stream = 14 (true)
    body = field_bytes(1, rid.encode()) + field_bytes(2, sys.argv[2].encode()) + varint(14 << 3) + b"\x01"
    port.write(b"\x00" + frame(REQUEST, body))
    pending = bytearray()
    while True:
        data = port.read(1)
        if not data:
            print("no answer within 60 s", file=sys.stderr)
            return 1
        if data != b"\x00":
            pending += data
            continue
        raw, pending = bytes(pending), bytearray()
        if not raw:
            continue
        try:
            decoded = cobs_decode(raw)
        except ValueError:
            continue
        if len(decoded) < 5 or struct.unpack("<I", decoded[-4:])[0] != zlib.crc32(decoded[:-4]):
            print("dropped a frame with a bad CRC", file=sys.stderr)
            continue
        kind, msg = decoded[0], dict(fields(decoded[1:-4]))
        if msg.get(1, b"").decode() != rid and kind != ERROR:
            continue
        if kind == CHUNK:
            sys.stdout.write(msg.get(3, b"").decode("utf-8", "replace"))
            sys.stdout.flush()
        elif kind == DONE:
            print(f"\n[finish: {FINISH.get(msg.get(3, 0), '?')}]")
            return 0
        elif kind == ERROR:
            print(f"error {msg.get(2, 0)}: {msg.get(3, b'').decode()}", file=sys.stderr)
            if msg.get(1, b"").decode() == rid:
                return 1


if __name__ == "__main__":
    sys.exit(main())
