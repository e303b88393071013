"""data/caseops.py: the lossless case transform of SPEC section 10, its exact inverse, and its byte rule
(`counted`) against train_gpt.py's target_bytes, which applies the same rule to token ids."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import caseops  # noqa: E402
from caseops import ALLCAPS, CAPNEXT, ESCAPE, TITLE  # noqa: E402

ADVERSARIAL = [
    "", "a", "A", "AB", "Ab", "aB", "ABc", "aBC", "iPhone", "McDonald", "NASA's", "HTTPServer", "x1Y2z", "A.B.C",
    TITLE, ALLCAPS, CAPNEXT, ESCAPE, ESCAPE * 3 + "A", TITLE + "a", "A" + CAPNEXT + "b", ESCAPE + "\n" + ESCAPE,
    "Ünïcode ÀB Straße ΣΑΣ ǅemal Ǆ", "E\u0301TAT", "ﬁne Ｆullwidth", "\u0130stanbul", "tab\tNew\nLINE  ", "😀Emoji😀",
    "The END. " * 3, "\x00Null\x00",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_adversarial(text):
    encoded = caseops.encode(text)
    assert caseops.decode(encoded) == text
    assert not any("A" <= c <= "Z" for c in encoded)  # every ASCII capital is carried by an operator


def random_text(rng, n):
    alphabet = "aAbBzZ" * 4 + "  .,-'0" + caseops.OPERATORS + "ÉéßΣσǅ\u0301😀\n"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_round_trip_random_strings():
    rng = random.Random(0)
    for _ in range(3000):
        text = random_text(rng, rng.randrange(0, 40))
        encoded = caseops.encode(text)
        assert caseops.decode(encoded) == text, repr(text)
        # the original's bytes are exactly the encoded characters that `counted` keeps
        kept = "".join(c for c, k in zip(encoded, caseops.counted(list(encoded))) if k)
        assert len(kept.encode()) == len(text.encode()), repr(text)


@pytest.mark.parametrize("text, expected", [
    ("Paris", TITLE + "paris"), ("A", TITLE + "a"), ("NASA", ALLCAPS + "nasa"), ("iPhone", "i" + CAPNEXT + "phone"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"), ("ABc", TITLE + "a" + CAPNEXT + "bc"), ("lower case", "lower case"),
    ("ÀB", "À" + TITLE + "b"), ("x" + TITLE, "x" + ESCAPE + TITLE), (ESCAPE + "Q", ESCAPE + ESCAPE + TITLE + "q"),
    ("IT'S", ALLCAPS + "it'" + TITLE + "s"),
])
def test_encoding_follows_the_spec(text, expected):
    assert caseops.encode(text) == expected


def test_counted_marks_escaped_operators_as_literals():
    assert caseops.counted([TITLE, "a", ESCAPE, TITLE, ESCAPE, ESCAPE, ALLCAPS, "b"]) == \
        [False, True, False, True, False, True, False, True]
    assert caseops.counted([ESCAPE, ESCAPE, ESCAPE, CAPNEXT, "<0x41>"]) == [False, True, False, True, True]


def test_target_bytes_matches_counted_on_random_id_sequences(tg):
    """train_gpt.py's vectorised rule (parity of the run of escape ids) against caseops.counted's loop."""

    class Pieces:  # a stand-in tokenizer: 1 BOS (control), 4-7 the operators, 8 "ab", 9 "▁c"
        pieces = ["<pad>", "<s>", "</s>", "<unk>", *caseops.OPERATORS, "ab", "\u2581c"]

        def vocab_size(self):
            return len(self.pieces)

        def id_to_piece(self, i):
            return self.pieces[i]

        def piece_to_id(self, p):
            return self.pieces.index(p) if p in self.pieces else 3

        is_control = staticmethod(lambda i: i in (0, 1, 2))
        is_unknown = staticmethod(lambda i: i == 3)
        is_unused = is_byte = staticmethod(lambda i: False)

    sp = Pieces()
    tables = tg.byte_tables(sp, sp.vocab_size())
    assert tables[3].tolist() == [4, 5, 6, 7]
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.choice([1, 4, 5, 6, 7, 7, 7, 8, 9], size=rng.integers(2, 60))
        ids[0] = 1
        keep = caseops.counted([sp.pieces[i] for i in ids])
        ref = []
        for j in range(1, len(ids)):
            t, p = ids[j], ids[j - 1]
            rule = len(sp.pieces[t].lstrip("\u2581").encode()) + (t == 9 and p != 1) if t > 3 else 0
            ref.append(rule if keep[j] else 0)
        assert tg.target_bytes(ids.astype(np.uint16), tables).tolist() == ref, ids.tolist()
