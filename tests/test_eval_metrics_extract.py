"""Answer extraction and per-benchmark building blocks of ``vlmlab.eval.metrics``.

Expected values follow the rules in ``/work/shared/specs/eval.md`` §a.2/§c and the reference
files each module cites; nothing here ever guesses an answer (unparsed -> None).
"""

from __future__ import annotations

import pytest

from vlmlab.eval.metrics import (
    circular_eval,
    extract_mcq,
    extract_yes_no,
    final_answer,
    hallusion_scores,
    mathvista_correct,
    mathvista_extract,
    mathvista_normalize,
    mmmu_open_match,
    parse_open_response,
    score,
)
from vlmlab.eval.metrics.mcq import vlmevalkit_can_infer
from vlmlab.protocol.errors import BadRequestError, ConfigError

ANIMALS = ["cat", "bird", "fish", "mouse"]  # options A-D; note D's text is not "dog"

# ----------------------------------------------------------------------------- MCQ extraction


# Expected values below are what VLMEvalKit's ``can_infer`` (matching_util.py at e8e78f05) returns
# for the same reply and option texts ("Z"/False shown as the value ``extract_mcq`` reports).
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # PR #1552: "answer is" + a letter A-D in any case, no boundary after it.
        ("The answer is dog", "D"),
        ("The answer is approximately 3.14", "A"),
        ("The answer is a bird", "A"),  # the article "a" after "answer is" reads as A
        ("The answer is E", None),  # E is no option; the pattern only knows A-D anyway
        ("answer: a cat", "A"),  # no "answer is": the option text "cat" decides
        ("The answer is probably B", "B"),  # "P" is no option: the token rule finds B
        ("<answer>c</answer>", None),  # no XML rule; "<answer>c<" is one token
        ("'B'", None),  # quotes are not stripped, so no "B" token
        ("\\boxed{B}", "B"),  # braces are stripped: "B" is a token
        ("**Final Answer: B**", "B"),
        ("**B**", "B"),
        ("B", "B"),
        ("(C) fish", "C"),
        ("A cat", "A"),  # the lone token "A" counts as the option letter
        ("I would choose B here", "B"),  # the letter is among the last four tokens
        ("B is what I would choose here", None),  # ... not here, and no option text
        ("mouse", "D"),  # exactly one option text contained
        ("the fish", "C"),
        ("a bird or a fish", None),  # two option texts, no letter token
        ("I am quite sure that the right one here is the fish", None),  # reply > 2 x texts
        ("B or C", None),  # two letter tokens
        ("Either B or C, the bird", "B"),  # two letters: the option text decides
        ("The answer is B, not C", "B"),  # two letters: "answer is" decides
        ("Cannot determine the answer", None),  # refusal (VLMEvalKit's Z) is unparsed here
        ("", None),
    ],
)
def test_vlmevalkit_matcher(reply: str, expected: str | None) -> None:
    assert extract_mcq(reply, ANIMALS, "vlmevalkit") == expected


DOGS = ["dog", "bird", "fish", "mouse"]  # like ANIMALS without "cat"


