"""Token counting, offline, with counts identical to tiktoken's.

The encodings come compiled into ``toktok-rs`` (MIT; the rank data is tiktoken's own, MIT), so
nothing is read from the network or the disk at run time, unlike ``tiktoken.get_encoding``,
which downloads its rank files on first use. A count equals ``len(encoding.encode_ordinary(text))``
in tiktoken: a special-token string such as ``<|endoftext|>`` in a prompt counts as the ordinary
text it is, as the API counts user content. ``tests/test_tokens.py`` checks this against real
tiktoken; ``bench/tokens.py`` measures the speed.

Which encoding a request uses comes from its ``model``: a table of model-name keys, matched as
described in :meth:`TokenCounter.encoding_for`, where the longest matching key wins. No model,
or a model no key matches, counts with ``o200k_base`` (GPT-4o, GPT-4.1, GPT-5, the o-series).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

import toktok

from gateway.heap import release_free_heap

ENCODINGS: Final = ("o200k_base", "cl100k_base")
DEFAULT_ENCODING: Final = "o200k_base"

# The models that count with cl100k_base, after tiktoken's own table (tiktoken/model.py).
# "gpt-4" matches gpt-4, gpt-4-0613, gpt-4-32k, gpt-4-turbo, but not gpt-4o, gpt-4.1 or
# gpt-4.5, which fall through to the default o200k_base, as do the o-series and gpt-5.
DEFAULT_MODEL_ENCODINGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "gpt-4": "cl100k_base",
        "gpt-3.5-turbo": "cl100k_base",
        "gpt-3.5": "cl100k_base",  # common shorthand
        "gpt-35-turbo": "cl100k_base",  # Azure's name for it
        "text-embedding-3-": "cl100k_base",  # -small, -large
        "text-embedding-ada-002": "cl100k_base",
        "davinci-002": "cl100k_base",
        "babbage-002": "cl100k_base",
    }
)

# After a key that does not itself end in one, one of these must follow it in the model name:
# "gpt-4" matches "gpt-4-turbo" and "gpt-4@2024" but not "gpt-4o" or "gpt-4.1".
_SEPARATORS: Final = ("-", ":", "@")
_FREE_PREFIX_ENDINGS: Final = ("-", ":", "@", "/", "_", ".")

_lock = threading.Lock()
_loaded: dict[str, Callable[[str], int]] = {}


def _counter(encoding: str) -> Callable[[str], int]:
    """The count function of an encoding, loaded once per process (thread-safe)."""
    count = _loaded.get(encoding)
    if count is None:
        with _lock:
            count = _loaded.get(encoding)
            if count is None:
                # toktok._encoding is the package's documented way to its full tokenizer; its
                # count() skips the ~10 µs thread-pool dispatch that batch_count pays per call.
                count = toktok._encoding(encoding).count
                _loaded[encoding] = count
                release_free_heap()  # the loader's temporaries, 4 to 10 MB
    return count


def _count_with(count: Callable[[str], int], text: str) -> int:
    try:
        return int(count(text))
    except UnicodeEncodeError:
        # Lone surrogates (json.loads accepts "\ud800") cannot be UTF-8 encoded: replace them
        # with U+FFFD first, exactly as tiktoken's encode_ordinary does.
        return int(count(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")))


def _check_encoding(encoding: object, what: str) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"{what}: unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    return str(encoding)


def _normalise(model: str) -> str:
    name = model.strip().lower()
    return name.removeprefix("ft:")  # a fine-tuned model counts like its base: ft:gpt-4-0613:org::id


class TokenCounter:
    """Counts tokens of text with the encoding of a request's model.

    ``model_encodings`` maps model-name keys to encoding names; it is laid over
    :data:`DEFAULT_MODEL_ENCODINGS` (an equal key replaces the default one). ``default_encoding``
    is used when no key matches. Unknown encoding names raise :class:`ValueError`.

    Safe to share between threads (e.g. counting from an executor): encodings are loaded lazily,
    once per process, under a lock, and counting keeps no state.
    """

    def __init__(
        self,
        model_encodings: Mapping[str, str] | None = None,
        *,
        default_encoding: str = DEFAULT_ENCODING,
    ) -> None:
        self.default_encoding = _check_encoding(default_encoding, "default_encoding")
        table = dict(DEFAULT_MODEL_ENCODINGS)
        for key, encoding in (model_encodings or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"model key must be a non-empty string, not {key!r}")
            table[_normalise(key)] = _check_encoding(encoding, f"model key {key!r}")
        # Longest first, so the most specific key wins.
        self._table: tuple[tuple[str, str], ...] = tuple(
            sorted(table.items(), key=lambda item: len(item[0]), reverse=True)
        )
        # Model names come from requests: bounded, thread-safe memo of the lookups.
        self._resolve = functools.lru_cache(maxsize=1024)(self._lookup)
        self.counting = functools.lru_cache(maxsize=1024)(self._counting)
        # The count function of a model as given, name normalising and encoding lookup done.
        self._count_function = functools.lru_cache(maxsize=1024)(self._function_for)

    @property
    def model_encodings(self) -> Mapping[str, str]:
        """The effective key → encoding table (defaults with the overrides laid over them)."""
        return MappingProxyType(dict(self._table))

    def encoding_for(self, model: str | None) -> str:
        """The encoding for a request's ``model`` (None or blank: the default encoding).

        The name is compared case-insensitively, without a leading ``ft:``. A key matches a name
        equal to it, or one that starts with it followed by ``-``, ``:`` or ``@``; a key that
        itself ends in ``-``, ``:``, ``@``, ``/``, ``_`` or ``.`` matches any name starting with
        it. The longest matching key wins. When nothing matches a name with a provider path
        (``openai/gpt-4``), the part after the last ``/`` is tried.
        """
        if model is None or not model.strip():
            return self.default_encoding
        return self._resolve(_normalise(model))

    def count(self, text: str, model: str | None = None) -> int:
        """The number of tokens of ``text`` in the encoding of ``model``."""
        if not text:
            return 0
        return _count_with(self._count_function(model), text)

    def _function_for(self, model: str | None) -> Callable[[str], int]:
        return _counter(self.encoding_for(model))

    def _counting(self, model: str | None) -> Callable[[str], int]:
        """``count`` with ``model`` bound: one object per model (memoised as ``counting``), so
        that what holds it, a policy context say, can be shared by that model's requests."""
        return functools.partial(self.count, model=model)

    def preload(self) -> None:
        """Load every encoding now (o200k_base takes ~0.3 s), e.g. at start-up."""
        for encoding in ENCODINGS:
            _counter(encoding)

    def _lookup(self, name: str) -> str:
        found = self._match(name)
        if found is None and "/" in name:
            found = self._match(name.rsplit("/", 1)[1])
        return self.default_encoding if found is None else found

    def _match(self, name: str) -> str | None:
        for key, encoding in self._table:
            if name == key:
                return encoding
            if name.startswith(key) and (key.endswith(_FREE_PREFIX_ENDINGS) or name[len(key)] in _SEPARATORS):
                return encoding
        return None
