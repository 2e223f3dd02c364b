"""VQA accuracy (TextVQA, VQAv2): min(#humans who gave the answer / 3, 1), averaged over the
10 leave-one-out subsets of the human answers.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.1, §a.3):

- ``official``: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at ``a013f00``
  as the spec describes it: ``\\n``/``\\t`` become spaces and both sides are stripped; only when the
  human answers are *not unanimous* are both sides normalised (``processPunctuation`` then
  ``processDigitArticle``); the comparison is case-sensitive. So with 10 x ``"yes"`` the
  predictions ``"Yes"`` and ``"yes."`` score 0. (Older revisions we could read, e.g. ``c4e6a0e``,
  always normalise the prediction; see the package report.)
- ``lmms-eval``: ``lmms_eval/tasks/textvqa/utils.py`` with ``_task_utils/vqa_eval_metric.py::
  EvalAIAnswerProcessor`` on both sides (lower-case, drop ``,`` and ``?``, split ``'s``, then the
  punctuation and digit/article/contraction rules). ``dataset="vqav2"`` selects
  ``tasks/vqav2/utils.py`` instead: the prediction goes through the processor, the human answers
  only when they are not unanimous (then both again).
- ``vlmevalkit``: ``vlmeval/dataset/utils/vqa_eval.py::process_answer`` on both sides; its
  period regex is the "fixed" ``(?<!\\d)\\.(?!\\d)``, so a period after a digit survives
  (``"2."`` != ``"2"``, ``"12:30."`` != ``"12:30"``) where the others strip it.
- ``damqa``: DAM-QA ``evaluation/metrics.py::vqa_score`` after its prediction cleanup:
  ``normalize_vqa_answer`` (its own punctuation list with ``}`` twice and no ``{``, articles
  dropped before number words are mapped, a one-character answer is only lower-cased) and
  ``min(k / 3, 1)`` over *all* 10 answers, no leave-one-out (k=1: 0.333 vs 0.3, k=3: 1.0 vs 0.9).
- ``mistral``: mistral-evals ``eval/metrics.py::VQAMatch``: no normalisation except one pair of
  outer quotes, case-sensitive, ``min(k / 3, 1)`` over all answers.

The punctuation rule shared by all of them: each listed character is deleted when it touches a
space or when the text contains a digit-comma-digit, else replaced by a space; then periods not
followed by a digit go (the reference regex ``(?!<=\\d)`` is a look-*ahead* typo, so a period after
a digit goes too), at most 32 of them (``re.UNICODE`` is passed as the ``count`` argument).
"""

from __future__ import annotations

import re
import statistics

from vlmlab.eval.metrics import damqa
from vlmlab.eval.metrics._text import NUMBER_WORDS, strip_one_quote_pair
from vlmlab.eval.metrics.modes import DAMQA, LMMS_EVAL, MISTRAL, OFFICIAL, VLMEVALKIT

# The VQA contraction table (GT-Vision-Lab vqaEval.py ``contractions``; identical in lmms-eval's
# EvalAIAnswerProcessor and VLMEvalKit's _process_digit_article). Mixed-case keys never match
# because words are lower-cased first; kept as in the reference.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# DAM-QA evaluation/metrics.py CONTRACTIONS: its own, shorter, lower-case table.
DAMQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "somebodyd": "somebody'd",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

ARTICLES = ("a", "an", "the")
# vqaEval.py ``punct`` (also EvalAI PUNCTUATIONS and VLMEvalKit process_punctuation).
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# DAM-QA normalize_vqa_answer: "}" listed twice and "{" missing.
DAMQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "}", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

_PERIOD_BUGGY = re.compile(r"(?!<=\d)(\.)(?!\d)")  # vqaEval.py / EvalAI / DAM-QA periodStrip
_PERIOD_FIXED = re.compile(r"(?<!\d)\.(?!\d)")  # VLMEvalKit smp process_punctuation
_COMMA_OFFICIAL = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py / VLMEvalKit / DAM-QA commaStrip
_COMMA_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # EvalAIAnswerProcessor.COMMA_STRIP
_PERIOD_COUNT = int(re.UNICODE)  # re.UNICODE (32) lands in ``sub``'s count argument


def _punctuation(text: str, comma: re.Pattern[str], period: re.Pattern[str]) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return period.sub("", out, count=_PERIOD_COUNT)


