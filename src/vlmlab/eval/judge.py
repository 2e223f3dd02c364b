"""An optional LLM judge for answer extraction (``--judge-url`` / ``--judge-model``), off by
default.

Only rows the rule-based extractors cannot parse go to the judge (MMBench / MCQ choice
extraction, MathVista answer extraction), as lmms-eval and VLMEvalKit do; every judgement is
cached in ``<output-dir>/judge_cache.jsonl`` keyed by (judge url, judge model, prompt hash), so a
re-score never asks twice and two models never share judgements (lmms-eval's HallusionBench
cache does, keyed by position). The prompts are vlmlab's own wording of the published extractor
instructions, not byte-identical to any harness's: judge-based numbers are reported as such.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import httpx

from vlmlab.cache import content_key
from vlmlab.protocol.errors import ConfigError, MediaFetchError

logger = logging.getLogger(__name__)

CHOICE_PROMPT = (
    "You match a model's answer to one option of a single-choice question.\n"
    "Question: {question}\nOptions:\n{options}\nModel answer: {prediction}\n"
    "Reply with the single letter of the option the answer means, or Z if it matches none."
)
VALUE_PROMPT = (
    "Extract the final answer from a model's response to a math question. Reply with the answer "
    "only (a number, a list in Python syntax, or an option's text), nothing else.\n"
    "Question: {question}\nModel response: {prediction}\nExtracted answer:"
)


class Judge:
    """A cached OpenAI-compatible chat endpoint used only for extraction."""

    def __init__(self, base_url: str, model: str, cache_path: Path, api_key: str | None = None, timeout_s: float = 60.0):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--judge-url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.cache_path = cache_path
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.cache: dict[str, str] = {}
        self.calls = 0
        if cache_path.exists():
            for line in cache_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.cache[row["key"]] = row["reply"]

    def ask(self, prompt: str) -> str:
        key = content_key(self.base_url, self.model, prompt)
        if key in self.cache:
            return self.cache[key]
        body = {"model": self.model, "temperature": 0, "max_tokens": 32, "messages": [{"role": "user", "content": prompt}]}
        try:
            response = httpx.post(f"{self.base_url}/chat/completions", json=body, headers=self.headers, timeout=self.timeout_s)
            response.raise_for_status()
            reply = response.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise MediaFetchError(f"the judge at {self.base_url} failed: {exc}") from exc
        self.calls += 1
        self.cache[key] = reply
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with self.cache_path.open("a") as f:
            f.write(json.dumps({"key": key, "judge": self.model, "prompt": prompt, "reply": reply}) + "\n")
        return reply

    def choice(self, question: str, choices: Sequence[str], prediction: str) -> str | None:
        """The option letter the judge reads in ``prediction``; None for Z / no letter."""
        options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        reply = self.ask(CHOICE_PROMPT.format(question=question, options=options, prediction=prediction)).strip().upper()
        letter = reply[:1]
        return letter if letter and letter != "Z" and ord(letter) - 65 < max(len(choices), 1) and letter.isalpha() else None

    def value(self, question: str, prediction: str) -> str | None:
        reply = self.ask(VALUE_PROMPT.format(question=question, prediction=prediction)).strip()
        return reply or None
