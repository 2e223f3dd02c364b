"""Scoring rules of ``vlmlab.eval.metrics.score``, one case per rule and quirk of the spec.

Every expected value below is derived by hand from the rule the spec (``/work/shared/specs/
eval.md`` §a) and the cited reference file state; the arithmetic is in the comment where it is
not obvious.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmlab.eval.metrics import METRICS, MODES, score
from vlmlab.protocol.errors import BadRequestError, ConfigError, UnknownOptionError

# ----------------------------------------------------------------------------- API


def test_registry_and_modes_agree() -> None:
    assert METRICS.names() == list(MODES)
    assert set(MODES) == {
        "relaxed_accuracy", "anls", "vqa_accuracy", "exact_match", "chartqapro", "ocrbench", "mcq",
    }  # fmt: skip
    for metric, info in MODES.items():
        assert info.default == "official", metric
        assert {"official", "lmms-eval"} <= set(info.supported), metric
    assert "anls-pypi" in MODES["anls"].supported
    assert all("anls-pypi" not in m.supported for k, m in MODES.items() if k != "anls")


def test_unknown_metric_names_it_and_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        score("chartqa_relaxed", "1", ["1"])
    message = str(info.value)
    assert "'chartqa_relaxed'" in message
    assert "relaxed_accuracy, anls, vqa_accuracy, exact_match, chartqapro, ocrbench, mcq" in message


@pytest.mark.parametrize(
    ("metric", "mode"),
    [
        ("anls", "damqa2"),
        ("ocrbench", "damqa"),
        ("exact_match", "mistral"),
        ("chartqapro", "anls-pypi"),
    ],
)
def test_unsupported_mode_names_it_and_lists_the_metric_modes(metric: str, mode: str) -> None:
    with pytest.raises(ConfigError) as info:
        score(metric, "x", ["x"], mode=mode)
    message = str(info.value)
    assert repr(mode) in message and repr(metric) in message
    assert ", ".join(MODES[metric].supported) in message


def test_unknown_field_is_rejected_with_the_accepted_ones() -> None:
    with pytest.raises(UnknownOptionError, match="'question_typ'.*question_type, year"):
        score("chartqapro", "x", ["x"], question_typ="Factoid")
    with pytest.raises(UnknownOptionError, match="Accepted fields: none"):
        score("anls", "x", ["x"], choices=["a"])


def test_bad_inputs_are_bad_requests() -> None:
    with pytest.raises(BadRequestError, match="answers is empty"):
        score("anls", "x", [])
    with pytest.raises(BadRequestError, match="answers must be strings"):
        score("anls", "x", [3])  # type: ignore[list-item]
    with pytest.raises(BadRequestError, match="prediction must be a string"):
        score("anls", 3, ["3"])  # type: ignore[arg-type]


def test_aliases_a_single_answer_string_and_none_prediction() -> None:
    assert score("relaxed-accuracy", "5", "5", mode="official") == 1.0
    assert score("vqa_score", "dog", ["dog"] * 3, mode="lmms-eval") == pytest.approx(
        2 / 3
    )  # 2 of 3
    # None (a failed generation) scores like "": only an empty gold matches it.
    assert score("exact_match", None, ["x"]) == 0.0
    assert score("ocrbench", None, [""], mode="official") == 1.0


# ----------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("2016", "2015", 1.0),  # 1/2015 < 5%: years are within 5% of each other
        ("5%", "5", 0.0),  # 0.05 vs 5
        ("5", "5%", 0.0),
        ("0.05", "5%", 1.0),
        ("0", "0", 1.0),  # gold 0 is falsy: string equality
        ("0.0", "0", 0.0),
        ("1e-9", "0", 0.0),
        ("1,000", "1000", 0.0),  # "1,000" never parses, and the strings differ
        ("1,000", "1,000", 1.0),  # ... but equal strings still match
        ("0.315", "0.3", 0.0),  # |0.315-0.3|/0.3 = 0.05000000000000004 > 0.05
        ("0.7", "0.735", 1.0),  # |0.7-0.735|/0.735 = 0.0476
        ("0.735", "0.7", 0.0),  # 0.035000000000000031/0.7 = 0.05000000000000004: float rounding
        ("0.665", "0.7", 1.0),  # 0.04999999999999989
        ("YES", "yes", 1.0),  # case-insensitive text
        (" 12 ", "12", 1.0),  # float() tolerates whitespace
        ("Yes ", "Yes", 0.0),  # text does not
        ("5% ", "5%", 0.0),  # "5% " does not end with %, so it is text
        ("", "0", 0.0),
        ("İstanbul", "istanbul", 0.0),  # "İ".lower() is two code points
    ],
)
def test_relaxed_official_pix2struct_rule(prediction: str, gold: str, expected: float) -> None:
    assert score("relaxed_accuracy", prediction, [gold], mode="official") == expected
    # lmms-eval's copy (arguments named prediction, target) gives the same results.
    assert score("relaxed_accuracy", prediction, [gold], mode="lmms-eval") == expected


@pytest.mark.parametrize(
    ("prediction", "lmms", "vlmevalkit"),
    [("Yes ", 0.0, 1.0), ("Yes\n", 0.0, 1.0), (" 12\n", 1.0, 1.0), ("Yes", 1.0, 1.0)],
)
def test_relaxed_vlmevalkit_strips_the_prediction(
    prediction: str, lmms: float, vlmevalkit: float
) -> None:
    gold = ["12"] if "12" in prediction else ["Yes"]
    assert score("relaxed_accuracy", prediction, gold, mode="lmms-eval") == lmms
    assert score("relaxed_accuracy", prediction, gold, mode="vlmevalkit") == vlmevalkit


def test_relaxed_takes_the_best_answer() -> None:
    assert score("relaxed_accuracy", "blue", ["red", "Blue"], mode="official") == 1.0


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("5%", "5", 1.0),  # % compared raw and as /100
        ("5", "5%", 1.0),
        ("0.05", "5%", 1.0),
        ("1,000", "1000", 1.0),  # commas removed when the text has a digit
        ("$5", "5", 1.0),
        ("0.0", "0", 1.0),  # |0-0| / max(0, 1e-10) = 0
        ("1e-9", "0", 0.0),  # 1e-9 / 1e-10 = 10
        ('"Paris"', "Paris", 1.0),  # one pair of outer quotes removed
        ("12.", "12", 1.0),  # trailing punctuation removed (text has a digit)
        ("yes.", "Yes", 0.0),  # no digit: only quotes are removed
        ("B) because", "B", 1.0),  # one-letter gold: first character decides
        ("b", "B", 1.0),
        ("Because B", "B", 1.0),  # ... even when it starts a word
        ("Since B", "B", 0.0),
    ],
)
def test_relaxed_mistral_normalisation(prediction: str, gold: str, expected: float) -> None:
    assert score("relaxed_accuracy", prediction, [gold], mode="mistral") == expected


@pytest.mark.parametrize(
    ("generation", "explicit", "anywhere"),
    [
        ("Reasoning ...\nFinal Answer: 42", 1.0, 1.0),
        ("**Final Answer:** 42", 1.0, 1.0),  # markdown around the marker is unwrapped
        ("Answer: 41\nFinal Answer: *42*", 1.0, 1.0),  # the last marker wins, * removed
        ("final answer:\n\n 42 \nmore", 1.0, 1.0),  # first non-empty line
        ("Answer: 30", 0.0, 0.0),  # extracted but wrong (12/42 > 5%): no fallback
        ("Answer: 40", 1.0, 1.0),  # 2/42 = 4.8%: within tolerance
        ("The total is 42 units.", 0.0, 1.0),  # no marker: only the fallback finds "42"
        ("The total is 4,200,042.", 0.0, 1.0),  # the fallback is a substring test: "...042"
        ("", 0.0, 0.0),
    ],
)
def test_relaxed_mistral_explicit_and_anywhere(
    generation: str, explicit: float, anywhere: float
) -> None:
    assert score("relaxed_accuracy", generation, ["42"], mode="mistral-explicit") == explicit
    assert score("relaxed_accuracy", generation, ["42"], mode="mistral-anywhere") == anywhere


@pytest.mark.parametrize(
    ("generation", "gold", "expected"),
    [
        ("The result was 1,000 in total", "1000", 1.0),  # formatted with thousands commas
        ("so it is paris", "Paris", 1.0),  # the pattern is lower-cased ...
        ("so it is Paris", "Paris", 0.0),  # ... the generation is not
        ("this is a cat", "A", 1.0),  # a letter gold matches any "is a"
        ("nothing to see", "A", 0.0),
        ("they rose 12%", "12", 1.0),
    ],
)
def test_relaxed_mistral_anywhere_fallback_quirks(
    generation: str, gold: str, expected: float
) -> None:
    assert score("relaxed_accuracy", generation, [gold], mode="mistral-anywhere") == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "damqa", "official"),
    [
        ("The answer is 12.", "12", 1.0, 0.0),  # "The answer is" and the trailing dot removed
        ("the answer is Yes", "yes", 1.0, 0.0),
        ("THE ANSWER IS 12", "12", 0.0, 0.0),  # only two spellings are removed
        ("yes. ", "yes", 0.0, 0.0),  # rstrip(".") runs before strip(): the dot stays
        (" Yes ", "yes", 1.0, 0.0),  # both sides stripped for text
        ("1,000", "1,000", 0.0, 1.0),  # the CSV round trip turns the gold into (1, 0)
        ("2", "[1, 2]", 1.0, 0.0),  # ... and a list literal into two golds
        ("0.5", "0.50", 1.0, 1.0),
        ("True", "True", 1.0, 1.0),
    ],
)
def test_relaxed_damqa(prediction: str, gold: str, damqa: float, official: float) -> None:
    assert score("relaxed_accuracy", prediction, [gold], mode="damqa") == damqa
    assert score("relaxed_accuracy", prediction, [gold], mode="official") == official


# ----------------------------------------------------------------------------- ANLS

ANLS_MODES = ("official", "lmms-eval", "vlmevalkit", "anls-pypi", "mistral", "damqa")


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        # NL exactly 0.5 (2 edits / 4 chars): RRC keeps 0.5, the anls package's strict cutoff
        # gives 0, mistral has no cutoff, DAM-QA keeps >= 0.5.
        ("abxy", "abcd", (0.5, 0.5, 0.5, 0.0, 0.5, 0.5)),
        # Raw-length denominator: "abd   " has 6 raw characters, 3 normalised ones.
        ("abd   ", "abc", (1 - 1 / 6, 1 - 1 / 6, 1 - 1 / 6, 1 - 1 / 3, 1 - 1 / 3, 1 - 1 / 3)),
        # Case, surrounding and inner whitespace are normalised everywhere.
        ("  New   YORK ", "new york", (1.0,) * 6),
        # Trailing punctuation: only mistral (end strip) and DAM-QA (all punctuation) drop it.
        ("Paris.", "paris", (1 - 1 / 6, 1 - 1 / 6, 1 - 1 / 6, 1 - 1 / 6, 1.0, 1.0)),
        # Below the cutoff: 3 edits / 5 chars -> 0.4, kept only by mistral.
        ("ab", "abcde", (0.0, 0.0, 0.0, 0.0, 0.4, 0.0)),
        # Number words: only DAM-QA maps them to digits.
        ("two", "2", (0.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
        ("U.S.A.", "USA", (0.5, 0.5, 0.5, 0.0, 1 - 2 / 5, 1.0)),  # mistral: "u.s.a" vs "usa"
        # Two empty strings: length 0 -> NL 0 -> 1.0, except DAM-QA (empty -> 0).
        ("", "", (1.0, 1.0, 1.0, 1.0, 1.0, 0.0)),
        ("", "abc", (0.0,) * 6),
    ],
)
def test_anls_modes(prediction: str, gold: str, expected: tuple[float, ...]) -> None:
    for mode, want in zip(ANLS_MODES, expected):
        assert score("anls", prediction, [gold], mode=mode) == pytest.approx(want), mode


def test_anls_damqa_cleans_the_prediction_and_best_answer_wins() -> None:
    assert score("anls", "The answer is Paris.", ["paris"], mode="damqa") == 1.0
    assert score("anls", "The answer is Paris.", ["paris"], mode="official") == 0.0
    assert score("anls", "lyon", ["paris", "Lyon"], mode="official") == 1.0


def test_anls_raw_denominator_counts_upper_case_expansion() -> None:
    # "ß".upper() == "SS": the RRC denominator is max(len("STRASSE")=7, len("STRASSE")=7).
    # "straße" -> "strasse": 2 edits, so 1 - 2/7 everywhere but mistral (max(6, 7) = 7 too).
    assert score("anls", "strasse", ["straße"], mode="official") == pytest.approx(1 - 2 / 7)
    # Here the raw length differs from the normalised one: "ß" alone vs "s": 1 edit,
    # RRC denominator len("SS") = 2 -> 0.5; the anls package uses the same upper() -> 0 (strict).
    assert score("anls", "s", ["ß"], mode="official") == 0.5
    assert score("anls", "s", ["ß"], mode="anls-pypi") == 0.0
    assert score("anls", "s", ["ß"], mode="mistral") == 0.0  # 1 - 1/1


# ----------------------------------------------------------------------------- VQA accuracy

VQA_MODES = ("official", "lmms-eval", "vlmevalkit", "damqa", "mistral")


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # Unanimous gold: the official script does not normalise, so case and the dot count.
        ("Yes", ["yes"] * 10, (0.0, 1.0, 1.0, 1.0, 0.0)),
        ("yes.", ["yes"] * 10, (0.0, 1.0, 1.0, 1.0, 0.0)),
        ("yes", ["yes"] * 10, (1.0,) * 5),
        # Not unanimous: everyone normalises, but VLMEvalKit keeps a period after a digit.
        ("2.", ["2"] * 9 + ["two"], (1.0, 1.0, 0.0, 1.0, 0.0)),
        ("12:30.", ["12:30"] * 9 + ["1230"], (1.0, 1.0, 0.0, 1.0, 0.0)),
        # k = 1: leave-one-out averages 9 x 1/3 and one 0 -> 0.3; DAM-QA min(1/3, 1).
        ("dog", ["dog"] + ["cat"] * 9, (0.3, 0.3, 0.3, 1 / 3, 1 / 3)),
        # k = 3: 3 subsets with 2 matches (2/3) and 7 with 3 (1) -> 0.9; DAM-QA 1.0.
        ("dog", ["dog"] * 3 + ["cat"] * 7, (0.9, 0.9, 0.9, 1.0, 1.0)),
        # Articles, number words, contractions and punctuation are normalised (not by mistral).
        ("A dog!", ["dog"] * 5 + ["cat"] * 5, (1.0, 1.0, 1.0, 1.0, 0.0)),
        ("two", ["2"] * 5 + ["3"] * 5, (1.0, 1.0, 1.0, 1.0, 0.0)),
        ("dont", ["don't"] * 5 + ["do"] * 5, (1.0, 1.0, 1.0, 1.0, 0.0)),
        ('"dog"', ["dog"] * 3 + ["cat"] * 7, (0.9, 0.9, 0.9, 1.0, 1.0)),
    ],
)
def test_vqa_accuracy_modes(
    prediction: str, answers: list[str], expected: tuple[float, ...]
) -> None:
    for mode, want in zip(VQA_MODES, expected):
        assert score("vqa_accuracy", prediction, answers, mode=mode) == pytest.approx(want), mode


def test_vqa_period_removal_stops_after_32() -> None:
    # re.UNICODE (32) lands in re.sub's count: only 32 periods go, so 33 leave one behind.
    answers = ["x"] * 5 + ["y"] * 5
    assert score("vqa_accuracy", "x" + "." * 32, answers, mode="lmms-eval") == 1.0
    assert score("vqa_accuracy", "x" + "." * 33, answers, mode="lmms-eval") == 0.0
    # DAM-QA strips trailing dots from the prediction before normalising.
    assert score("vqa_accuracy", "x" + "." * 33, answers, mode="damqa") == 1.0


def test_vqa_lmms_eval_vqav2_path_keeps_unanimous_gold_raw() -> None:
    # TextVQA path normalises the gold ("two" -> "2"); the VQAv2 path leaves unanimous gold as is.
    assert score("vqa_accuracy", "two", ["two"] * 10, mode="lmms-eval") == 1.0
    assert score("vqa_accuracy", "two", ["two"] * 10, mode="lmms-eval", dataset="vqav2") == 0.0
    assert score("vqa_accuracy", "Yes", ["yes"] * 10, mode="lmms-eval", dataset="vqav2") == 1.0


def test_vqa_evalai_drops_commas_and_splits_possessives() -> None:
    # EvalAI removes "," and "?" first and splits "'s"; VLMEvalKit does not split "'s".
    answers = ["man 's hat"] * 5 + ["hat"] * 5
    assert score("vqa_accuracy", "man's hat", answers, mode="lmms-eval") == 1.0
    assert score("vqa_accuracy", "man's hat", answers, mode="vlmevalkit") == 0.0


# ----------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    ("prediction", "gold", "lmms", "vlmevalkit"),
    [
        ("3.5", "35", 1.0, 0.0),  # lmms-eval deletes all ASCII punctuation
        ("-5", "5", 1.0, 0.0),
        ("Yes ", "yes", 0.0, 1.0),  # ... but does not strip
        ("YES", "yes", 1.0, 1.0),
        ("İ", "i", 1.0, 0.0),  # numpy lower cuts "i̇" to the input width
        ("a\x00", "a", 1.0, 0.0),  # numpy drops trailing NULs; strip() does not
        ("", "", 1.0, 1.0),
        ("café", "CAFÉ", 1.0, 1.0),
    ],
)
def test_exact_match_modes(prediction: str, gold: str, lmms: float, vlmevalkit: float) -> None:
    assert score("exact_match", prediction, [gold], mode="lmms-eval") == lmms
    assert score("exact_match", prediction, [gold], mode="vlmevalkit") == vlmevalkit
    assert score("exact_match", prediction, [gold], mode="official") == vlmevalkit


# ----------------------------------------------------------------------------- ChartQAPro

CQP_MODES = ("official", "vlmevalkit", "lmms-eval", "damqa")


@pytest.mark.parametrize(
    ("prediction", "answers", "question_type", "year", "expected"),
    [
        # The unused exact-match flag: near misses get ANLS 1 - 1/4 officially, 0 when passed.
        ("Tru", ["True"], "Fact Checking", ["NO"], (0.75, 0.75, 0.0, 0.0)),
        ("b", ["a"], "Multi Choice", ["NO"], (0.0, 0.0, 0.0, 0.0)),
        ("true", ["True"], "Fact Checking", ["NO"], (1.0,) * 4),
        # Year YES -> exact; NO -> within 5%.
        ("2016", ["2015"], "Factoid", ["YES"], (0.0,) * 4),
        ("2016", ["2015"], "Factoid", ["NO"], (1.0,) * 4),
        # Conversational: only the last turn's Year flag; DAM-QA drops the row (NaN).
        ("2016", ["1990", "2015"], "Conversational", ["YES", "NO"], (1.0, 1.0, 1.0, math.nan)),
        ("2016", ["1990", "2015"], "Conversational", ["NO", "YES"], (0.0, 0.0, 0.0, math.nan)),
        # Gold 0 needs exactly 0; "%" is stripped on both sides first.
        ("0.01", ["0"], "Factoid", ["NO"], (0.0,) * 4),
        ("0%", ["0"], "Factoid", ["NO"], (1.0,) * 4),
        ("5%", ["5"], "Factoid", ["NO"], (1.0,) * 4),
        # Lists: bare items are re-quoted; missing / extra elements score 0. DAM-QA's gold is the
        # CSV text of the whole answer list, "['[a, b]']", which never splits into items.
        ("['a', 'b']", ["[a, b]"], "Factoid", ["NO"], (1.0, 1.0, 1.0, 0.0)),
        ("['a']", ["[a, b]"], "Factoid", ["NO"], (0.5, 0.5, 0.5, 0.0)),
        ("['a', 'b', 'c']", ["[a, b]"], "Factoid", ["NO"], (2 / 3, 2 / 3, 2 / 3, 0.0)),
        ("a", ["a"], "Factoid", ["NO"], (1.0,) * 4),
        # Dots and newlines at the ends: lmms-eval strips whitespace first.
        ("Paris.\n", ["Paris"], "Factoid", ["NO"], (1 - 1 / 6, 1 - 1 / 6, 1.0, 1.0)),
        # Text branch at NL exactly 0.5: the anls package gives 0, DAM-QA's own ANLS 0.5.
        ("abxy", ["abcd"], "Hypothetical", ["NO"], (0.0, 0.0, 0.0, 0.5)),
    ],
)
def test_chartqapro_modes(
    prediction: str,
    answers: list[str],
    question_type: str,
    year: list[str],
    expected: tuple[float, ...],
) -> None:
    for mode, want in zip(CQP_MODES, expected):
        got = score(
            "chartqapro", prediction, answers, mode=mode, question_type=question_type, year=year
        )
        if math.isnan(want):
            assert math.isnan(got), mode
        else:
            assert got == pytest.approx(want), mode


def test_chartqapro_defaults_and_flag_validation() -> None:
    assert score("chartqapro", "12", ["12"], mode="official") == 1.0  # no year -> all NO
    assert score("chartqapro", "12", ["12"], mode="official", year="YES") == 1.0
    with pytest.raises(BadRequestError, match="year flags must be strings"):
        score("chartqapro", "12", ["12"], mode="official", year=[True])


# ----------------------------------------------------------------------------- OCRBench


@pytest.mark.parametrize(
    ("prediction", "gold", "fields", "expected"),
    [
        ("The sign says HELLO world", "hello", {}, (1.0, 1.0, 1.0)),  # substring, case-insensitive
        ("anything at all", "", {}, (1.0, 1.0, 1.0)),  # an empty gold always matches
        ("HELLO WORLD", "hello\nworld", {}, (1.0, 1.0, 1.0)),  # newline -> space
        ("hello", "hello world", {}, (0.0, 0.0, 0.0)),
        # HME100k: spaces removed, case kept.
        ("x^{2}", "x ^ { 2 }", {"dataset": "HME100k"}, (1.0, 1.0, 1.0)),
        ("X^{2}", "x ^ { 2 }", {"dataset": "HME100k"}, (0.0, 0.0, 0.0)),
        # VLMEvalKit keys the HME branch on the category, the others on the dataset.
        (
            "x^{2}",
            "x ^ { 2 }",
            {"dataset": "HME100k", "category": "Doc-oriented VQA"},
            (1.0, 1.0, 0.0),
        ),
        (
            "x^{2}",
            "x ^ { 2 }",
            {"dataset": "other", "category": "Handwritten Mathematical Expression Recognition"},
            (0.0, 0.0, 1.0),
        ),
        # Full-width ASCII and the ideographic space are folded by lmms-eval only.
        ("ＨＥＬＬＯ", "hello", {}, (0.0, 1.0, 0.0)),
        ("a\u3000b", "a b", {}, (0.0, 1.0, 0.0)),
    ],
)
def test_ocrbench_modes(
    prediction: str, gold: str, fields: dict[str, str], expected: tuple[float, ...]
) -> None:
    for mode, want in zip(("official", "lmms-eval", "vlmevalkit"), expected):
        assert score("ocrbench", prediction, [gold], mode=mode, **fields) == want, mode


# ----------------------------------------------------------------------------- robustness

EDGE_TEXTS = [
    "", " ", "\n\t", "İ", "ß", "\u3000", "ＦＵＬＬ", "𝟙𝟚", "\x00", "nan", "inf", "-0", "[", "['",
    "(A)", "1e999", "..." * 20, "é" * 300, "Final Answer:", "[1, [2]]", "'",
]  # fmt: skip
ALL_PAIRS = [(metric, mode) for metric, info in MODES.items() for mode in info.supported]


def _fields(metric: str) -> dict[str, object]:
    if metric == "mcq":
        return {"choices": ["red", "green", "blue", ""]}
    if metric == "chartqapro":
        return {"question_type": "Factoid", "year": ["NO"]}
    return {}


@pytest.mark.parametrize(("metric", "mode"), ALL_PAIRS)
def test_every_mode_survives_edge_cases(metric: str, mode: str) -> None:
    golds = ["A"] if metric == "mcq" else ["x", "0", "İ", ""]
    for text in EDGE_TEXTS:
        value = score(metric, text, golds, mode=mode, **_fields(metric))
        assert 0.0 <= value <= 1.0, (text, value)


@settings(max_examples=60, deadline=None)
@given(prediction=st.text(max_size=30), gold=st.text(min_size=0, max_size=15))
def test_scores_are_in_unit_interval(prediction: str, gold: str) -> None:
    for metric, mode in ALL_PAIRS:
        golds = ["B"] if metric == "mcq" else [gold]
        value = score(metric, prediction, golds, mode=mode, **_fields(metric))
        assert 0.0 <= value <= 1.0, (metric, mode, prediction, gold)
