"""Training data: files of records in, fixed-length token batches out.

Why it is built this way:

* **Fixed shapes.** On a memory-constrained device the peak memory of a step is set by the
  batch shape, so every row is exactly ``seq_len`` tokens and every batch exactly ``batch_size``
  rows. A run that fits its first step fits every step.
* **Loss only where the model should learn.** Instruction and chat data put labels only on the
  assistant's tokens (plus the end-of-turn token that closes each reply, so the model learns to
  stop); prompts, system and user turns are ``-100``. Plain text is labelled everywhere.
* **The same template as inference.** Chat and Alpaca records are rendered with the tokenizer's
  own chat template, and each prompt part is tokenized on its own, exactly as a prompt is at
  inference time. The assistant spans are found by rendering prefixes of the conversation
  (``messages[:i]`` with the generation prompt vs ``messages[:i+1]``); a template for which a
  prefix does not render as a prefix of the whole conversation cannot be split this way and is
  reported as an error rather than silently mislabelled.
* **Reproducible and resumable order.** :class:`BatchIterator` draws epoch ``e``'s order from
  ``torch.Generator().manual_seed(seed + e)`` and its state is two integers, so a resumed run
  sees exactly the batches an uninterrupted one would.
* **Bad input is a one-line** :class:`~edgetune.errors.DataError` naming ``file:line``.

Labels are *not* shifted: Hugging Face causal-LM models shift them internally, so the label at
position ``t`` is the target for the logits at ``t - 1`` and a label at position 0 of a row is
never used.

Formats (decided per record by its keys; ``.txt`` vs anything else is the only use of the name):

* ``{"text": "..."}`` — every token is a label; ``eos`` is appended so packed documents stay
  separated.
* ``{"instruction": "...", "input": "..." (optional), "output": "..."}`` — Alpaca; rendered as a
  user turn (instruction, plus ``"\\n\\n" + input`` when input is non-empty) and an assistant turn
  (output). Without a chat template: ``"### Instruction:\\n...\\n\\n### Response:\\n"`` + output + eos.
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` — chat.
* ``.txt`` files: the whole file is text, split on blank lines into one record per paragraph.

Packing (``pack=True``) concatenates all records into one stream and cuts it into rows; documents
in a row attend to each other (no block-diagonal mask), the usual trade for full rows.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ArtifactError, DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ACCEPTED_SHAPES = (
    '{"text": str}, {"instruction": str, "input": str (optional), "output": str} '
    'or {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}'
)
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n"
PLAIN_INPUT = "### Input:\n{input}\n\n"
PLAIN_RESPONSE = "### Response:\n"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One training example as read from a file, before tokenization.

    ``kind`` is ``"text"``, ``"alpaca"`` or ``"chat"``; ``payload`` is the normalised content:
    ``{"text"}``, ``{"instruction", "input", "output"}`` or ``{"messages": [{"role", "content"}]}``.
    ``line`` is the 1-based line the record starts on in ``file``.
    """

    kind: str
    payload: dict[str, Any]
    line: int
    file: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _parse_object(obj: Any, where: str) -> tuple[str, dict[str, Any]]:
    """Decide a JSON object's format by its keys and check its types."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}; accepted shapes: {ACCEPTED_SHAPES}")

    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise DataError(f'{where}: "messages" must be a list, got {_type_name(messages)}')
        if not messages:
            raise DataError(f'{where}: "messages" is empty')
        clean = []
        for j, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise DataError(f"{where}: messages[{j}] must be an object, got {_type_name(msg)}")
            role, content = msg.get("role"), msg.get("content")
            if role not in ROLES:
                raise DataError(f"{where}: messages[{j}].role must be one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise DataError(f"{where}: messages[{j}].content must be a string, got {_type_name(content)}")
            clean.append({"role": role, "content": content})
        return "chat", {"messages": clean}

    if "instruction" in obj or "output" in obj:
        for key in ("instruction", "output"):
            if key not in obj:
                raise DataError(f'{where}: Alpaca record has no "{key}" (needs "instruction" and "output")')
            if not isinstance(obj[key], str):
                raise DataError(f'{where}: "{key}" must be a string, got {_type_name(obj[key])}')
        inp = obj.get("input")
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            raise DataError(f'{where}: "input" must be a string, got {_type_name(inp)}')
        return "alpaca", {"instruction": obj["instruction"], "input": inp, "output": obj["output"]}

    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f'{where}: "text" must be a string, got {_type_name(obj["text"])}')
        return "text", {"text": obj["text"]}

    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise DataError(f"{where}: no recognised keys (got {keys}); accepted shapes: {ACCEPTED_SHAPES}")


def _utf8_error(where: str, err: UnicodeDecodeError, col_offset: int = 0) -> DataError:
    bad = err.object[err.start:err.start + 1].hex()
    return DataError(f"{where}: invalid UTF-8 (byte 0x{bad} at column {err.start - col_offset + 1})")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"no such data file: {path}")
    if not path.is_file():
        raise DataError(f"not a data file (is it a directory?): {path}")


def _read_txt(path: Path, max_records: int | None) -> list[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        raise _utf8_error(f"{path}:{line}", err, col_offset=line_start) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    records: list[Record] = []
    # A paragraph is a run of lines containing non-whitespace; blank (or whitespace-only) lines separate.
    for match in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", text):
        if max_records is not None and len(records) >= max_records:
            break
        para = match.group(0).rstrip()
        line = text.count("\n", 0, match.start()) + 1
        records.append(Record("text", {"text": para}, line, str(path)))
    return records


def _read_jsonl(path: Path, max_records: int | None) -> list[Record]:
    records: list[Record] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if max_records is not None and len(records) >= max_records:
                break
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(where, err) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
                json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone "\ud800" escape parses but is not text
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
            except UnicodeEncodeError:
                raise DataError(f"{where}: invalid JSON (a \\u escape is a lone UTF-16 surrogate, not text)") from None
            except ValueError:  # an integer past Python's 4300-digit limit
                raise DataError(f"{where}: invalid JSON (a number too long)") from None
            kind, payload = _parse_object(obj, where)
            records.append(Record(kind, payload, lineno, str(path)))
    return records


def read_records(path: str | os.PathLike, max_records: int | None = None) -> list[Record]:
    """Read and validate every record of a ``.txt`` or JSONL file (at most ``max_records``).

    Raises :class:`DataError` for a missing file, invalid UTF-8 or JSON, or a record of the wrong
    shape. An empty result is not an error here; :func:`build_dataset` reports it.
    """
    path = Path(path)
    _check_file(path)
    if max_records is not None and max_records < 0:
        raise DataError(f"max_records must be >= 0, got {max_records}")
    if path.suffix.lower() == ".txt":
        return _read_txt(path, max_records)
    return _read_jsonl(path, max_records)


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a Jinja template can raise anything (TemplateError, KeyError, ...)
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{where}: the tokenizer's chat template failed on this record ({msg})") from None
    if not isinstance(out, str):
        raise DataError(f"{where}: the tokenizer's chat template did not render to text")
    return out


def _assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` to put labels on.

    A span starts after ``render(messages[:i], add_generation_prompt=True)`` and ends where
    ``render(messages[:i+1])`` does, less trailing whitespace after the reply (the newline the
    template puts after the end-of-turn token belongs to the template, not the reply).
    """
    full = _render(tokenizer, messages, False, where)
    spans: list[tuple[int, int]] = []
    last_end = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, where)
        upto = _render(tokenizer, messages[: i + 1], False, where)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= last_end):
            raise DataError(
                f"{where}: the chat template does not render messages[:{i}] as a prefix of the conversation, "
                "so the assistant tokens cannot be located"
            )
        tail = upto[len(prompt):]
        content = msg["content"]
        k = tail.find(content) if content else -1
        end = max(len(tail.rstrip()), k + len(content) if k >= 0 else 0)
        spans.append((len(prompt), len(prompt) + end))
        last_end = len(prompt) + end
    return full, spans


