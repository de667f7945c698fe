"""Built-in detectors: validators refuse look-alikes that a bare regex would accept."""

from __future__ import annotations

import pytest

from gateway.policy.detectors import BUILTIN, iban_valid, luhn_valid, shannon_entropy, ssn_valid
from gateway.policy.patterns import compile_pattern


def _detect(name: str, text: str, **params: object) -> list[str]:
    detector = BUILTIN[name]
    resolved = {key: param.default for key, param in detector.params.items()} | params
    regex = compile_pattern(detector.pattern)
    group = regex.groupindex.get("v", 0)
    found = []
    for match in regex.finditer(text):
        candidate = match.group(group)
        if detector.validate(candidate, resolved):
            found.append(candidate)
    return found


def test_every_detector_pattern_compiles_with_re2() -> None:
    """Each built-in candidate pattern is valid RE2."""
    for detector in BUILTIN.values():
        compile_pattern(detector.pattern)


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("79927398713", True),
        ("79927398710", False),
        ("0", True),
    ],
)
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize(
    ("name", "text", "found"),
    [
        pytest.param(
            "credit_card", "pay 4012 8888 8888 1881 now", ["4012 8888 8888 1881"], id="visa with spaces"
        ),
        pytest.param("credit_card", "3782-822463-10005", ["3782-822463-10005"], id="amex with dashes"),
        pytest.param(
            "credit_card",
            "6011000990139424 and 4111111111111112",
            ["6011000990139424"],
            id="only the Luhn-valid one of two",
        ),
        pytest.param("credit_card", "4111 1111-1111 1111", [], id="mixed separators are refused"),
        pytest.param("credit_card", "0000 0000 0000 0000", [], id="one repeated digit is refused"),
        pytest.param("credit_card", "12345678903", [], id="eleven digits are too short"),
        pytest.param(
            "iban", "DE89 3704 0044 0532 0130 00", ["DE89 3704 0044 0532 0130 00"], id="German IBAN"
        ),
        pytest.param(
            "iban",
            "pay DE89 3704 0044 0532 0130 00 please",
            ["DE89 3704 0044 0532 0130 00"],
            id="a grouped IBAN followed by a word",
        ),
        pytest.param(
            "iban", "fr1420041010050500013m02606", ["fr1420041010050500013m02606"], id="lower-case IBAN"
        ),
        pytest.param("iban", "DE89 3704 0044 0532 0130 01", [], id="IBAN with a bad checksum"),
        pytest.param("iban", "XX89370400440532013000", [], id="IBAN of an unknown country"),
        pytest.param("us_ssn", "SSN 078-05-1121.", ["078-05-1121"], id="SSN with dashes"),
        pytest.param("us_ssn", "SSN 078 05 1121", ["078 05 1121"], id="SSN with spaces"),
        pytest.param("us_ssn", "SSN 078-05 1121", [], id="SSN with mixed separators"),
        pytest.param("us_ssn", "id 078051121", [], id="nine bare digits are not an SSN by default"),
        pytest.param("us_ssn", "SSN 900-12-3456 or 123-45-0000", [], id="area 9xx and serial 0000"),
        pytest.param("email", "to a.b-c+d@mail.example.io.", ["a.b-c+d@mail.example.io"], id="email"),
        pytest.param("email", "a..b@example.com", [], id="email with two dots in a row"),
        pytest.param(
            "jwt",
            "t=eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjMifQ.sig-_x",
            ["eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjMifQ.sig-_x"],
            id="JWT",
        ),
        pytest.param("jwt", "eyJ0ZXN0IjoxfQ.eyJzdWIiOiIxMjMifQ.sig", [], id="JWT header without alg"),
        pytest.param(
            "private_key",
            "-----BEGIN EC PRIVATE KEY----- MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBn"
            "/8dGH6QJPGG+rgYFoAoGCCqGSM49 -----END EC PRIVATE KEY-----",
            1,
            id="one-line PEM key",
        ),
        pytest.param(
            "private_key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
            "MIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n",
            1,
            id="truncated encrypted key",
        ),
        pytest.param(
            "private_key",
            "-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----",
            [],
            id="a key with its body elided",
        ),
        pytest.param(
            "generic_secret",
            'API_KEY: "8f3Kq1ZxV0pL7mN2"',
            ["8f3Kq1ZxV0pL7mN2"],
            id="quoted value of an api key",
        ),
        pytest.param("generic_secret", "client_secret=${CLIENT_SECRET}", [], id="an interpolation"),
        pytest.param("generic_secret", "password: hunter2", [], id="a short password"),
        pytest.param("generic_secret", "token = <your-token-here-please>", [], id="a placeholder"),
    ],
)
def test_detectors(name: str, text: str, found: list[str] | int) -> None:
    """Candidates that pass validation are found; the look-alikes beside them are not."""
    result = _detect(name, text)
    if isinstance(found, int):
        assert len(result) == found
    else:
        assert result == found


