"""Request bodies -> an image tensor, or one 4xx line saying what was wrong."""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_TYPES = ("image/png", "image/jpeg")
ARRAY_TYPES = ("application/x-npy", "application/octet-stream")
ACCEPTED = IMAGE_TYPES + ARRAY_TYPES + ("application/json",)


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Parsed:
    image: torch.Tensor      # [C, H, W] float32 in [0, 1]
    deadline_ms: float


def parse_deadline(value) -> float:
    try:
        deadline = float(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"deadline must be a number of milliseconds, got {value!r}") from None
    if not math.isfinite(deadline) or deadline <= 0:
        raise RequestError(400, f"deadline must be a positive number of milliseconds, got {value!r}")
    return deadline


def parse_label(value: str | None) -> int | None:
    """X-Label: the request's true class, sent by load tests so the server can report effective accuracy."""
    if value is None:
        return None
    if not value.strip().isdigit():
        raise RequestError(400, f"X-Label must be a class index (an integer >= 0), got {value!r}")
    return int(value)


def decode_image(data: bytes, content_type: str, shape: tuple[int, int, int]) -> torch.Tensor:
    channels, height, width = shape
    if content_type in IMAGE_TYPES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a truncated file fails here, not later
                mode = image.mode
                if mode not in ("L", "RGB", "RGBA", "P", "I;16", "LA"):
                    raise RequestError(422, f"image mode {mode} is not supported; send grayscale or RGB")
                if channels == 1 and mode not in ("L", "I;16", "LA"):
                    raise RequestError(422, f"image has colour ({mode}); this zoo expects 1 channel (grayscale)")
                if channels == 3 and mode in ("L", "I;16", "LA"):
                    raise RequestError(422, f"image is grayscale ({mode}); this zoo expects 3 channels (RGB)")
                if image.size != (width, height):
                    raise RequestError(422, f"image is {image.size[0]}x{image.size[1]}; this zoo expects "
                                            f"{width}x{height}")
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        except UnidentifiedImageError:
            raise RequestError(400, f"not a readable {content_type.split('/')[1].upper()} image "
                                    "(not recognised as one)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(400, f"not a readable {content_type.split('/')[1].upper()} image "
                                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy()).float() / 255.0
    if content_type == "application/x-npy":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickles
        except (ValueError, OSError, EOFError) as exc:
            raise RequestError(400, f"not a readable .npy array ({str(exc).splitlines()[0]})") from None
    else:  # raw bytes: uint8 C x H x W
        if len(data) != channels * height * width:
            raise RequestError(422, f"raw body has {len(data)} bytes; a {channels}x{height}x{width} uint8 "
                                    f"image has {channels * height * width}")
        array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    if array.shape == (height, width) and channels == 1:
        array = array[None]
    if tuple(array.shape) != shape:
        raise RequestError(422, f"array has shape {tuple(array.shape)}; this zoo expects {shape} (C, H, W)")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if array.dtype.kind != "f":
        raise RequestError(422, f"array dtype {array.dtype} is not supported; send uint8 (0-255) or float (0-1)")
    tensor = torch.from_numpy(array.astype(np.float32))
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise RequestError(422, "float arrays must hold finite values in [0, 1]")
    return tensor


def parse_request(body: bytes, content_type: str, header_deadline: str | None, query_deadline: str | None,
                  shape: tuple[int, int, int]) -> Parsed:
    content_type = (content_type or "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED:
        raise RequestError(415, f"content type {content_type or '(none)'} is not accepted; use one of "
                                f"{', '.join(ACCEPTED)}")
    deadline = header_deadline if header_deadline is not None else query_deadline
    if content_type == "application/json":
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"JSON body is not an object ({exc})") from None
        deadline = payload.get("deadline_ms", deadline)
        if "image" not in payload:
            raise RequestError(400, 'JSON body needs "image" (base64 PNG, JPEG or .npy) and "deadline_ms"')
        try:
            body = base64.b64decode(payload["image"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise RequestError(400, '"image" is not valid base64') from None
        content_type = sniff(body)
    if deadline is None:
        raise RequestError(400, "missing deadline: send the X-Deadline-Ms header, ?deadline_ms= or JSON deadline_ms")
    deadline_ms = parse_deadline(deadline)
    if not body:
        raise RequestError(400, "empty body: send an image")
    return Parsed(decode_image(body, content_type, shape), deadline_ms)


def sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data.startswith(b"\x93NUMPY"):
        return "application/x-npy"
    raise RequestError(415, "the base64 image is neither PNG, JPEG nor .npy")