def _tokenize_segments(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` piece by piece at span boundaries; labels = ids inside spans, -100 outside."""
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        prompt_ids = _encode(tokenizer, text[pos:start])
        ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        reply_ids = _encode(tokenizer, text[start:end])
        ids += reply_ids
        labels += reply_ids
        pos = end
    return ids, labels


def tokenize_record(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record, unpadded and untruncated; labels are -100 off-target."""
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if eos is not None else []
    if record.kind == "text":
        ids = _encode(tokenizer, record.payload["text"])
        if ids:
            ids += eos_ids
        return ids, list(ids)

    if record.kind == "alpaca":
        p = record.payload
        if not _has_chat_template(tokenizer):
            prompt = PLAIN_PROMPT.format(instruction=p["instruction"])
            if p["input"]:
                prompt += PLAIN_INPUT.format(input=p["input"])
            prompt += PLAIN_RESPONSE
            prompt_ids = _encode(tokenizer, prompt)
            reply_ids = _encode(tokenizer, p["output"]) + eos_ids
            return prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids
        user = p["instruction"] + ("\n\n" + p["input"] if p["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": p["output"]}]
    elif record.kind == "chat":
        if not _has_chat_template(tokenizer):
            raise DataError(f"{record.where}: chat records need a tokenizer with a chat template, and this one has none")
        messages = record.payload["messages"]
    else:  # pragma: no cover - Record kinds come from _parse_object
        raise DataError(f"{record.where}: unknown record kind {record.kind!r}")

    text, spans = _assistant_spans(tokenizer, messages, record.where)
    return _tokenize_segments(tokenizer, text, spans)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


@dataclass
class TokenDataset:
    """Fixed-length rows ready for a causal LM: ``model(input_ids, attention_mask, labels=labels)``."""

    input_ids: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N, T) int64, -100 where there is no loss
    attention_mask: torch.Tensor  # (N, T) int64, 0 on padding
    n_records: int  # records read from the file (before packing / dropping)
    packed: bool = True
    n_dropped_rows: int = 0  # rows left out because no position in them had a loss target
    source: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_label_tokens(self) -> int:
        """Positions with a label (``labels != -100``); position 0 of a row is never a target
        after the model's shift, so the count of tokens that carry loss is ``n_target_tokens``."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_target_tokens(self) -> int:
        """Labels that contribute to the loss after the causal shift (positions 1..T-1)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def rows(self, index: torch.Tensor | list[int] | slice) -> dict[str, torch.Tensor]:
        """A batch dict of the given rows: ``input_ids``, ``labels``, ``attention_mask``, each (B, T)."""
        return {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "attention_mask": self.attention_mask[index],
        }


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def build_dataset(path: str | os.PathLike, tokenizer, seq_len: int, pack: bool = True,
                  max_records: int | None = None) -> TokenDataset:
    """Read ``path`` and turn it into fixed-length rows of ``seq_len`` tokens.

    For an image model ``tokenizer`` is its :class:`~edgetune.training.images.ImagePreprocessor`
    and ``path`` an image folder: that gives an :class:`~edgetune.training.images.ImageDataset`.

    ``pack=True``: all records' tokens are concatenated in file order and cut into rows of exactly
    ``seq_len``; the final partial row is dropped unless it is the only row, in which case it is
    right-padded. ``pack=False``: one row per record, truncated to ``seq_len`` and right-padded
    (pad token id, label -100, attention 0).

    In both modes a row with no loss target (every label at positions 1.. is -100, e.g. a prompt
    longer than ``seq_len``) is dropped, because a batch of only such rows has an undefined (NaN)
    mean loss; ``n_dropped_rows`` counts them. No records, or no label tokens at all, is a
    :class:`DataError` ``"{file}: no training examples"``.
    """
    from .images import ImagePreprocessor, build_image_dataset

    if isinstance(tokenizer, ImagePreprocessor):  # an image model: ``path`` is a folder per class
        return build_image_dataset(path, tokenizer)
    if int(seq_len) < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    seq_len = int(seq_len)
    records = read_records(path, max_records=max_records)
    empty = DataError(f"{path}: no training examples")
    if not records:
        raise empty

    pad = _pad_id(tokenizer)
    encoded = [tokenize_record(r, tokenizer) for r in records]
    if not any(lab != IGNORE_INDEX for _, labels in encoded for lab in labels):
        raise empty

    if pack:
        stream_ids = [t for ids, _ in encoded for t in ids]
        stream_labels = [t for _, labels in encoded for t in labels]
        n_rows = len(stream_ids) // seq_len
        if n_rows == 0:  # the only row: pad it
            n_real = len(stream_ids)
            fill = seq_len - n_real
            input_ids = torch.tensor([stream_ids + [pad] * fill], dtype=torch.long)  # (1, T)
            labels = torch.tensor([stream_labels + [IGNORE_INDEX] * fill], dtype=torch.long)  # (1, T)
            attention = torch.tensor([[1] * n_real + [0] * fill], dtype=torch.long)  # (1, T)
        else:
            keep = n_rows * seq_len
            input_ids = torch.tensor(stream_ids[:keep], dtype=torch.long).view(n_rows, seq_len)  # (N, T)
            labels = torch.tensor(stream_labels[:keep], dtype=torch.long).view(n_rows, seq_len)  # (N, T)
            attention = torch.ones_like(input_ids)  # (N, T)
    else:
        rows_ids, rows_labels, rows_mask = [], [], []
        for ids, labs in encoded:
            if not ids:
                continue
            ids, labs = ids[:seq_len], labs[:seq_len]
            fill = seq_len - len(ids)
            rows_ids.append(ids + [pad] * fill)
            rows_labels.append(labs + [IGNORE_INDEX] * fill)
            rows_mask.append([1] * len(ids) + [0] * fill)
        input_ids = torch.tensor(rows_ids, dtype=torch.long).view(-1, seq_len)  # (N, T)
        labels = torch.tensor(rows_labels, dtype=torch.long).view(-1, seq_len)  # (N, T)
        attention = torch.tensor(rows_mask, dtype=torch.long).view(-1, seq_len)  # (N, T)

    has_target = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)  # (N,)
    n_dropped = int((~has_target).sum())
    if n_dropped:
        input_ids, labels, attention = input_ids[has_target], labels[has_target], attention[has_target]
    if input_ids.shape[0] == 0:
        raise empty
    return TokenDataset(input_ids=input_ids.contiguous(), labels=labels.contiguous(),
                        attention_mask=attention.contiguous(), n_records=len(records), packed=pack,
                        n_dropped_rows=n_dropped, source=str(path))


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


class BatchIterator:
    """Deterministic, resumable shuffled batches of a :class:`TokenDataset`.

    Epoch ``e`` visits the rows in the order ``torch.randperm(N, generator=torch.Generator()
    .manual_seed(seed + e))``, ``B = min(batch_size, N)`` rows at a time. Every batch has exactly
    ``B`` rows (fixed shapes, fixed peak memory), so an epoch is ``N // B`` batches and the
    ``N % B`` rows left at the end of that epoch's permutation are skipped for that epoch only
    (the next epoch's permutation differs). ``batch_size > N`` therefore just uses ``N``.

    The position is ``(epoch, position)`` where ``position`` is the offset into the epoch's
    permutation. ``state()`` returns it as a dict; ``BatchIterator.from_state(dataset, state)``
    (or ``load_state``) continues from it, yielding exactly the batches an uninterrupted run
    would have yielded next. Iteration never ends; take as many batches as there are steps.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int = 0, epoch: int = 0, position: int = 0):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise DataError(f"{dataset.source or 'dataset'}: no training examples")
        self.dataset = dataset
        self.requested_batch_size = int(batch_size)
        self.batch_size = min(int(batch_size), len(dataset))
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.position = int(position)
        self._perm: torch.Tensor | None = None
        self._perm_epoch: int | None = None
        self._normalise()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """Row order of ``epoch``: (N,) int64."""
        gen = torch.Generator().manual_seed(self.seed + int(epoch))
        return torch.randperm(len(self.dataset), generator=gen)

    def _normalise(self) -> None:
        if self.position + self.batch_size > len(self.dataset):
            self.epoch += 1
            self.position = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch (dict of (B, T) tensors), advancing the state."""
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        idx = self._perm[self.position:self.position + self.batch_size]  # (B,)
        batch = self.dataset.rows(idx)
        self.position += self.batch_size
        self._normalise()
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state(self) -> dict[str, int]:
        """JSON-serialisable position: where the next batch comes from, and what it depends on."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.requested_batch_size, "n_rows": len(self.dataset)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()`` of an earlier iterator over the same dataset and settings."""
        for key, mine in (("seed", self.seed), ("batch_size", self.requested_batch_size),
                          ("n_rows", len(self.dataset))):
            if key in state and int(state[key]) != mine:
                raise ArtifactError(f"cannot resume the batch order: saved {key}={state[key]}, this run has {mine}")
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"cannot resume the batch order: bad state {state!r}") from None
        if epoch < 0 or position < 0 or position > len(self.dataset):
            raise ArtifactError(f"cannot resume the batch order: bad state {state!r}")
        self.epoch, self.position = epoch, position
        self._normalise()

    @classmethod
    def from_state(cls, dataset: TokenDataset, state: dict[str, Any]) -> "BatchIterator":
        try:
            batch_size, seed = int(state["batch_size"]), int(state.get("seed", 0))
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"cannot resume the batch order: bad state {state!r}") from None
        it = cls(dataset, batch_size, seed=seed)
        it.load_state(state)
        return it


__all__ = [
    "IGNORE_INDEX", "Record", "TokenDataset", "BatchIterator", "read_records", "tokenize_record", "build_dataset",
]
