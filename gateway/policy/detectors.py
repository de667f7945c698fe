"""Built-in detectors: an RE2 candidate pattern plus a validator that refuses look-alikes.

The candidate pattern joins the stage's single RE2 pass like any regex rule; the validator
runs only on the candidates of a text that hit, so checksums cost nothing on clean text.
A pattern's group named ``v``, when present, is the part reported as the span.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

Params = Mapping[str, object]
Validator = Callable[[str, Params], bool]


@dataclass(frozen=True, slots=True)
class Param:
    kind: type[int] | type[float] | type[bool]
    default: int | float | bool
    minimum: float | None = None


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    description: str
    pattern: str
    validate: Validator
    params: Mapping[str, Param] = field(default_factory=dict)


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _credit_card(candidate: str, _: Params) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    if not 12 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    separators = {char for char in candidate if char in " -"}
    return len(separators) <= 1 and luhn_valid(digits)


# ISO 13616 lengths by country; a candidate whose length does not fit is refused before mod-97.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_valid(candidate: str) -> bool:
    iban = candidate.replace(" ", "").replace("-", "").upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum() or not iban.isascii():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _iban(candidate: str, _: Params) -> bool:
    return iban_valid(candidate)


def ssn_valid(candidate: str) -> bool:
    digits = candidate.replace("-", "").replace(" ", "").replace(".", "")
    if len(digits) != 9 or not digits.isdigit():
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in {"000", "666"} or area >= "900" or group == "00" or serial == "0000":
        return False
    # Repeated or sequential digits are placeholders in forms and docs, not people.
    return len(set(digits)) > 1 and digits not in {"123456789", "987654321"}


def _us_ssn(candidate: str, params: Params) -> bool:
    separators = [char for char in candidate if not char.isdigit()]
    if separators and (len(separators) != 2 or separators[0] != separators[1]):
        return False
    if not separators and not params["allow_unseparated"]:
        return False
    return ssn_valid(candidate)


def _email(candidate: str, _: Params) -> bool:
    local, _at, domain = candidate.rpartition("@")
    if not local or len(local) > 64 or len(domain) > 253:
        return False
    if ".." in candidate or local.startswith(".") or local.endswith("."):
        return False
    return all(label and not label.startswith("-") for label in domain.split("."))


def _private_key(candidate: str, params: Params) -> bool:
    body = candidate.split("-----", 2)[2].split("-----END", 1)[0]
    # Encrypted PEM carries "Proc-Type:"/"DEK-Info:" header lines before the key body.
    kept = "".join(line for line in body.splitlines() if ":" not in line)
    compact = "".join(kept.split())
    minimum = params["min_body_chars"]
    assert isinstance(minimum, int)
    return len(compact) >= minimum and _BASE64.fullmatch(compact) is not None


_BASE64 = re.compile(r"[A-Za-z0-9+/=]*")


def _b64url_json(part: str) -> object:
    padded = part + "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(padded))


def _jwt(candidate: str, _: Params) -> bool:
    header, payload, _signature = candidate.split(".", 2)
    try:
        decoded = _b64url_json(header)
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded)


def shannon_entropy(value: str) -> float:
    counts = Counter(value)
    length = len(value)
    return -sum(count / length * math.log2(count / length) for count in counts.values())


_PLACEHOLDER_HINTS = ("xxxx", "****", "....", "<", ">", "${", "{{", "%(", "changeme", "example")


def _generic_secret(value: str, params: Params) -> bool:
    min_length, min_entropy = params["min_length"], params["min_entropy"]
    assert isinstance(min_length, int)
    assert isinstance(min_entropy, float | int)
    if len(value) < min_length:
        return False
    lowered = value.lower()
    if any(hint in lowered for hint in _PLACEHOLDER_HINTS):
        return False
    return shannon_entropy(value) >= min_entropy


# Personal data beyond cards and bank accounts: SSNs written without their separators, IP
# addresses and phone numbers. Each pattern takes its whole token (context characters outside
# group ``v``), so that a look-alike is refused as a whole rather than matched in part.

# Numbers the SSA voided after they were printed as samples (a wallet insert, a leaflet).
_PUBLISHED_SSNS = frozenset({"078051120", "219099999"})


def _us_ssn_unformatted(candidate: str, _: Params) -> bool:
    digits = candidate.replace("-", "")
    return ssn_valid(digits) and digits not in _PUBLISHED_SSNS


def _ipv4_address(candidate: str, _: Params) -> bool:
    try:
        ipaddress.IPv4Interface(candidate)
    except ValueError:
        return False
    return True


def _ipv6_address(candidate: str, _: Params) -> bool:
    address = candidate.split("/", 1)[0].split("%", 1)[0]
    # "::" alone and all-letter forms ("Cafe::Add") are C++, Haskell and reST punctuation
    # far more often than addresses: an address needs a digit, "::" a prefix length.
    if not any(char.isdigit() for char in candidate) or (address == "::" and "/" not in candidate):
        return False
    try:
        ipaddress.IPv6Interface(candidate)
    except ValueError:
        return False
    return True


def _nanp_valid(digits: str) -> bool:
    """A North American number: area code and exchange start with 2-9 and are not N11."""
    return (
        len(digits) == 10
        and digits[0] >= "2"
        and digits[3] >= "2"
        and digits[1:3] != "11"
        and digits[4:6] != "11"
    )


def _phone(candidate: str, _: Params) -> bool:
    digits = "".join(char for char in candidate if char.isdigit())
    if len(set(digits)) == 1:
        return False
    opened, closed = candidate.find("("), candidate.find(")")
    if candidate.count("(") != candidate.count(")") or candidate.count("(") > 1 or opened > closed:
        return False
    if candidate.startswith("+"):
        # E.164: at most 15 digits with the country code; +1 is the North American plan.
        if digits.startswith("1"):
            return _nanp_valid(digits[1:])
        return 8 <= len(digits) <= 15
    if digits.startswith("0"):
        # A national number with its trunk prefix (020 7123 4567, 090-1234-5678); the
        # 3-2-4 grouping of an SSN is left to the SSN detectors.
        groups = [len(group) for group in re.split(r"[ ()-]+", candidate) if group]
        return 9 <= len(digits) <= 11 and digits[1] != "0" and groups != [3, 2, 4]
    separators = {char for char in candidate.rsplit(")", maxsplit=1)[-1].lstrip() if char in " .-"}
    if len(separators) > 1:
        return False
    return _nanp_valid(digits[1:] if len(digits) == 11 and digits[0] == "1" else digits)


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEXTET = r"(?:[0-9A-Fa-f]{1,4})"


_CREDENTIAL_NAME = (
    r"(?:pass(?:word|wd)?|pwd|secret|token|api[_.-]?key|apikey|access[_.-]?key|auth[_.-]?key"
    r"|client[_.-]?secret|private[_.-]?key|credentials?)"
)

BUILTIN: Mapping[str, Detector] = {
    detector.name: detector
    for detector in (
        Detector(
            "credit_card",
            "payment card number, 12 to 19 digits, Luhn-valid",
            r"\b\d(?:[ -]?\d){11,18}\b",
            _credit_card,
        ),
        Detector(
            "iban",
            "international bank account number, country length and mod-97 checked",
            # Written whole, or in groups of four: a word after a grouped IBAN is not swallowed.
            r"\b[A-Za-z]{2}\d{2}"
            r"(?:[A-Za-z0-9]{11,30}|(?:[ -][A-Za-z0-9]{4}){2,7}(?:[ -][A-Za-z0-9]{1,3})?)\b",
            _iban,
        ),
        Detector(
            "us_ssn",
            "US social security number with valid area, group and serial",
            r"\b\d{3}[- .]?\d{2}[- .]?\d{4}\b",
            _us_ssn,
            {"allow_unseparated": Param(bool, False)},
        ),
        Detector(
            "email",
            "e-mail address",
            r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b",
            _email,
        ),
        Detector(
            "private_key",
            "PEM private key block (the BEGIN line and a key body)",
            r"-----BEGIN[A-Z0-9 ]{0,32} PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?"
            r"-----END[A-Z0-9 ]{0,32} PRIVATE KEY(?: BLOCK)?-----"
            # A truncated key: optional "Name: value" header lines, then a base64 body.
            r"|(?:\s*[A-Za-z-]{1,32}:[^\n]{0,256})*\s*[A-Za-z0-9+/=]{32,}[A-Za-z0-9+/=\s]*)",
            _private_key,
            {"min_body_chars": Param(int, 32, minimum=0)},
        ),
        Detector(
            "jwt",
            "JSON Web Token: three base64url parts with a decodable JSON header",
            r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*",
            _jwt,
        ),
        Detector(
            "generic_secret",
            "a high-entropy value assigned to a credential-like name",
            r"(?i)[A-Za-z0-9_.-]*" + _CREDENTIAL_NAME + r"[A-Za-z0-9_.-]*[\"'`]?"
            r"\s*(?:=|:=|:|=>|->)\s*[\"'`]?(?P<v>[^\s\"'`;,]{6,256})",
            _generic_secret,
            {"min_length": Param(int, 12, minimum=1), "min_entropy": Param(float, 3.0, minimum=0)},
        ),
        Detector(
            "us_ssn_unformatted",
            "US social security number written without its separators (nine bare digits, or "
            "3-6 digits), validated as us_ssn; voided sample numbers refused",
            r"(?:^|[^\w$€£.,+-])(?P<v>\d{9}|\d{3}-\d{6})(?:$|[^\w.,-]|[.,](?:$|\D))",
            _us_ssn_unformatted,
        ),
        Detector(
            "ipv4_address",
            "IPv4 address, each octet at most 255, with an optional /0-32 prefix length",
            rf"\b(?:{_OCTET}\.){{3}}{_OCTET}(?:/(?:3[0-2]|[12]?\d))?\b",
            _ipv4_address,
        ),
        Detector(
            "ipv6_address",
            "IPv6 address, full or compressed, with an optional embedded IPv4 address, zone "
            "and prefix length; parsed to check it",
            # The whole colon-and-hex token is the candidate: "2001::db8::1" is refused as one,
            # never matched from its middle; a full stop ends it unless an octet follows.
            rf"(?:^|[^\w:])(?P<v>(?:{_HEXTET}?:){{2,8}}(?:\d{{1,3}}(?:\.\d{{1,3}}){{3}}|{_HEXTET})?"
            r"(?:%[0-9A-Za-z_-]{1,32})?(?:/(?:12[0-8]|1[01]\d|[1-9]?\d))?)(?:$|[^\w:.]|\.(?:$|\W))",
            _ipv6_address,
        ),
        Detector(
            "phone",
            "phone number: international (+ and country code, at most 15 digits), North "
            "American (area code and exchange checked) or national with a trunk 0",
            r"(?:^|[^\w+./-])(?P<v>\+[1-9](?:[ .-]?\(?\d\)?){6,14}"
            r"|(?:1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"
            r"|\(?0\d{1,4}\)?(?:[ -]\d{2,8}){1,4})\b",
            _phone,
        ),
    )
}
