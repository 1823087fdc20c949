"""The salient terms of a text: lower-case content words, for topic coverage and lorebook keys."""

import re
from functools import cache

from persllm.prompting import PROMPTS, read_template

WORD = re.compile(r"[a-z][a-z'-]*[a-z]")


@cache
def stopwords() -> frozenset[str]:
    """The words ``prompts/stopwords.txt`` lists (``#`` lines are comments)."""
    text = read_template(PROMPTS, "stopwords.txt")
    return frozenset(
        word
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for word in line.lower().split()
    )


def normalise(text: str) -> str:
    """Lower case, with typographic apostrophes made plain."""
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")


def salient_terms(text: str) -> list[str]:
    """Lower-case content words of ``text`` (four letters or more, not stopwords, no possessive 's)."""
    words = (word.removesuffix("'s") for word in WORD.findall(normalise(text)))
    stop = stopwords()
    return [word for word in words if len(word) >= 4 and word not in stop]
