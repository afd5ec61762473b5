"""Conversation -> token ids + labels. The only place where loss masking is decided.

A training sample is rendered the way the reference recipe renders it (spec §4.4), turn by turn:

    [ prompt(turn 1) ][ answer 1 ][ prompt(turn 2) ][ answer 2 ] ...

* ``prompt(turn k)`` is the official chat template applied to that turn's user message (preceded by the system
  message on the first turn) with the generation prompt: ``<|user|>\\n{content}<|end|>\\n<|assistant|>\\n``. It is
  tokenised the way the official processor tokenises a prompt: split at the ``<|image_k|>`` tags, every text chunk
  through the tokenizer on its own *with* its default special tokens (so each chunk starts with ``<s>`` and gets
  SentencePiece's word-start marker), and each tag replaced by the image's run of image tokens.

  We reproduce this chunking deliberately instead of tokenising the text in one piece: the released weights were
  fine-tuned on exactly these sequences (``<s>`` after every image), so a "cleaner" tokenisation would show the
  model inputs it never saw. ``test_chat.py`` pins the behaviour.
* ``answer k`` is ``{assistant}<|end|>\\n<|endoftext|>`` tokenised without special tokens. These are the only
  supervised tokens: labels are -100 everywhere else (prompt text, image tokens, system text).
* Tags number the images of their own turn (``<|image_1|>`` is the turn's first image), as each turn is one
  processor call in the reference recipe. A turn whose text has no tags gets them prefixed
  (``<|image_1|><|image_2|>...\\n``), the generic jsonl convention. Tags may appear in any order; the images are
  then fed in the order their tags appear, so every feature lands on its own placeholder run.

For generation the last turn stops after its prompt; earlier turns keep their answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from phi3v.processing.tokenizer import END, ENDOFTEXT

IGNORE_INDEX = -100
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
ANSWER_SUFFIX = f"{END}\n{ENDOFTEXT}"


@dataclass
class Turn:
    """One user message with its images and (for training) the assistant's answer.

    Attributes:
        user: The user's text; may hold ``<|image_k|>`` tags.
        images: The turn's images (PIL images or paths), ``<|image_k|>`` is ``images[k-1]``.
        assistant: The answer, or ``None`` for the turn to be generated.
    """

    user: str
    images: list[Any] = field(default_factory=list)
    assistant: str | None = None


@dataclass
class Conversation:
    """A conversation: an optional system message and one or more turns."""

    turns: list[Turn]
    system: str | None = None

    @classmethod
    def from_record(cls, conversations: Sequence[dict], system: str | None = None) -> Conversation:
        """From the generic jsonl ``conversations`` list of ``{"images", "user", "assistant"}`` dicts."""
        return cls(
            turns=[Turn(t["user"], list(t.get("images") or []), t.get("assistant")) for t in conversations],
            system=system,
        )

    @property
    def images(self) -> list[Any]:
        """All images, turn by turn."""
        return [image for turn in self.turns for image in turn.images]


@dataclass
class Rendered:
    """Token ids of a rendered conversation.

    Attributes:
        input_ids: ``[L]`` ids; image positions hold the image token id.
        labels: ``[L]`` supervised ids, ``-100`` elsewhere.
        image_order: Indices into ``Conversation.images`` in the order their placeholder runs appear.
        image_spans: ``(start, end)`` of each placeholder run, in appearance order.
    """

    input_ids: list[int]
    labels: list[int]
    image_order: list[int]
    image_spans: list[tuple[int, int]]


def template_text(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """The official chat template (spec §3.3) in Python."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages)
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        text += "<|assistant|>\n"
    return text


def user_content(turn: Turn, where: str = "turn") -> str:
    """The turn's user text with its image tags checked, or prefixed when it has none.

    Raises:
        ValueError: for tags that do not name each of the turn's images exactly once.
    """
    n = len(turn.images)
    if not IMAGE_TAG.search(turn.user):
        return "".join(f"<|image_{k}|>" for k in range(1, n + 1)) + ("\n" if n else "") + turn.user
    check_tags(turn.user, n, where)
    return turn.user


