"""CaseOps: the lossless case transform of the best record's tokenizer (SPEC section 10), and its exact inverse.

Each maximal run of ASCII letters is written in lower case, its capitals carried by operators: private-use
characters that the CaseOps tokenizer reserves as its user-defined pieces 4-7.

    TITLE   U+E001  before a run whose first letter is a capital        "Paris" -> TITLE "paris"
    ALLCAPS U+E002  before a run of two or more capitals only           "NASA"  -> ALLCAPS "nasa"
    CAPNEXT U+E003  before each later capital of a mixed-case run       "iPhone" -> "i" CAPNEXT "phone",
                                                                        "McDonald" -> TITLE "mc" CAPNEXT "donald"
    ESCAPE  U+E004  before a literal occurrence of any of the four

Everything else (digits, punctuation, whitespace, non-ASCII letters) passes through unchanged, so
decode(encode(text)) == text for every string. The operators stand for no byte of the original: a tokenizer's
operator piece counts 0 bytes, except one that directly follows an ESCAPE piece, which is a literal character
(`counted` below; train_gpt.py's target_bytes applies the same rule to token ids).
"""

import re

TITLE, ALLCAPS, CAPNEXT, ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESCAPE
_OPERATOR_PIECES = set(OPERATORS)

_LITERAL = re.compile("[\ue001-\ue004]")
_CASED_RUN = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")  # a whole run of ASCII letters with a capital in it
_CAPITAL = re.compile("[A-Z]")
_DECODE = re.compile("\ue004(.)|\ue002([a-z]+)|[\ue001\ue003](.)", re.S)


def _encode_run(m):
    run = m.group()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + run.lower()
    rest = _CAPITAL.sub(lambda c: CAPNEXT + c.group().lower(), run[1:])
    return (TITLE + run[0].lower() if run[0] <= "Z" else run[0]) + rest


def encode(text):
    """The CaseOps form of `text`: literal operators escaped, then every run of ASCII letters lower-cased."""
    return _CASED_RUN.sub(_encode_run, _LITERAL.sub(lambda m: ESCAPE + m.group(), text))


def _decode_match(m):
    literal, allcaps, capital = m.groups()
    if literal is not None:
        return literal
    return allcaps.upper() if allcaps is not None else capital.upper()


def decode(text):
    """The exact inverse of encode. On text that encode did not produce (a model's sample, or a tokenizer whose
    normalisation merged a letter with a following combining mark), an operator before any other character
    upper-cases it, and one with nothing after it is kept."""
    return _DECODE.sub(_decode_match, text)


def counted(pieces):
    """Per piece (strings): False for an operator piece, which stands for no byte of the original, True for every
    other piece and for an operator piece directly after an ESCAPE piece (a literal character)."""
    out, escaped = [], False
    for p in pieces:
        out.append(escaped or p not in _OPERATOR_PIECES)
        escaped = p == ESCAPE and not escaped
    return out
