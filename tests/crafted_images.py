"""Crafted image bytes shared by the tests of preprocessing, prediction and serving."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def encode(rgb: np.ndarray, ext: str = ".png", *params: int) -> bytes:
    channels = rgb.shape[2] if rgb.ndim == 3 else 1
    bgr = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}.get(channels)
    ok, buffer = cv2.imencode(ext, cv2.cvtColor(rgb, bgr) if bgr is not None else rgb, list(params))
    assert ok
    return buffer.tobytes()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims another size (the IHDR chunk's CRC kept valid)."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8)))
    ihdr = 8 + 8  # signature, then length and type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)
