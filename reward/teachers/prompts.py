"""The judging prompt shared by the LLM-judge teachers: one rubric for quality, reasoning verbosity (RV) and
cognitive difficulty (CD), each on the 0-9 scale, so a local judge and an HTTP judge label the same thing."""
from __future__ import annotations

SYSTEM = "You are a strict, fair grader of answers to problems. You follow the output format exactly."

RUBRIC = """Grade the response to the problem below.

Problem:
{prompt}
{reference}
Response:
{response}

Scores, each an integer from 0 to 9:
- quality: overall quality of the response. A correct, well-reasoned answer scores high (7-9); a wrong answer
  scores low (1-3); no answer at all scores 0.
- rv (reasoning verbosity): how much reasoning the response writes out. 0 = a bare answer, 9 = very long
  step-by-step reasoning.
- cd (cognitive difficulty): how hard the problem is. 0 = trivial, 9 = very hard.
"""

JSON_INSTRUCTION = ('Reply with only a JSON object, no other text: '
                    '{"quality": <0-9>, "correct": <true or false>, "rv": <0-9>, "cd": <0-9>}')

# One question per score for judges read through their next-token distribution: the prompt ends where the digit goes.
SCORE_QUESTIONS = {
    "quality": "Give only the quality score.",
    "rv": "Give only the rv (reasoning verbosity) score.",
    "cd": "Give only the cd (cognitive difficulty) score.",
}
SCORE_PREFIXES = {"quality": "Quality score (0-9): ", "rv": "RV score (0-9): ", "cd": "CD score (0-9): "}


def rubric(prompt: str, response: str, reference: str | None) -> str:
    """The grading request for one row; the reference answer is shown when the row has one."""
    ref = f"\nReference answer:\n{reference}\n" if reference not in (None, "") else ""
    return RUBRIC.format(prompt=prompt, response=response, reference=ref)
