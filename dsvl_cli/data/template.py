"""The DSVL prompt format: renders a Conversation into token ids and labels.

Literal strings are the original's (reference/dsvl-spec.md §2.1).
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.\n\n"
)
IMAGE_MARKER = "### Image {k}:"
QUESTION_HEADER = "### Question:"
ANSWER_HEADER = "### Answer:"
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