@pytest.mark.parametrize(
    ("reply", "choices", "plain", "verbose"),
    [
        # More than three tokens with an "A": by default the letter still counts when it is
        # among the last four tokens; under VERBOSE only the option texts can decide.
        ("A cat is sitting on the mat", ANIMALS, "A", "A"),  # early "A" ignored; text "cat"
        ("A cat is sitting on the mat", DOGS, None, None),  # ... and no text matches
        ("A bird is sitting on the mat", ANIMALS, "B", "B"),  # the text, not the article
        ("On the mat sits A bird", ANIMALS, "A", "B"),
        ("On the mat sits A dog", ANIMALS, "A", None),
        ("I pick A here", ANIMALS, "A", None),  # four tokens
        ("I pick A, a bird", ANIMALS, "A", "B"),
        # Three tokens or fewer: "A" is the letter either way.
        ("A cat", DOGS, "A", "A"),
        ("It is A", ANIMALS, "A", "A"),
        ("Is it A?", ANIMALS, None, None),  # "?" is not stripped: "A?" is no letter
        # A lowercase "a" is never a letter token.
        ("a cat", DOGS, None, None),
        ("I think it is a bird", ANIMALS, "B", "B"),
        # Refusals and "Z".
        ("Cannot determine the answer", ANIMALS, "Z", "Z"),
        ("Sorry, I can't help with images of people yet.", ANIMALS, "Z", "Z"),
        ("Cannot determine the answer, so B", ANIMALS, "Z", "Z"),  # the refusal comes first
        ("Z", ANIMALS, "Z", "Z"),  # a "Z" token when no letter is found
        ("Z or A", ANIMALS, "A", "A"),
        ("Z or B or C", ANIMALS, None, None),  # two letters: no "Z" either
        ("Failed to obtain answer via API, B", ANIMALS, None, None),  # letters not looked at
        ("Failed to obtain answer via API", ["obtain answer", "dog"], "A", "A"),  # text only
    ],
)
def test_vlmevalkit_can_infer_article_refusal_and_text_fallback(
    reply: str, choices: list[str], plain: str | None, verbose: str | None
) -> None:
    assert vlmevalkit_can_infer(reply, choices) == plain
    assert vlmevalkit_can_infer(reply, choices, verbose=True) == verbose


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Choose the option", "C"),  # last resort: the capital C inside "Choose"
        ("Answer: (c) rabbit", "A"),  # ... the capital A of "Answer"
        ("The correct answer is (C).", "C"),  # answer phrase outranks (A)-style formats
        ("B", "B"),  # starts with the letter
        ("It must be B", "B"),  # ends with the letter
        ("I think it is B because A is wrong", "A"),  # same format: the later position wins
        ("E", "E"),  # its default letter range is A-H
        ("no letters here", None),
        ("   ", None),
    ],
)
def test_lmms_eval_extract_mcq_answer(reply: str, expected: str | None) -> None:
    assert extract_mcq(reply, ANIMALS, "lmms-eval") == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("(A) is wrong but (B) is right", "B"),  # ties -> the last occurrence
        ("(A) and (B) and again (A)", "A"),
        ("I think A is wrong. B is right", "B"),  # "A " and "B ": the later " B " wins
        ("The DATA shows it", "A"),  # "A " inside a word counts
        ("The answer is B.", "B"),
        ("I believe the right one is the fish here", "C"),  # > 5 words: option text
        ("the fish", None),  # <= 5 words: option text is not looked at
        ("xyz", None),  # the official code would pick at random; we report unparsed
    ],
)
def test_official_mmmu_parser(reply: str, expected: str | None) -> None:
    assert extract_mcq(reply, ANIMALS, "official") == expected


def test_unparsed_is_never_a_guess() -> None:
    for _ in range(20):
        assert extract_mcq("I do not know", ANIMALS, "official") is None
    for mode in ("official", "lmms-eval", "vlmevalkit"):
        assert score("mcq", "I do not know", ["A"], mode=mode, choices=ANIMALS) == 0.0


@pytest.mark.parametrize(
    ("reply", "mode", "expected"),
    [
        ("(B)", "official", 1.0),
        ("(B)", "lmms-eval", 1.0),
        ("The answer is bird", "vlmevalkit", 1.0),  # "answer is b..." -> B
        ("The answer is cat", "vlmevalkit", 0.0),  # "answer is c..." -> C, although A is "cat"
        ("B", "mistral", 1.0),
        ("bird", "mistral", 1.0),  # first character "b"
        ("Reasoning.\nFinal Answer: B", "mistral-explicit", 1.0),
        ("B", "mistral-explicit", 0.0),  # no "answer:" marker
        ("this is better", "mistral-anywhere", 1.0),  # "is b" matches the gold letter B
    ],
)
def test_mcq_score(reply: str, mode: str, expected: float) -> None:
    assert score("mcq", reply, ["B"], mode=mode, choices=ANIMALS) == expected


def test_extract_mcq_mistral_letters_and_mode_errors() -> None:
    assert extract_mcq("b) bird", ANIMALS, "mistral") == "B"
    assert extract_mcq("Final Answer: **C**", ANIMALS, "mistral-explicit") == "C"
    assert extract_mcq("Zebra", ANIMALS, "mistral") is None  # Z is no option here
    with pytest.raises(ConfigError, match="mistral-anywhere"):
        extract_mcq("B", ANIMALS, "mistral-anywhere")
    with pytest.raises(BadRequestError, match="needs the option texts"):
        extract_mcq("B", [], "official")
    assert extract_mcq("B", [], "lmms-eval") == "B"


# ----------------------------------------------------------------------------- final answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Reasoning\nFinal Answer: 42", "42"),
        ("**Final Answer:** *[42]*", "42"),  # markdown around and inside is dropped
        ("Answer: 1\nfinal answer: 2", "2"),  # the last marker wins
        ("FINAL ANSWER:\n\n  yes  ", "yes"),
        ("Final Answer:", None),  # marker without an answer line
        ("The answer is 42", None),  # no colon, no marker
        ("", None),
    ],
)
def test_final_answer_explicit(text: str, expected: str | None) -> None:
    assert final_answer(text, "mistral-explicit") == expected