def check_tags(text: str, n_images: int, where: str) -> None:
    """Raise unless the ``<|image_k|>`` tags of ``text`` name each of ``n_images`` images exactly once."""
    tags = [int(k) for k in IMAGE_TAG.findall(text)]
    if sorted(tags) != list(range(1, n_images + 1)):
        raise ValueError(
            f"{where}: image tags {[f'<|image_{k}|>' for k in tags]} must name each of its {n_images} image(s) "
            f"exactly once (<|image_1|> to <|image_{n_images}|>)"
        )


def turn_prompt_texts(conversation: Conversation) -> list[str]:
    """Each turn's prompt text (template with generation prompt), as it is tokenised."""
    texts = []
    for i, turn in enumerate(conversation.turns):
        messages = [{"role": "user", "content": user_content(turn, f"turn {i + 1}")}]
        if i == 0 and conversation.system is not None:
            messages.insert(0, {"role": "system", "content": conversation.system})
        texts.append(template_text(messages, add_generation_prompt=True))
    return texts


def tokenize_prompt(
    text: str,
    tokenize: Callable[[str, bool], list[int]],
    image_tokens: Sequence[int],
    image_token_id: int,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Tokenise prompt text the way the official processor does (spec §3.2).

    The text is split at ``<|image_k|>`` tags; each text chunk is tokenised on its own with the tokenizer's
    default special tokens; tag ``k`` becomes ``image_tokens[k-1]`` copies of ``image_token_id``.

    Returns:
        ``(ids, order, spans)``: the ids, the 0-based image index of each tag in appearance order, and the
        ``(start, end)`` of each placeholder run.
    """
    ids: list[int] = []
    order: list[int] = []
    spans: list[tuple[int, int]] = []
    for j, piece in enumerate(IMAGE_TAG.split(text)):  # text, tag number, text, tag number, ..., text
        if j % 2 == 0:
            ids += tokenize(piece, True)
        else:
            image = int(piece) - 1
            start = len(ids)
            ids += [image_token_id] * image_tokens[image]
            order.append(image)
            spans.append((start, len(ids)))
    return ids, order, spans


def render(
    conversation: Conversation,
    tokenize: Callable[[str, bool], list[int]],
    image_tokens: Sequence[int],
    image_token_id: int,
    generation: bool = False,
) -> Rendered:
    """Render a conversation to ids and labels.

    Args:
        conversation: The conversation.
        tokenize: ``tokenize(text, add_special_tokens) -> ids``.
        image_tokens: Image-token count of each image of ``conversation.images``.
        image_token_id: Id written at image positions.
        generation: End with the last turn's prompt (its answer, if any, is not rendered).

    Raises:
        ValueError: for a training turn without an answer, or mismatched tags.
    """
    out = Rendered([], [], [], [])
    first_image = 0
    prompts = turn_prompt_texts(conversation)
    for i, (turn, prompt) in enumerate(zip(conversation.turns, prompts, strict=True)):
        counts = image_tokens[first_image : first_image + len(turn.images)]
        ids, order, spans = tokenize_prompt(prompt, tokenize, counts, image_token_id)
        out.image_order += [first_image + k for k in order]
        out.image_spans += [(start + len(out.input_ids), end + len(out.input_ids)) for start, end in spans]
        out.input_ids += ids
        out.labels += [IGNORE_INDEX] * len(ids)
        first_image += len(turn.images)
        if generation and i == len(conversation.turns) - 1:
            break
        if turn.assistant is None:
            purpose = "to continue from" if generation else "to train on"
            raise ValueError(f"turn {i + 1} of {len(conversation.turns)} has no assistant answer {purpose}")
        answer = tokenize(turn.assistant + ANSWER_SUFFIX, False)
        out.input_ids += answer
        out.labels += answer
    return out
