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
