"""Prompt wording shared by several benchmarks, verbatim from each harness.

A prompt builder returns the user turn as an ordered list of pieces: ``str`` text and ``int``
image positions (indices into ``sample.images``). Single-image harnesses put the image first, as
their message lists do (``[{"type": "image"}, {"type": "text"}]``).

Sources (read at the snapshots named in ``/work/shared/specs/eval.md``):
- lmms-eval: ``lmms_eval/tasks/<task>/*.yaml`` ``post_prompt`` values and ``utils.py``.
- VLMEvalKit: ``vlmeval/dataset/image_vqa.py`` ``ImageVQADataset.build_prompt`` (VQA suffix),
  ``image_mcq.py`` ``ImageMCQDataset.build_prompt`` (MCQ template).
- mistral-evals: ``eval/tasks/{chartqa,docvqa,mathvista,mmmu,vqav2}.py`` ``PROMPT``.
- DAM-QA: ``src/config.py`` ``PromptTemplates.FULL_TEMPLATE`` (the DAM-QA method's prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vlmlab.eval.types import EvalSample, PromptBuilder

# lmms-eval docvqa/infovqa/textvqa/vqav2 templates and VLMEvalKit ImageVQADataset.build_prompt.
SINGLE_WORD_OR_PHRASE = "\nAnswer the question using a single word or phrase."

# Prompt texts below keep their source lines whole (some pass 100 columns): the line breaks are
# part of the prompt the model sees.

# mistral-evals eval/tasks/chartqa.py PROMPT (the "should should" typo is theirs, kept verbatim).
MISTRAL_CHARTQA_COT = """Analyze the image and question carefully, using step-by-step reasoning.
First, describe any image provided in detail. Then, present your reasoning. And finally your final answer in this format:
Final Answer: <answer>
where <answer> follows the following instructions:
- <answer> should should be a single phrase or number.
- <answer> should not paraphrase or reformat the text in the image.
- If <answer> is a ratio, it should be a decimal value like 0.25 instead of 1:4.
- If the question is a Yes/No question, <answer> should be Yes/No.
- If <answer> is a number, it should not contain any units.
- If <answer> is a percentage, it should include a % sign.
- If <answer> is an entity, it should include the full label from the graph.
IMPORTANT: Remember, to end your answer with Final Answer: <answer>."""

# mistral-evals eval/tasks/mathvista.py and mmmu.py PROMPT (identical text in both files).
MISTRAL_MC_COT = """Analyze the image and question carefully, using step-by-step reasoning.
First, describe any image provided in detail. Then, present your reasoning. And finally your final answer in this format:
Final Answer: <answer>
where <answer> is:
- The single correct letter choice A, B, C, D, E, F, etc. when options are provided. Only include the letter.
- Your direct answer if no options are given, as a single phrase or number.
- If your answer is a number, only include the number without any unit.
- If your answer is a word or phrase, do not paraphrase or reformat the text you see in the image.
- You cannot answer that the question is unanswerable. You must either pick an option or provide a direct answer.
IMPORTANT: Remember, to end your answer with Final Answer: <answer>."""

# mistral-evals eval/tasks/docvqa.py PROMPT (joined to the question with "\n").
MISTRAL_DOCVQA = "Answer the question using a single word or phrase."

# mistral-evals eval/tasks/vqav2.py PROMPT.
MISTRAL_VQAV2 = """- Answer the question using a single word, number, or short phrase. Use as few words as possible.
- If the answer is a number, report it as a number, i.e. 2, not Two, and only include the number without any unit.
- If the question is Yes/No, answer with Yes/No, and nothing else (no likely, unknown, etc.).
- You cannot answer that the question is unanswerable. You must answer."""

# mistral-evals sends temperature 0 and max_tokens 2048 with the CoT prompts (chartqa.py,
# mathvista.py, mmmu.py at d61811f), 10 with the short ones (docvqa.py, vqav2.py).
MISTRAL_COT_TOKENS = 2048
MISTRAL_SHORT_TOKENS = 10

# DAM-QA src/config.py PromptTemplates.FULL_TEMPLATE minus its leading "<image>\n": the image is
# piece 0 here and the chat template places it. The VLM baselines in DAM-QA's
# evaluation/inference_models/*.py send the same rules (with 'unanswerable' in single quotes) as
# a system prompt and "Question: {q}\nAnswer:" as the user turn; the DAM method's single-turn
# template is the one reproduced.
DAMQA_TEMPLATE = (
    "Answer each question concisely in a single word or short phrase, "
    "without any lengthy descriptions or explanations.\n"
    "Rely only on information that is clearly visible in the provided image.\n"
    'If the answer cannot be determined from the image, respond with "unanswerable".\n'
    "Question: {question}\n"
    "Answer:"
)
DAMQA_TOKENS = 100  # DAM-QA vlms/config.py max_new_tokens (10 for textvqa_val and vqav2)


def image_then(text_of: Callable[[EvalSample], str]) -> PromptBuilder:
    """Builder for single-image prompts: the image, then the text ``text_of(sample)``."""

    def build(sample: EvalSample) -> list[str | int]:
        return [*range(len(sample.images)), text_of(sample)]

    return build


def question_plus(suffix: str) -> PromptBuilder:
    """Image, then ``question + suffix`` (lmms-eval ``{pre_prompt}{question}{post_prompt}``)."""
    return image_then(lambda s: f"{s.question}{suffix}")


def damqa(question_of: Callable[[EvalSample], str] | None = None) -> PromptBuilder:
    """DAM-QA's prompt; ``question_of`` picks the question text (ChartQAPro: first turn)."""

    def question(sample: EvalSample) -> str:
        q = question_of(sample) if question_of else sample.question
        return DAMQA_TEMPLATE.format(question=q.strip())  # DAM-QA format_question strips

    return image_then(question)


def vlmevalkit_mcq(question: str, options: Mapping[str, Any], hint: str | None) -> str:
    """VLMEvalKit ``ImageMCQDataset.build_prompt`` text (hint, question, options, instruction)."""
    prompt = ""
    if hint is not None:
        prompt += f"Hint: {hint}\n"
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n"
        for key, item in options.items():
            prompt += f"{key}. {item}\n"
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def profiles(**builders: PromptBuilder | None) -> dict[str, PromptBuilder]:
    """The profile mapping, dropping the ones a dataset does not have (passed as None)."""
    return {name: b for name, b in builders.items() if b is not None}


def image_positions(pieces: Sequence[str | int]) -> list[int]:
    """The image indices of a rendered prompt, in order."""
    return [p for p in pieces if isinstance(p, int)]