def official_punctuation(text: str) -> str:
    """vqaEval.py ``processPunctuation``."""
    return _punctuation(text, _COMMA_OFFICIAL, _PERIOD_BUGGY)


def evalai_punctuation(text: str) -> str:
    """lmms-eval ``EvalAIAnswerProcessor.process_punctuation``."""
    return _punctuation(text, _COMMA_EVALAI, _PERIOD_BUGGY)


def vlmevalkit_punctuation(text: str) -> str:
    """VLMEvalKit ``vlmeval.smp.process_punctuation`` (the fixed period regex)."""
    return _punctuation(text, _COMMA_OFFICIAL, _PERIOD_FIXED)


def digit_article(text: str) -> str:
    """vqaEval.py ``processDigitArticle``: lower-case, number words to digits, drop articles,
    restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_process(text: str) -> str:
    """lmms-eval ``EvalAIAnswerProcessor.__call__``."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return digit_article(evalai_punctuation(text))


def vlmevalkit_process(text: str) -> str:
    """VLMEvalKit ``vqa_eval.py::process_answer``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return digit_article(vlmevalkit_punctuation(text))


def damqa_normalize(answer: str) -> str:
    """DAM-QA ``normalize_vqa_answer``."""
    if len(answer) == 1:
        return answer.lower()
    out = answer
    for p in DAMQA_PUNCTUATION:
        # Unlike vqaEval.py, the condition looks at the text as already modified.
        if (p + " " in out or " " + p in out) or _COMMA_OFFICIAL.search(out) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_BUGGY.sub("", out)
    words = [DAMQA_CONTRACTIONS.get(w, w) for w in out.lower().split() if w not in ARTICLES]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words).strip()


def leave_one_out(prediction: str, answers: list[str]) -> list[float]:
    """Per-subset accuracies: for each answer, min(#matches among the *other* answers / 3, 1)."""
    total = sum(1 for a in answers if a == prediction)
    return [min(1.0, (total - (a == prediction)) / 3) for a in answers]


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def official_vqa(prediction: str, answers: list[str]) -> float:
    """GT-Vision-Lab vqaEval.py ``evaluate`` for one question (spec revision, see module doc)."""
    golds = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(golds)) > 1:
        golds = [digit_article(official_punctuation(a)) for a in golds]
        pred = digit_article(official_punctuation(pred))
    accs = leave_one_out(pred, golds)
    return sum(accs) / len(accs)


def lmms_eval_vqa(prediction: str, answers: list[str], dataset: str | None) -> float:
    """lmms-eval textvqa (default) or vqav2 (``dataset="vqav2"``) ``process_results``."""
    pred = evalai_process(prediction)
    if dataset is not None and dataset.lower().startswith("vqav2"):
        golds = [_clean(a) for a in answers]
        if len(set(golds)) > 1:
            golds = [digit_article(evalai_punctuation(a)) for a in golds]
            pred = digit_article(evalai_punctuation(pred))
    else:
        golds = [evalai_process(a) for a in answers]
    return statistics.mean(leave_one_out(pred, golds))


def vqa_accuracy(
    prediction: str, answers: list[str], mode: str, dataset: str | None = None
) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers`` in ``mode``, in [0, 1].

    Args:
        dataset: only read by ``lmms-eval``: a name starting with ``vqav2`` picks its VQAv2 path.
    """
    if mode == OFFICIAL:
        return official_vqa(prediction, answers)
    if mode == LMMS_EVAL:
        return lmms_eval_vqa(prediction, answers, dataset)
    if mode == VLMEVALKIT:
        pred = vlmevalkit_process(prediction)
        accs = leave_one_out(pred, [vlmevalkit_process(a) for a in answers])
        return sum(accs) / len(accs)
    if mode == DAMQA:
        pred = damqa_normalize(damqa.clean_prediction(prediction))
        matches = sum(1 for a in answers if damqa_normalize(a) == pred)
        return min(1.0, matches / 3.0)
    if mode == MISTRAL:
        pred = strip_one_quote_pair(prediction)
        matches = sum(1 for a in answers if strip_one_quote_pair(a) == pred)
        return min(1.0, matches / 3)
    raise AssertionError(f"unhandled vqa_accuracy mode {mode!r}")  # guarded by check_mode