def test_final_answer_anywhere_returns_the_found_reference() -> None:
    assert final_answer("The result was 1,000 in total", "mistral-anywhere", ["1000"]) == "1000"
    assert final_answer("so it is paris", "mistral-anywhere", ["Paris"]) == "Paris"
    assert final_answer("so it is Paris", "mistral-anywhere", ["Paris"]) is None
    assert final_answer("Final Answer: 7", "mistral-anywhere", ["1000"]) == "7"
    assert final_answer("no marker", "mistral-anywhere") is None  # no answers: nothing to find
    with pytest.raises(ConfigError, match="final_answer"):
        final_answer("x", "lmms-eval")


# ----------------------------------------------------------------------------- MMMU open

OPEN_MODES = ("official", "lmms-eval", "vlmevalkit", "mistral-explicit", "mistral-anywhere")


@pytest.mark.parametrize(
    ("reply", "gold", "expected"),
    [
        # The cases of lmms-eval PR #1471: the snapshot's collapsed candidate scores 0.
        ("Therefore the answer is 0.5", "0.5", (True, False, True, False, True)),
        ("The answer is hepatitis", "hepatitis", (True, False, True, False, True)),
        ("The answer is 0.9", "0.5", (False,) * 5),
        # Numbers are rounded to 2 dp and commas dropped before comparing.
        ("It is 3.14159", "3.14", (True, False, True, False, True)),
        ("1,000", "1000", (True, False, False, False, True)),
        ("Final Answer: 1000", "1000", (True, False, True, True, True)),
        # The fake-MCQ of VLMEvalKit: "answer is a..." reads as option A = the gold.
        ("The answer is approximately 7", "3", (False, False, True, False, False)),
    ],
)
def test_mmmu_open_modes(reply: str, gold: str, expected: tuple[bool, ...]) -> None:
    for mode, want in zip(OPEN_MODES, expected):
        assert mmmu_open_match(reply, [gold], mode) is want, mode


def test_mmmu_open_parser_details() -> None:
    assert parse_open_response("Therefore the answer is 0.5") == [0.5]
    # The shortest tail after an indicator ("so " -> "x = 12", "=" -> "12") and its numbers.
    assert parse_open_response("so x = 12") == [12.0]
    # "=" only counts in the last line; a line without an indicator contributes nothing.
    assert parse_open_response("so x = 12\nthe end") == ["x = 12", 12.0]
    # A one-character text is padded to avoid trivial substring matches.
    assert mmmu_open_match("b", ["a"], "official") is False
    assert mmmu_open_match("a", ["a"], "official") is True
    # An empty gold is the only thing the lmms-eval bug can match.
    assert mmmu_open_match("anything", [""], "lmms-eval") is True
    with pytest.raises(ConfigError, match="mmmu_open_match"):
        mmmu_open_match("x", ["x"], "damqa")


# ----------------------------------------------------------------------------- MathVista

FRACTIONS = ["3/11", "8/11", "6/11", "3/5"]
MV_MODES = ("official", "lmms-eval", "vlmevalkit", "mistral-explicit", "mistral-anywhere")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("8/11", (True, True, True, False, False)),  # the reply is a choice
        ("B", (None, None, True, False, False)),  # quick rules miss: the judge would decide
        ("The answer is B", (None, None, True, False, False)),
        ("8/12", (None, None, None, False, False)),
        ("Final Answer: B", (None, None, True, True, True)),
        ("", (False, False, None, False, False)),  # "" -> nearest choice "3/5" (shortest)
    ],
)
def test_mathvista_multiple_choice(reply: str, expected: tuple[bool | None, ...]) -> None:
    for mode, want in zip(MV_MODES, expected):
        got = mathvista_correct(
            reply,
            "8/11",
            question_type="multi_choice",
            answer_type="text",
            choices=FRACTIONS,
            mode=mode,
        )
        assert got is want, mode


@pytest.mark.parametrize(
    ("reply", "answer", "answer_type", "precision", "expected"),
    [
        ("3", "3", "integer", None, (True, True, True)),
        ("3.0", "3", "integer", None, (None, None, None)),  # int("3.0") fails everywhere
        ("1.499", "1.5", "float", 1, (True, True, None)),  # VLMEvalKit does not round
        ("1.50", "1.5", "float", 1, (True, True, True)),
        ("[1, 2]", "[1, 2]", "list", None, (None, None, False)),  # VLMEvalKit: never right
        ("", "3", "integer", None, (False, False, None)),
    ],
)
def test_mathvista_free_form(
    reply: str,
    answer: str,
    answer_type: str,
    precision: int | None,
    expected: tuple[bool | None, ...],
) -> None:
    for mode, want in zip(("official", "lmms-eval", "vlmevalkit"), expected):
        got = mathvista_correct(
            reply,
            answer,
            question_type="free_form",
            answer_type=answer_type,
            precision=precision,
            mode=mode,
        )
        assert got is want, mode


