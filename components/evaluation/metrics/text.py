"""Answer matching for the held-out benchmark: pure Python, no heavy imports.

The `evaluate` modules next to this file are thin wrappers around these functions, so the numbers a
metric module reports and the numbers a unit test computes by hand come from one code path.

Why these rules:
- A short free-text answer from an 8-token greedy decode differs from its reference mostly in case,
  punctuation, articles and "three" vs "3"; :func:`normalize_answer` removes exactly those differences
  and nothing else (no stemming, no synonym lists), so a match still means the same answer.
- Multiple-choice answers come back as "B", "(b)", "B) square", "option B" or just "square";
  :func:`option_letter` reduces all of them to the letter, using the options text when it is known.
- MME has its own, deliberately crude, yes/no reading (:func:`mme_yes_no`); it must be copied
  exactly, quirks included, or MME scores stop being comparable with published ones.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence

ARTICLES = frozenset({"a", "an", "the"})

NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}

_APOSTROPHES = "'\u2018\u2019\u02bc`"
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL_MARK = "\x00"  # placeholder that survives punctuation stripping
_DOTTED_ACRONYM = re.compile(r"(?<![^\W\d_])([^\W\d_](?:\.[^\W\d_])+\.?)(?![^\W\d_])")  # "u.s.a." / "a.m." / "i.b.m"


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def _require_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    return value


def normalize_answer(s: str) -> str:
    """Canonical form of a short answer, for comparison only.

    Lowercase; apostrophes deleted ("don't" → "dont"); a decimal point between digits kept ("3.5")
    and a thousands comma deleted ("1,000" → "1000"), so numbers are not split or merged by accident;
    every other punctuation mark becomes a space ("red,blue" → "red blue"); the articles a/an/the
    dropped unless nothing else is left (so the option letter "A" stays "a"); the number words zero..twenty replaced by digits ("Three" → "3"); whitespace collapsed.
    Dotted acronyms are joined first ("U.S.A." → "usa"), so their letters are not read as articles.
    """
    text = _require_str(s, "answer").lower()
    text = _DOTTED_ACRONYM.sub(lambda m: m.group(1).replace(".", "") + " ", text)
    text = _THOUSANDS_COMMA.sub("", text)
    text = _DECIMAL_POINT.sub(_DECIMAL_MARK, text)
    chars = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        chars.append(" " if _is_punctuation(ch) else ch)
    text = "".join(chars).replace(_DECIMAL_MARK, ".")
    words = text.split()
    # Articles go only when something else is left: "A" (an option letter) or "the" alone is the
    # answer itself, and must not become "" (which an empty prediction would then match).
    kept = [tok for tok in words if tok not in ARTICLES] or words
    return " ".join(NUMBER_WORDS.get(tok, tok) for tok in kept)


def exact_match(pred: str, ref: str) -> bool:
    """True when prediction and reference are equal after :func:`normalize_answer`. An empty
    prediction (nothing left after normalisation) matches nothing."""
    pred_norm = normalize_answer(_require_str(pred, "prediction"))
    return bool(pred_norm) and pred_norm == normalize_answer(_require_str(ref, "reference"))


# ---------------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------------
# An option marker inside an options text: "(A)", or "A." / "A)" / "A:" at the start or after whitespace
# or a separator. Capital letters only, so the article "a" in "a circle" is never taken for a marker.
_OPTION_MARKER = re.compile(r"(?:^|(?<=[\s,;]))(?:\(([A-Z])\)|([A-Z])[.):](?=\s|$))")
# The whole answer is a letter: "A", "a", "(a)", "A.", "B)", "[C]".
_BARE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\].:]?$")
# The answer opens with a marked letter: "(B) square", "B) square", "b. square", "C: square".
_LEADING_LETTER = re.compile(r"^(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])[.):])(?=\s|$)")
# "option B", "answer: (c)", "the answer is D", "choice b." A lower-case letter counts only when
# parenthesised or followed by punctuation/end, so "the answer is a circle" is not read as "A".
_KEYWORD_LETTER = re.compile(
    r"\b(?i:option|answer|choice)s?\b(?:\s+(?i:is))?\s*[:\-]?\s*"
    r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![A-Za-z0-9])|([a-z])(?=\s*(?:[.,;:!?)]|$)))"
)


def parse_options(options: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Letter → option text.

    Accepts the options text as it appears in an instruction ("(A) circle (B) square",
    "A. circle\\nB. square"), a list of option texts (lettered A, B, … in order) or a mapping.
    """
    if isinstance(options, Mapping):
        return {str(k).strip().strip("()").upper(): str(v).strip() for k, v in options.items()}
    if isinstance(options, str):
        marks = list(_OPTION_MARKER.finditer(options))
        parsed: dict[str, str] = {}
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(options)
            letter = m.group(1) or m.group(2)
            parsed.setdefault(letter, options[m.end() : end].strip(" \t\r\n,;"))
        return parsed
    if isinstance(options, Sequence):
        if len(options) > 26:
            raise ValueError(f"options: at most 26 choices can be lettered, got {len(options)}")
        return {chr(ord("A") + i): _require_str(text, f"options[{i}]").strip() for i, text in enumerate(options)}
    raise TypeError(f"options must be a str, a list of str or a mapping, got {type(options).__name__}")


