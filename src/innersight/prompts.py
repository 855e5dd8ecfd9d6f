"""Answer-format instructions: the fixed sentences benchmarks append to a question to ask for a
short answer, and how a prompt's question splits into the question proper and that sentence.

ViCrop's reference (arXiv 2502.17422, reference code ``run.py``) builds every prompt it reads a map
from, the generic one included, as ``<question> Answer the question using a single word or
phrase.``; LLaVA-1.5's own evaluation puts the same sentence on a new line. Knowing where the
sentence starts lets a method carry it over to another prompt (ViCrop's generic prompt "in the
same template") and lets a family's ``reference`` template attach it the way the paper's code did
(:meth:`innersight.adapters.base.Adapter.reference_question`). This module imports nothing heavy.
"""

from __future__ import annotations

#: LLaVA-1.5's short-answer instruction (LLaVA-1.5 evaluation; ViCrop's prompts)
SHORT_ANSWER = "Answer the question using a single word or phrase."
#: LLaVA-1.5's multiple-choice instruction (V*Bench ``letter`` preset)
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
#: DAMRO's POPE instruction (arXiv 2410.04514 reference evaluation)
ONE_WORD = "Please answer this question with one word."
#: the instructions recognised at the end of a question, longest first
ANSWER_FORMATS: tuple[str, ...] = tuple(sorted((SHORT_ANSWER, LETTER_INSTRUCTION, ONE_WORD), key=len, reverse=True))


def split_answer_format(text: str) -> tuple[str, str, str]:
    """``(question, separator, instruction)`` of ``text``.

    ``instruction`` is the one of :data:`ANSWER_FORMATS` that ends ``text`` (after trailing
    whitespace), ``separator`` the whitespace between it and the question (``"\\n"``, ``" "``...;
    ``""`` when the instruction is the whole text) and ``question`` what precedes. A text that ends
    with none of them is ``(text, "", "")``. ``question + separator + instruction == text.rstrip()``.
    """
    body = text.rstrip()
    for instruction in ANSWER_FORMATS:
        if body.endswith(instruction):
            head = body[: len(body) - len(instruction)]
            question = head.rstrip()
            return question, head[len(question):], instruction
    return text, "", ""


def with_answer_format(question: str, separator: str, instruction: str) -> str:
    """``question`` followed by ``instruction`` (joined by ``separator``; ``question`` alone when
    there is no instruction)."""
    return f"{question}{separator}{instruction}" if instruction else question