def test_mathvista_normalize_rules() -> None:
    mc = {"choices": FRACTIONS, "question_type": "multi_choice", "answer_type": "text"}
    assert mathvista_normalize("B", **mc) == "8/11"
    assert mathvista_normalize("(b) eight elevenths", **mc) == "8/11"
    assert mathvista_normalize("8/12", **mc) == "8/11"  # nearest by edit distance (first on ties)
    assert mathvista_normalize("", **mc) == "3/5"
    assert mathvista_normalize("", **mc, ignore_empty_extractions=True) is None
    ff = {"choices": [], "question_type": "free_form"}
    assert mathvista_normalize("3.7", **ff, answer_type="integer") == "3"
    assert mathvista_normalize("1.2345", **ff, answer_type="float", precision=2.0) == "1.23"
    assert mathvista_normalize("x", **ff, answer_type="float", precision=1) is None
    assert mathvista_normalize([1, 2], **ff, answer_type="list") == "[1, 2]"
    assert mathvista_extract("12", question_type="free_form", answer_type="float") == "12.0"
    with pytest.raises(BadRequestError, match="needs its choices"):
        mathvista_normalize("A", choices=[], question_type="multi_choice", answer_type="text")


# ----------------------------------------------------------------------------- HallusionBench


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes, it is.", "yes"),
        ("No.", "no"),
        ("YES!", "yes"),
        ("yes and no", None),
        ("Maybe", None),
        ("", None),
    ],
)
def test_extract_yes_no(reply: str, expected: str | None) -> None:
    assert extract_yes_no(reply) == expected


def _hb(
    category: str, sub: str, set_id: int, figure_id: int, question_id: int, correct: bool
) -> dict:
    return {
        "category": category,
        "subcategory": sub,
        "set_id": set_id,
        "figure_id": figure_id,
        "question_id": question_id,
        "correct": correct,
    }


def test_hallusion_groups_by_figure_and_by_question() -> None:
    rows = [
        # set 0: two questions asked on two figure variants each
        _hb("VD", "chart", 0, 0, 0, True),
        _hb("VD", "chart", 0, 0, 1, True),
        _hb("VD", "chart", 0, 1, 0, True),
        _hb("VD", "chart", 0, 1, 1, False),
        # same ids in another subcategory form other groups
        _hb("VD", "map", 0, 0, 0, True),
    ]
    scores = hallusion_scores(rows)
    assert scores["aAcc"] == pytest.approx(4 / 5)
    # figures: chart/0/0 all right, chart/0/1 not, map/0/0 right -> 2/3
    assert scores["fAcc"] == pytest.approx(2 / 3)
    # questions: chart/0/q0 right on both figures, chart/0/q1 not, map/0/q0 right -> 2/3
    assert scores["qAcc"] == pytest.approx(2 / 3)
    vlmevalkit_rows = [
        {("l2-category" if key == "subcategory" else key): value for key, value in row.items()}
        for row in rows
    ]
    assert all("subcategory" not in row for row in vlmevalkit_rows)
    assert hallusion_scores(vlmevalkit_rows) == scores
    with pytest.raises(BadRequestError, match="at least one row"):
        hallusion_scores([])
    with pytest.raises(BadRequestError, match="figure_id"):
        hallusion_scores(
            [{"category": "VD", "subcategory": "c", "set_id": 0, "question_id": 0, "correct": True}]
        )


# ----------------------------------------------------------------------------- MMBench


def test_circular_eval_requires_every_rotation() -> None:
    rows = [
        {"index": 7, "correct": True, "category": "ocr"},
        {"index": 1_000_007, "correct": True},
        {"index": 2_000_007, "correct": True},
        {"index": 8, "correct": True, "category": "ocr"},
        {"index": 1_000_008, "correct": False},  # one wrong rotation sinks question 8
        {"index": 9, "correct": True, "category": "count"},
        {"index": 3_000_009, "correct": None},  # unparsed counts as wrong, and is reported
    ]
    result = circular_eval(rows)
    assert result.n_questions == 3
    assert result.n_correct == 1
    assert result.accuracy == pytest.approx(1 / 3)
    assert result.group_correct == {7: True, 8: False, 9: False}
    assert result.n_with_unparsed == 1
    assert result.by_category == {"ocr": 0.5, "count": 0.0}
    with pytest.raises(BadRequestError, match="index"):
        circular_eval([{"correct": True}])
    with pytest.raises(BadRequestError, match="integer"):
        circular_eval([{"index": "q7", "correct": True}])
