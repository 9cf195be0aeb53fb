"""A smaller encoder's start from a larger trained one of the same family (weight selection).

The student keeps evenly spaced layers of the teacher, and in every layer the same evenly spaced
subset of the residual stream's dimensions and of the feed-forward neurons, and whole attention
heads (so the student takes the teacher's head size: a 256-wide student of a 384-wide teacher with
32-dimensional heads has 8 of its 12 heads). The residual stream keeps one subset throughout, so
what one layer writes the next still reads (Xu et al., 2024, "Initializing models with larger
ones"; DistilBERT keeps every other layer of BERT the same way). A student with a vocabulary of
its own gets each token's embedding from the teacher's embeddings of the same text, averaged over
the teacher's pieces of it (Gee et al., 2022, "Fast vocabulary transfer").

BERT-style encoders (``bert``, ``roberta``, ``xlm-roberta``, ``electra``), whose parameter names
say which dimension is which; anything else starts from random weights, and :func:`plan` says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")
ALL = "all"  # an axis the student and teacher share whole
_LAYER = re.compile(r"\.layer\.(\d+)\.")
_HEADS_OUT = re.compile(r"attention\.self\.(query|key|value)\.(weight|bias)$")  # rows are heads' dimensions
_HEADS_IN = re.compile(r"attention\.output\.dense\.weight$")  # columns are heads' dimensions


@dataclass
class Plan:
    """Which of the teacher's layers, heads, hidden dimensions and neurons the student keeps."""

    layers: list[int]
    heads: list[int]
    head_size: int
    hidden: list[int]
    intermediate: list[int]
    teacher_hidden: int
    teacher_intermediate: int

    def describe(self) -> str:
        return (f"the teacher's layers {','.join(map(str, self.layers))}, {len(self.hidden)} of its "
                f"{self.teacher_hidden} dimensions, {len(self.heads)} of its heads and "
                f"{len(self.intermediate)} of its {self.teacher_intermediate} feed-forward neurons")


def evenly(total: int, keep: int) -> list[int]:
    """``keep`` indices out of ``range(total)``, evenly spaced, first and last included."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def plan(student: dict, teacher: dict) -> tuple[Plan | None, str]:
    """``(plan, "")`` when the student (architecture settings of a transformers config, with
    ``model_type``) can start from the teacher's (a ``config.json``), else ``(None, why not)``.
    The plan's head count replaces the student's: heads keep the teacher's size."""
    kind, theirs = student.get("model_type"), teacher.get("model_type")
    if kind != theirs or kind not in FAMILIES:
        return None, (f"the student is {kind} and the teacher {theirs} (weights carry over within one family of "
                      f"{', '.join(FAMILIES)})")
    sizes = {key: (int(student[key]), int(teacher[key]))
             for key in ("hidden_size", "num_hidden_layers", "intermediate_size")}
    larger = [key for key, (mine, its) in sizes.items() if mine > its]
    if larger:
        return None, f"the student's {larger[0]} ({sizes[larger[0]][0]}) is larger than the teacher's"
    head_size = int(teacher["hidden_size"]) // int(teacher["num_attention_heads"])
    hidden, teacher_hidden = sizes["hidden_size"]
    if hidden % head_size:
        return None, f"the student's hidden size {hidden} is not a multiple of the teacher's head size {head_size}"
    return Plan(layers=evenly(sizes["num_hidden_layers"][1], sizes["num_hidden_layers"][0]),
                heads=evenly(int(teacher["num_attention_heads"]), hidden // head_size), head_size=head_size,
                hidden=evenly(teacher_hidden, hidden), intermediate=evenly(sizes["intermediate_size"][1],
                                                                           sizes["intermediate_size"][0]),
                teacher_hidden=teacher_hidden, teacher_intermediate=sizes["intermediate_size"][1]), ""


def student_architecture(arch: dict, chosen: Plan) -> dict:
    """The student's architecture settings with the teacher's head size."""
    return {**arch, "num_attention_heads": len(chosen.heads)}


def select(student: Any, teacher_weights: dict[str, Any], chosen: Plan, student_tokenizer: Any = None,
           teacher_tokenizer: Any = None) -> list[str]:
    """Copy the selected teacher weights into ``student`` (a transformers model); returns the names of
    the student's parameters left as they were (no teacher weight of a shape that maps)."""
    import torch

    head_dims = [head * chosen.head_size + d for head in chosen.heads for d in range(chosen.head_size)]
    by_size = {(chosen.teacher_hidden, len(chosen.hidden)): chosen.hidden,
               (chosen.teacher_intermediate, len(chosen.intermediate)): chosen.intermediate}
    left = []
    state = student.state_dict()
    with torch.no_grad():
        for name, mine in state.items():
            source = _LAYER.sub(lambda m: f".layer.{chosen.layers[int(m.group(1))]}.", name)
            theirs = teacher_weights.get(source)
            if theirs is None or theirs.dim() != mine.dim():
                left.append(name)
                continue
            theirs = theirs.float()
            if name.endswith("word_embeddings.weight") and student_tokenizer is not None:
                theirs = transfer_vocabulary(theirs, student_tokenizer, teacher_tokenizer)
            picks = [_pick(name, axis, size, their_size, head_dims, by_size)
                     for axis, (size, their_size) in enumerate(zip(mine.shape, theirs.shape, strict=True))]
            if any(pick is None for pick in picks):
                left.append(name)
                continue
            for axis, pick in enumerate(picks):
                if pick is not ALL:
                    theirs = theirs.index_select(axis, torch.tensor(pick))
            mine.copy_(theirs.to(mine.dtype))
    return left


def _pick(name: str, axis: int, size: int, their_size: int, head_dims: list[int],
          by_size: dict[tuple[int, int], list[int]]) -> list[int] | str | None:
    """The teacher's indices along one axis of parameter ``name``: ``ALL``, a subset, or None (no map)."""
    if (axis == 0 and _HEADS_OUT.search(name)) or (axis == 1 and _HEADS_IN.search(name)):
        return head_dims
    if size == their_size:
        return ALL
    if axis == 0 and name.endswith("position_embeddings.weight") and size < their_size:
        return list(range(size))  # the first positions
    return by_size.get((their_size, size))


def transfer_vocabulary(embeddings: Any, student_tokenizer: Any, teacher_tokenizer: Any) -> Any:
    """The student's word embeddings from the teacher's ``embeddings``: a token the teacher also has
    takes its row; a special token takes the teacher's of the same role; any other the mean of the
    rows of the teacher's pieces of its text (a WordPiece ``##`` continuation: of the continuation)."""
    import torch

    theirs = teacher_tokenizer.get_vocab()
    roles = {getattr(student_tokenizer, f"{role}_token", None): getattr(teacher_tokenizer, f"{role}_token_id", None)
             for role in ("cls", "sep", "pad", "mask", "unk", "bos", "eos")}
    unk = teacher_tokenizer.unk_token_id if teacher_tokenizer.unk_token_id is not None else 0
    rows = torch.empty(len(student_tokenizer), embeddings.shape[1])
    for token, index in student_tokenizer.get_vocab().items():
        if token in roles and roles[token] is not None:
            ids = [roles[token]]
        elif token in theirs:
            ids = [theirs[token]]
        else:
            continuation = token.startswith("##")
            text = token[2:] if continuation else student_tokenizer.convert_tokens_to_string([token])
            ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"] or [unk]
            if continuation:
                first = teacher_tokenizer.convert_ids_to_tokens(ids[0])
                ids[0] = theirs.get(f"##{first}", ids[0])
        rows[index] = embeddings[ids].mean(dim=0)
    return rows