def test_generic_secret_entropy_threshold_is_a_parameter() -> None:
    """Raising min_entropy refuses values that pass at the default."""
    text = "secret = abcdefabcdefabcd"
    assert shannon_entropy("abcdefabcdefabcd") < 3.0
    assert _detect("generic_secret", text, min_entropy=2.0) == ["abcdefabcdefabcd"]
    assert _detect("generic_secret", text) == []


def test_unseparated_ssn_can_be_allowed() -> None:
    """allow_unseparated accepts nine bare digits that form a valid SSN."""
    assert _detect("us_ssn", "id 078051121", allow_unseparated=True) == ["078051121"]


@pytest.mark.parametrize(
    ("value", "valid"), [("GB82WEST12345698765432", True), ("GB82WEST1234569876543", False)]
)
def test_iban_length_is_checked_per_country(value: str, valid: bool) -> None:
    assert iban_valid(value) is valid


@pytest.mark.parametrize(
    ("value", "valid"),
    [("536-22-1234", True), ("000-22-1234", False), ("123-45-6789", False), ("111-11-1111", False)],
)
def test_ssn_placeholders_are_refused(value: str, valid: bool) -> None:
    assert ssn_valid(value) is valid


@pytest.mark.parametrize(
    ("name", "text", "found"),
    [
        pytest.param("us_ssn_unformatted", "ssn 536221234 on file", ["536221234"], id="nine bare digits"),
        pytest.param("us_ssn_unformatted", "typed 536-221234", ["536-221234"], id="SSN with one dash (3-6)"),
        pytest.param("us_ssn_unformatted", "zip 10001-1234", [], id="5-4 is a ZIP+4 code, not an SSN"),
        pytest.param("us_ssn_unformatted", "card 078051120", [], id="a voided sample SSN"),
        pytest.param("us_ssn_unformatted", "sum 536221234.50, id 900221234", [], id="a decimal and area 9xx"),
        pytest.param("us_ssn_unformatted", "phone 5362212345", [], id="ten digits"),
        pytest.param("us_ssn_unformatted", "SSN 536-22-1234", [], id="the separated form is us_ssn's"),
        pytest.param("ipv4_address", "host 192.168.10.254 up", ["192.168.10.254"], id="IPv4"),
        pytest.param(
            "ipv4_address", "nets 10.0.0.0/8, 0.0.0.0/0", ["10.0.0.0/8", "0.0.0.0/0"], id="IPv4 with prefixes"
        ),
        pytest.param("ipv4_address", "addr 10.1.2.3/40", ["10.1.2.3"], id="prefix over 32 left out"),
        pytest.param("ipv4_address", "bad 10.0.0.256, short 1.2.3", [], id="octet over 255, three octets"),
        pytest.param("ipv4_address", "IP192.168.1.1x", [], id="IPv4 glued to words"),
        pytest.param("ipv6_address", "ping 2001:db8::ff00:42:8329", ["2001:db8::ff00:42:8329"], id="IPv6"),
        pytest.param(
            "ipv6_address",
            "full 2001:0DB8:0000:0000:0000:ff00:0042:8329.",
            ["2001:0DB8:0000:0000:0000:ff00:0042:8329"],
            id="full IPv6 before a full stop",
        ),
        pytest.param("ipv6_address", "mapped ::ffff:203.0.113.9", ["::ffff:203.0.113.9"], id="IPv4-mapped"),
        pytest.param("ipv6_address", "link fe80::1%eth0/64", ["fe80::1%eth0/64"], id="zone and prefix"),
        pytest.param("ipv6_address", "at [::1]:8080 and ::/0", ["::1", "::/0"], id="loopback, default route"),
        pytest.param("ipv6_address", "2001::db8::1 or 12345::1", [], id="two gaps, a five-digit group"),
        pytest.param("ipv6_address", "MAC 00:1a:2b:3c:4d:5e at 12:30:45", [], id="MAC address and time"),
        pytest.param("ipv6_address", "std::vector, Cafe::Add, f :: Int", [], id="C++ and Haskell"),
        pytest.param("ipv6_address", "bad 2001:db8::300.1.2.3", [], id="embedded IPv4 over 255"),
        pytest.param("phone", "call (212) 736-5000 today", ["(212) 736-5000"], id="US with area code"),
        pytest.param("phone", "office 617.253.1000", ["617.253.1000"], id="US with dots"),
        pytest.param("phone", "intl +44 20 7946 0958", ["+44 20 7946 0958"], id="international"),
        pytest.param("phone", "tel +1 212 736 5000", ["+1 212 736 5000"], id="international North American"),
        pytest.param("phone", "tokyo 03-1234-5678", ["03-1234-5678"], id="national with trunk 0"),
        pytest.param("phone", "dummy (123) 456-7890 or 411-555-1234", [], id="area code 1xx and N11"),
        pytest.param("phone", "+1 555 0100 and 212-736.5000", [], id="short +1 and mixed separators"),
        pytest.param("phone", "ssn 078-05-1123 on 2024-05-12", [], id="SSN shape and a date"),
    ],
)
def test_pii_detectors(name: str, text: str, found: list[str]) -> None:
    """SSNs without separators, IP addresses and phone numbers: found, look-alikes refused."""
    assert _detect(name, text) == found