def _letter_from_text(text: str) -> str | None:
    for pattern in (_BARE_LETTER, _LEADING_LETTER):
        m = pattern.match(text)
        if m:
            return next(g for g in m.groups() if g).upper()
    m = _KEYWORD_LETTER.search(text)
    if m:
        return next(g for g in m.groups() if g).upper()
    return None


def _letter_from_option_text(text: str, choices: dict[str, str]) -> str | None:
    norm = normalize_answer(text)
    if not norm:
        return None
    by_text = {letter: normalize_answer(opt) for letter, opt in choices.items()}
    exact = [letter for letter, opt in by_text.items() if opt and opt == norm]
    if len(exact) == 1:
        return exact[0]
    if exact:
        return None  # two options with the same text: the answer cannot tell them apart
    padded = f" {norm} "
    contained = [letter for letter, opt in by_text.items() if opt and f" {opt} " in padded]
    return contained[0] if len(contained) == 1 else None


def option_letter(pred: str, options: str | Sequence[str] | Mapping[str, str] | None = None) -> str | None:
    """The option letter an answer names, upper case, or None when it names none.

    Without options any letter A–Z is accepted. With options only their letters are; an answer
    that spells out an option ("square", "a square", "It is a square") maps to that option's
    letter when exactly one option matches (whole text first, then whole-word containment).
    """
    text = _require_str(pred, "prediction").strip()
    choices = parse_options(options) if options is not None else None
    letter = _letter_from_text(text)
    if letter is not None and (choices is None or letter in choices):
        return letter
    if choices:
        return _letter_from_option_text(text, choices)
    return None


def letter_match(pred: str, ref: str, options: str | Sequence[str] | Mapping[str, str] | None = None) -> bool:
    """True when prediction and reference name the same option.

    The reference goes through the same extraction ("B", "(B) square" or, with options, "square").
    A reference that names no option is a data error, not a miss, so it raises ValueError.
    """
    ref_letter = option_letter(_require_str(ref, "reference"), options)
    if ref_letter is None:
        raise ValueError(f"reference {ref!r} names no option letter" + (f" among {options!r}" if options else ""))
    return option_letter(pred, options) == ref_letter


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------
def mme_yes_no(pred: str) -> str:
    """Read a prediction the way the official MME tool does: "yes", "no" or "other".

    The tool lowercases the prediction; exactly "yes"/"no" count as is; otherwise "yes" anywhere in
    the first 4 characters means yes, else "no" there means no, else "other" (always wrong). No
    stripping: "  yes" is "other", "nope" and "not sure" are "no", "the answer is yes" is "other".
    (The tool reads the prediction with its line's newline still attached; that cannot change the
    outcome, so it is not modelled here.)
    """
    text = _require_str(pred, "prediction").lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"
