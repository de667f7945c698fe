"""The prompt body as the backend reads it: decoded once, inspected, and forwarded as inspected.

Express's ``express.json()`` (body-parser) inflates ``gzip`` and ``deflate`` bodies, decodes
the declared charset (any ``utf-*`` that iconv-lite knows, a byte order mark dropped), and
applies its size limit to the decoded body. The gateway reads the body the same way, refuses
what it cannot read the same way (utf-7, unknown encodings, ambiguous charsets), and sends the
backend exactly the text it evaluated: plain UTF-8 JSON with no ``Content-Encoding``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

from gateway import jsonlib
from gateway.flashback import BODY_TOO_LARGE, INVALID_REQUEST, UNSUPPORTED_MEDIA_TYPE
from gateway.json_texts import Texts, TooDeep, collect
from gateway.target import Refusal

# The charsets body-parser decodes, by the Python codec that reads them the same way. utf-16
# and utf-32 without an order mark are guessed by iconv-lite; they are refused below instead.
_CODECS = {
    "utf-8": "utf-8",
    "utf8": "utf-8",
    "utf-16le": "utf-16-le",
    "utf16le": "utf-16-le",
    "utf-16be": "utf-16-be",
    "utf16be": "utf-16-be",
    "utf-16": "utf-16",
    "utf16": "utf-16",
    "utf-32le": "utf-32-le",
    "utf32le": "utf-32-le",
    "utf-32be": "utf-32-be",
    "utf32be": "utf-32-be",
    "utf-32": "utf-32",
    "utf32": "utf-32",
}
_ORDER_MARKS = {
    "utf-16": (b"\xff\xfe", b"\xfe\xff"),
    "utf-32": (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"),
}
_CHARSET = re.compile(r';\s*charset\s*=\s*"?([^";,\s]*)"?', re.IGNORECASE)
_BOM = "\ufeff"
JSON_UTF8 = "application/json; charset=utf-8"


# Not frozen: built for every body and answer, and a frozen dataclass's __init__ costs about
# five times a plain one's (nothing changes one once built).
@dataclass(slots=True)
class InspectedRequest:
    """What was read, what is evaluated, and the only bytes that may go upstream."""

    payload: Any
    texts: Texts
    forward: bytes
    content_type: str | None  # a replacement Content-Type, when the body was transcoded
    decoded: bool  # Content-Encoding was removed


def read_body(
    raw: bytes, *, content_type: str | None, content_encoding: str | None, limit: int
) -> InspectedRequest | Refusal:
    """The body decoded as the backend decodes it, parsed, and every text of it collected."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding != "identity":
        inflated = _inflate(raw, encoding, limit)
        if isinstance(inflated, Refusal):
            return inflated
        raw = inflated
    codec = _codec(content_type)
    if isinstance(codec, Refusal):
        return codec
    text: str | None = None
    if codec == "utf-8" and not raw.startswith(b"\xef\xbb\xbf"):
        payload_source: bytes | str = raw
    else:
        if codec in _ORDER_MARKS and not raw.startswith(_ORDER_MARKS[codec]):
            return Refusal(415, f"Charset {codec} without a byte order mark", UNSUPPORTED_MEDIA_TYPE)
        text = raw.decode(codec, errors="replace").removeprefix(_BOM)
        if len(text.encode("utf-8", errors="surrogatepass")) > limit:
            return Refusal(413, f"Request body over {limit} bytes", BODY_TOO_LARGE)
        payload_source = text
    try:
        payload = jsonlib.loads(payload_source)
    except ValueError:
        if text is not None or not isinstance(payload_source, bytes):
            return Refusal(400, "Request body must be JSON")
        # Bytes that are not valid UTF-8: the backend reads them with replacement characters.
        text = raw.decode("utf-8", errors="replace")
        try:
            payload = jsonlib.loads(text)
        except ValueError:
            return Refusal(400, "Request body must be JSON")
    try:
        texts = collect(payload)
    except TooDeep as exc:
        return Refusal(400, str(exc))
    if text is None:
        return InspectedRequest(payload, texts, raw, None, encoding != "identity")
    # SECURITY: the backend is sent the text that was evaluated, in the one charset that
    # leaves no room for a second reading.
    return InspectedRequest(
        payload, texts, text.encode("utf-8", errors="surrogatepass"), JSON_UTF8, encoding != "identity"
    )


def _codec(content_type: str | None) -> str | Refusal:
    if not content_type or "charset" not in content_type.lower():
        return "utf-8"
    found = {charset.lower() for charset in _CHARSET.findall(content_type)}
    # SECURITY: a charset the gateway cannot pin down is one it might read unlike the backend.
    if len(found) != 1 or content_type.lower().count("charset") != 1:
        return Refusal(415, "Ambiguous charset in Content-Type", UNSUPPORTED_MEDIA_TYPE)
    charset = found.pop()
    codec = _CODECS.get(charset)
    if codec is None:
        return Refusal(415, f'Unsupported charset "{charset.upper()[:32]}"', UNSUPPORTED_MEDIA_TYPE)
    return codec


def _inflate(raw: bytes, encoding: str, limit: int) -> bytes | Refusal:
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        return Refusal(415, f'Unsupported content encoding "{encoding[:32]}"', UNSUPPORTED_MEDIA_TYPE)
    parts: list[bytes] = []
    size = 0
    data = raw
    try:
        # gzip allows several members one after another; Node inflates them all.
        while data:
            inflater = zlib.decompressobj(wbits)
            while data:
                part = inflater.decompress(data, limit + 1 - size)
                size += len(part)
                parts.append(part)
                if size > limit:
                    return Refusal(413, f"Request body over {limit} bytes", BODY_TOO_LARGE)
                data = inflater.unconsumed_tail
                if inflater.eof:
                    break
            if not inflater.eof:
                return Refusal(400, "Request body is truncated", INVALID_REQUEST)
            data = inflater.unused_data if encoding == "gzip" else b""
    except zlib.error:
        return Refusal(400, "Request body could not be decompressed", INVALID_REQUEST)
    return b"".join(parts)
