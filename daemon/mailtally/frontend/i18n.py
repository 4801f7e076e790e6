"""The frontend's words in English and Traditional Chinese, from translations/<lang>.json."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

LANGUAGES = ("en", "zh-TW")
NAMES = {"en": "English", "zh-TW": "\u7e41\u9ad4\u4e2d\u6587"}  # 繁體中文
TRANSLATIONS = Path(__file__).with_name("translations")


@cache
def words(language: str) -> dict[str, str]:
    """The words of `language`, English for anything else; keys are the same in each."""
    if language not in LANGUAGES:
        language = "en"
    text = (TRANSLATIONS / f"{language}.json").read_text(encoding="utf-8")
    loaded: dict[str, str] = json.loads(text)
    return loaded
