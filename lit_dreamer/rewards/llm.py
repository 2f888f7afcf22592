"""A language model as a judge of episodes: an OpenAI-compatible chat-completions client on the standard library.

`LLMJudge.score_many([(instruction, description), ...])` asks the model once per distinct, uncached pair,
at most `max_concurrency` requests in flight, and returns one reward per pair. Answers are parsed strictly
(`parse_answer`). A request that times out, gets a 5xx (or 429) or loses its connection is retried with
exponential backoff; a failed or malformed answer gives `fallback`, is counted, and is warned about once.

The API key is read from the environment variable named in the settings at each request, so that it sits
on no object that could be pickled, saved or logged.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from typing import Sequence

from lit_dreamer.rewards.settings import LLMConfig

log = logging.getLogger(__name__)

NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
ANSWERS = {"yes": 1.0, "no": 0.0}
MAX_ANSWER_TOKENS = 16
"""max_tokens of each request: a word or a number is all the answer may hold."""

Query = tuple[str, str]
"""(instruction, description): what one judgement is asked about, and its cache key."""


class MalformedAnswer(ValueError):
    """The server answered, but not with yes, no or a number."""


class TransientFailure(RuntimeError):
    """A timeout, a 5xx or 429 answer, or a lost connection: worth another try."""


def parse_answer(text: str) -> float:
    """`yes` -> 1, `no` -> 0, a finite number -> itself; case, surrounding blanks and one final period are
    forgiven, anything else (a sentence, `yes, because ...`, `nan`) raises MalformedAnswer."""
    word = text.strip()
    word = word[:-1].strip() if word.endswith(".") else word
    if word.lower() in ANSWERS:
        return ANSWERS[word.lower()]
    if NUMBER.fullmatch(word) and math.isfinite(float(word)):
        return float(word)
    raise MalformedAnswer(f"answer {text[:80]!r} is neither yes, no nor a number")


def answer_content(body: bytes) -> str:
    """choices[0].message.content of a chat-completions response body."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise MalformedAnswer(f"the response is not a chat completion ({type(err).__name__}: {err})") from None
    if not isinstance(content, str):
        raise MalformedAnswer(f"choices[0].message.content is a {type(content).__name__}, not text")
    return content


class LLMJudge:
    """Cached, bounded, retrying yes/no judgements from a chat-completions endpoint.

    Counters (`stats()`): requests sent (retries included: each costs), judgements that fell back, and
    judgements that sent no request of their own (cached, or a repeat within one batch). Failures are not
    cached: a later episode asks again.
    """

    def __init__(self, settings: LLMConfig, backoff_s: float = 0.5):
        self.settings, self.backoff_s = settings, backoff_s
        self.endpoint = settings.url.rstrip("/") + "/chat/completions"
        self.pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="llm-reward")
        self.slots = threading.BoundedSemaphore(settings.max_concurrency)  # holds even for direct score() calls
        self.lock = threading.Lock()
        self.cache: dict[Query, float] = {}
        self.calls = self.failures = self.cache_hits = 0
        self.warned = False
        if not os.environ.get(settings.api_key_env):
            log.info("$%s is not set: language-model requests go without an Authorization header (a local server "
                     "needs none)", settings.api_key_env)

    def stats(self) -> dict[str, float]:
        with self.lock:
            return {"reward/llm_calls": float(self.calls), "reward/llm_failures": float(self.failures),
                    "reward/llm_cache_hits": float(self.cache_hits)}

    def score(self, instruction: str, description: str) -> float:
        return self.score_many([(instruction, description)])[0]

    def score_many(self, queries: Sequence[Query]) -> list[float]:
        """One reward per query; the distinct uncached ones are asked concurrently (max_concurrency at most)."""
        with self.lock:
            known = {query: self.cache[query] for query in queries if query in self.cache}
        missing = list(dict.fromkeys(query for query in queries if query not in known))
        with self.lock:  # a hit: a judgement that sends no request of its own (cached, or a repeat in this batch)
            self.cache_hits += len(queries) - len(missing)
        answers = dict(zip(missing, self.pool.map(self.judge, missing)))
        return [known[query] if query in known else answers[query] for query in queries]

    def judge(self, query: Query) -> float:
        """The model's reward for one query, or the fallback (counted, warned once) when it cannot be had."""
        try:
            value = parse_answer(self.ask(self.settings.prompt.format(instruction=query[0], description=query[1])))
        except (MalformedAnswer, TransientFailure, urllib.error.HTTPError) as err:
            self.count_failure(err)
            return self.settings.fallback
        with self.lock:
            self.cache[query] = value
        return value

    def ask(self, prompt: str) -> str:
        """The answer text, retrying transient failures with backoff (backoff_s, 2 backoff_s, ...)."""
        for attempt in range(self.settings.retries + 1):
            try:
                return self.request(prompt)
            except TransientFailure:
                if attempt == self.settings.retries:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def request(self, prompt: str) -> str:
        """One POST to {url}/chat/completions; HTTPError for a 4xx, TransientFailure for what may pass."""
        body = json.dumps({"model": self.settings.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": MAX_ANSWER_TOKENS}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.settings.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with self.slots:
            with self.lock:
                self.calls += 1
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                    return answer_content(response.read())
            except urllib.error.HTTPError as err:
                if err.code >= 500 or err.code == 429:
                    raise TransientFailure(f"HTTP {err.code} from {self.endpoint}") from None
                raise
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                raise TransientFailure(f"{type(err).__name__} from {self.endpoint}: {getattr(err, 'reason', err)}") \
                    from None

    def count_failure(self, err: Exception) -> None:
        with self.lock:
            self.failures += 1
            first, self.warned = not self.warned, True
        if first:
            hint = f" (is ${self.settings.api_key_env} right?)" if getattr(err, "code", None) in (401, 403) else ""
            log.warning("a language-model reward failed: %s%s; using reward.llm.fallback=%s instead. Further failures "
                        "are not warned about, only counted in reward/llm_failures", err, hint, self.settings.fallback)

    def close(self) -> None:
        self.pool.shutdown(wait=False)


_JUDGES: dict[tuple, LLMJudge] = {}
_JUDGES_LOCK = threading.Lock()


def shared_judge(settings: LLMConfig) -> LLMJudge:
    """The judge of this process for these settings: envs rebuilt after a crash keep its cache and counts."""
    key = astuple(settings)
    with _JUDGES_LOCK:
        if key not in _JUDGES:
            _JUDGES[key] = LLMJudge(settings)
        return _JUDGES[key]
