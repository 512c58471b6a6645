"""edgetune.training.data: formats, label masks, packing, errors and resumable batch order."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from edgetune.errors import ArtifactError, DataError
from edgetune.training.data import (
    IGNORE_INDEX, BatchIterator, Record, TokenDataset, build_dataset, read_records, tokenize_record,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "edgetune" / "data"
IM_END = "<|im_end|>"


def write_jsonl(path: Path, objs) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled_runs(ids, labels):
    """Contiguous runs of labelled positions as lists of token ids."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t  # labels are unshifted copies of the input ids
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def rec(kind, payload, line=1, file="mem.jsonl"):
    return Record(kind, payload, line, file)


# --------------------------------------------------------------------------------------------
# Label masks per format
# --------------------------------------------------------------------------------------------


def test_text_record_labels_every_token_and_appends_eos(tiny_tokenizer):
    ids, labels = tokenize_record(rec("text", {"text": "The quick brown fox."}), tiny_tokenizer)
    expected = enc(tiny_tokenizer, "The quick brown fox.") + [tiny_tokenizer.eos_token_id]
    assert ids == expected
    assert labels == expected
    assert ids[-1] == 2  # <|im_end|>


def test_alpaca_labels_only_the_reply_and_end_of_turn(tiny_tokenizer):
    r = rec("alpaca", {"instruction": "Say hi", "input": "", "output": "Hi there!"})
    ids, labels = tokenize_record(r, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == (
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n"
    )
    runs = labelled_runs(ids, labels)
    assert [tiny_tokenizer.decode(run) for run in runs] == ["Hi there!" + IM_END]
    prompt = enc(tiny_tokenizer, "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    assert ids[:len(prompt)] == prompt
    assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[-1] == IGNORE_INDEX  # the template's trailing newline is not the reply's
    assert sum(lab != IGNORE_INDEX for lab in labels) == len(enc(tiny_tokenizer, "Hi there!")) + 1


def test_alpaca_input_joins_the_user_turn(tiny_tokenizer):
    r = rec("alpaca", {"instruction": "Define the word.", "input": "frugal", "output": "Careful with money."})
    ids, labels = tokenize_record(r, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids).startswith("<|im_start|>user\nDefine the word.\n\nfrugal<|im_end|>\n")
    assert [tiny_tokenizer.decode(run) for run in labelled_runs(ids, labels)] == ["Careful with money." + IM_END]


def test_alpaca_without_chat_template_uses_plain_prompt(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    r = rec("alpaca", {"instruction": "Add 2 and 3.", "input": "", "output": "5"})
    ids, labels = tokenize_record(r, tok)
    prompt = "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert ids == enc(tok, prompt) + enc(tok, "5") + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(enc(tok, prompt)) + enc(tok, "5") + [tok.eos_token_id]
    r2 = rec("alpaca", {"instruction": "Add.", "input": "2 and 3", "output": "5"})
    ids2, _ = tokenize_record(r2, tok)
    assert tok.decode(ids2) == "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5" + IM_END


def test_chat_labels_exactly_assistant_contents_and_end_of_turn(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ids, labels = tokenize_record(rec("chat", {"messages": messages}), tiny_tokenizer)
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(ids) == full
    runs = labelled_runs(ids, labels)
    assert [tiny_tokenizer.decode(run) for run in runs] == ["Hello!" + IM_END, "Paris." + IM_END]
    labelled = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(labelled) == "Hello!<|im_end|>Paris.<|im_end|>"
    assert labelled.count(tiny_tokenizer.eos_token_id) == 2
    assert len(labelled) == len(enc(tiny_tokenizer, "Hello!")) + len(enc(tiny_tokenizer, "Paris.")) + 2
    # every system/user token is unlabelled: the unlabelled text is the template minus the replies
    unlabelled = tiny_tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert unlabelled == full.replace("Hello!<|im_end|>", "").replace("Paris.<|im_end|>", "")
    assert "Be brief." in unlabelled and "Hi there" in unlabelled and "Capital of France?" in unlabelled


def test_chat_without_assistant_has_no_labels(tiny_tokenizer):
    ids, labels = tokenize_record(rec("chat", {"messages": [{"role": "user", "content": "Hi"}]}), tiny_tokenizer)
    assert len(ids) > 0
    assert all(lab == IGNORE_INDEX for lab in labels)


def test_chat_template_without_prefix_property_is_an_error(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}END{% endif %}"
    )
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": "fine"}, {"messages": msgs}])
    with pytest.raises(DataError) as err:
        build_dataset(path, tok, seq_len=16)
    assert f"{path}:2:" in str(err.value)
    assert "prefix" in str(err.value)
    assert "\n" not in str(err.value)


def test_chat_without_template_is_an_error(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: .*chat template"):
        build_dataset(path, tok, seq_len=16)


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


def test_format_is_decided_per_record_by_keys(tmp_path):
    path = write_jsonl(tmp_path / "mixed.data", [
        {"text": "plain"},
        "",
        {"instruction": "i", "output": "o"},
        "   ",
        {"messages": [{"role": "user", "content": "u"}], "extra": 1},
        {"instruction": "i2", "input": None, "output": "o2", "text": "ignored pre-rendered text"},
    ])
    records = read_records(path)
    assert [(r.kind, r.line) for r in records] == [("text", 1), ("alpaca", 3), ("chat", 5), ("alpaca", 6)]
    assert records[1].payload == {"instruction": "i", "input": "", "output": "o"}
    assert records[2].payload == {"messages": [{"role": "user", "content": "u"}]}
    assert records[3].payload["input"] == ""
    assert records[0].where == f"{path}:1"


def test_txt_paragraphs_with_line_numbers(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First para\nstill first.\n\n\nSecond para.\n   \n  Third\npara.\n\n", encoding="utf-8")
    records = read_records(path)
    assert [r.kind for r in records] == ["text"] * 3
    assert [r.payload["text"] for r in records] == ["First para\nstill first.", "Second para.", "Third\npara."]
    assert [r.line for r in records] == [1, 5, 7]


def test_txt_suffix_only_decides_plain_text(tmp_path):
    # A .txt file of JSON lines is still plain text: the whole line is the text.
    path = tmp_path / "j.txt"
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    [r] = read_records(path)
    assert r.kind == "text" and r.payload["text"] == '{"text": "x"}'


def test_max_records(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"record {i}"} for i in range(10)] + ["not json"])
    assert len(read_records(path, max_records=3)) == 3
    ds = build_dataset(path, tiny_tokenizer, seq_len=8, max_records=4)
    assert ds.n_records == 4
    with pytest.raises(DataError, match=":11: invalid JSON"):
        read_records(path)


# --------------------------------------------------------------------------------------------
# Packing, truncation, padding
# --------------------------------------------------------------------------------------------


def test_packing_preserves_token_stream_in_order(tmp_path, tiny_tokenizer):
    texts = [f"Water boils at {i} degrees." for i in range(12)]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    stream = []
    for t in texts:
        stream += enc(tiny_tokenizer, t) + [tiny_tokenizer.eos_token_id]
    T = 16
    ds = build_dataset(path, tiny_tokenizer, seq_len=T, pack=True)
    n = len(stream) // T
    assert len(stream) % T != 0  # there is a partial row to drop
    assert isinstance(ds, TokenDataset)
    assert tuple(ds.input_ids.shape) == (n, T) == tuple(ds.labels.shape) == tuple(ds.attention_mask.shape)
    assert ds.input_ids.dtype == torch.long
    assert ds.input_ids.flatten().tolist() == stream[: n * T]
    assert torch.equal(ds.labels, ds.input_ids)  # text: every token is a label, unshifted
    assert int(ds.attention_mask.sum()) == n * T
    assert ds.n_records == 12 and ds.n_label_tokens == n * T and ds.n_tokens == n * T
    assert ds.n_target_tokens == n * (T - 1)
    assert ds.seq_len == T and len(ds) == n and ds.packed and ds.n_dropped_rows == 0


def test_packing_mixes_formats_and_keeps_masks(tmp_path, tiny_tokenizer):
    objs = [{"instruction": "Say hi", "output": "Hi!"}, {"text": "hello"}]
    path = write_jsonl(tmp_path / "m.jsonl", objs)
    recs = read_records(path)
    pieces = [tokenize_record(r, tiny_tokenizer) for r in recs]
    ids = pieces[0][0] + pieces[1][0]
    labels = pieces[0][1] + pieces[1][1]
    T = 8
    ds = build_dataset(path, tiny_tokenizer, seq_len=T)
    n = len(ids) // T
    flat_ids, flat_labels = ds.input_ids.flatten().tolist(), ds.labels.flatten().tolist()
    # rows without any loss target are dropped; the kept rows are the stream's rows, in order
    kept = [i for i in range(n) if any(lab != IGNORE_INDEX for lab in labels[i * T + 1:(i + 1) * T])]
    assert len(ds) == len(kept) and ds.n_dropped_rows == n - len(kept)
    assert flat_ids == [t for i in kept for t in ids[i * T:(i + 1) * T]]
    assert flat_labels == [t for i in kept for t in labels[i * T:(i + 1) * T]]


def test_only_row_is_padded(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "hi"}])
    ids = enc(tiny_tokenizer, "hi") + [2]
    T = 32
    ds = build_dataset(path, tiny_tokenizer, seq_len=T, pack=True)
    assert tuple(ds.input_ids.shape) == (1, T)
    k = len(ids)
    assert ds.input_ids[0, :k].tolist() == ids
    assert ds.input_ids[0, k:].tolist() == [tiny_tokenizer.pad_token_id] * (T - k)
    assert ds.labels[0, :k].tolist() == ids and ds.labels[0, k:].tolist() == [IGNORE_INDEX] * (T - k)
    assert ds.attention_mask[0].tolist() == [1] * k + [0] * (T - k)
    assert ds.n_label_tokens == k and ds.n_tokens == k


def test_unpacked_truncates_and_pads(tmp_path, tiny_tokenizer):
    long_text = "The quick brown fox jumps over the lazy dog. " * 5
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "hi"}, {"text": long_text},
                                               {"instruction": "Say hi", "output": "Hi!"}])
    recs = read_records(path)
    toks = [tokenize_record(r, tiny_tokenizer) for r in recs]
    T = 32
    assert len(toks[0][0]) < T < len(toks[1][0]) and len(toks[2][0]) <= T
    ds = build_dataset(path, tiny_tokenizer, seq_len=T, pack=False)
    assert tuple(ds.input_ids.shape) == (3, T) and not ds.packed
    for row, (ids, labels) in enumerate(toks):
        k = min(len(ids), T)
        assert ds.input_ids[row, :k].tolist() == ids[:k]
        assert ds.labels[row, :k].tolist() == labels[:k]
        assert ds.input_ids[row, k:].tolist() == [tiny_tokenizer.pad_token_id] * (T - k)
        assert ds.labels[row, k:].tolist() == [IGNORE_INDEX] * (T - k)
        assert ds.attention_mask[row].tolist() == [1] * k + [0] * (T - k)
    assert ds.n_tokens == len(toks[0][0]) + T + len(toks[2][0])
    assert ds.n_label_tokens == len(toks[0][0]) + T + sum(lab != IGNORE_INDEX for lab in toks[2][1])


def test_unpacked_drops_rows_whose_reply_is_truncated_away(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "word " * 40, "output": "ok"}, {"text": "hello"}])
    ds = build_dataset(path, tiny_tokenizer, seq_len=16, pack=False)
    assert len(ds) == 1 and ds.n_dropped_rows == 1 and ds.n_records == 2
    hello = enc(tiny_tokenizer, "hello") + [2]
    assert ds.input_ids[0, :len(hello)].tolist() == hello


def test_rows_gives_batch_dict(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i} of text"} for i in range(8)])
    ds = build_dataset(path, tiny_tokenizer, seq_len=8)
    b = ds.rows(torch.tensor([2, 0]))
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert torch.equal(b["input_ids"], ds.input_ids[[2, 0]]) and b["labels"].shape == (2, 8)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def expect_error(path, tokenizer, pattern, **kw):
    with pytest.raises(DataError) as err:
        build_dataset(path, tokenizer, seq_len=16, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    assert pattern in msg, msg
    return msg


def test_missing_file(tmp_path, tiny_tokenizer):
    missing = tmp_path / "nope.jsonl"
    assert expect_error(missing, tiny_tokenizer, "no such data file") == f"no such data file: {missing}"
    with pytest.raises(DataError, match="no such data file"):
        read_records(missing)


def test_invalid_json_names_line(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", '{"text": "unterminated'])
    msg = expect_error(path, tiny_tokenizer, f"{path}:3: invalid JSON (")
    assert msg.endswith(")")


def test_non_object_json_value(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "arr.jsonl", [{"text": "ok"}, [1, 2]])
    expect_error(path, tiny_tokenizer, f"{path}:2: expected a JSON object, got array")
    path = write_jsonl(tmp_path / "str.jsonl", ['"just a string"'])
    expect_error(path, tiny_tokenizer, f"{path}:1: expected a JSON object, got string")


def test_unrecognised_keys_lists_accepted_shapes(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "k.jsonl", [{"text": "ok"}, {"text": "ok"}, {"prompt": "p", "completion": "c"}])
    msg = expect_error(path, tiny_tokenizer, f"{path}:3: no recognised keys (got completion, prompt)")
    assert '"text"' in msg and '"instruction"' in msg and '"messages"' in msg


@pytest.mark.parametrize("obj, fragment", [
    ({"messages": "hello"}, '"messages" must be a list, got string'),
    ({"messages": []}, '"messages" is empty'),
    ({"messages": ["hi"]}, "messages[0] must be an object, got string"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string, got number"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "messages[1].role must be one of system, user, assistant, got 'bot'"),
    ({"messages": [{"content": "a"}]}, "messages[0].role must be one of"),
    ({"instruction": "i"}, 'Alpaca record has no "output"'),
    ({"output": "o"}, 'Alpaca record has no "instruction"'),
    ({"instruction": 1, "output": "o"}, '"instruction" must be a string, got number'),
    ({"instruction": "i", "input": ["x"], "output": "o"}, '"input" must be a string, got array'),
    ({"text": None}, '"text" must be a string, got null'),
])
def test_wrong_types_name_file_and_line(tmp_path, tiny_tokenizer, obj, fragment):
    path = write_jsonl(tmp_path / "w.jsonl", [{"text": "ok"}, "", "", obj])
    msg = expect_error(path, tiny_tokenizer, f"{path}:4: ")
    assert fragment in msg


def test_invalid_utf8_jsonl(tmp_path, tiny_tokenizer):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    expect_error(path, tiny_tokenizer, f"{path}:2: invalid UTF-8 (byte 0xe9 at column 14)")


def test_invalid_utf8_txt(tmp_path, tiny_tokenizer):
    path = tmp_path / "u.txt"
    path.write_bytes(b"one\n\nab\xff\n")
    expect_error(path, tiny_tokenizer, f"{path}:3: invalid UTF-8 (byte 0xff at column 3)")


def test_utf8_bom_is_accepted(tmp_path, tiny_tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hi"}\n')
    assert read_records(path)[0].payload == {"text": "hi"}


@pytest.mark.parametrize("content", ["", "\n\n  \n", ])
def test_empty_dataset(tmp_path, tiny_tokenizer, content):
    for name in ("e.jsonl", "e.txt"):
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        assert expect_error(path, tiny_tokenizer, "no training examples") == f"{path}: no training examples"


def test_no_label_tokens_is_empty(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "nolab.jsonl", [{"messages": [{"role": "user", "content": "hello"}]},
                                                   {"messages": [{"role": "system", "content": "s"},
                                                                 {"role": "user", "content": "u"}]}])
    assert expect_error(path, tiny_tokenizer, "no training examples") == f"{path}: no training examples"


def test_directory_is_not_a_data_file(tmp_path, tiny_tokenizer):
    expect_error(tmp_path, tiny_tokenizer, "not a data file")


# --------------------------------------------------------------------------------------------
# BatchIterator
# --------------------------------------------------------------------------------------------


@pytest.fixture
def ten_rows():
    n, t = 10, 4
    ids = torch.arange(n * t, dtype=torch.long).view(n, t)  # row i starts with 4*i
    return TokenDataset(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), n_records=n)


def row_ids(batch):
    return (batch["input_ids"][:, 0] // 4).tolist()


def take(it, k):
    return [row_ids(next(it)) for _ in range(k)]


def test_batches_follow_seeded_permutations(ten_rows):
    it = BatchIterator(ten_rows, batch_size=3, seed=7)
    assert it.batches_per_epoch == 3
    got = take(it, 6)
    for epoch in (0, 1):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert got[3 * epoch:3 * epoch + 3] == [perm[0:3], perm[3:6], perm[6:9]]  # perm[9] skipped this epoch
    b = next(BatchIterator(ten_rows, batch_size=3, seed=7))
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert all(v.shape == (3, 4) for v in b.values())


def test_batches_are_deterministic_and_seed_dependent(ten_rows):
    a = take(BatchIterator(ten_rows, 4, seed=1), 10)
    b = take(BatchIterator(ten_rows, 4, seed=1), 10)
    c = take(BatchIterator(ten_rows, 4, seed=2), 10)
    assert a == b and a != c


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 4, 7])
def test_resume_sees_the_same_batches(ten_rows, stop):
    full = BatchIterator(ten_rows, batch_size=3, seed=5)
    uninterrupted = [next(full) for _ in range(10)]
    first = BatchIterator(ten_rows, batch_size=3, seed=5)
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.state()))  # survives a round trip through a checkpoint file
    resumed = BatchIterator.from_state(ten_rows, state)
    rest = [next(resumed) for _ in range(10 - stop)]
    for x, y in zip(uninterrupted[stop:], rest):
        for key in x:
            assert torch.equal(x[key], y[key])
    other = BatchIterator(ten_rows, batch_size=3, seed=5)
    other.load_state(state)
    assert row_ids(next(other)) == row_ids(uninterrupted[stop])


def test_state_values(ten_rows):
    it = BatchIterator(ten_rows, batch_size=3, seed=5)
    assert it.state() == {"epoch": 0, "position": 0, "seed": 5, "batch_size": 3, "n_rows": 10}
    take(it, 2)
    assert (it.state()["epoch"], it.state()["position"]) == (0, 6)
    take(it, 1)  # 9 rows used, 1 left < batch size: the next batch starts epoch 1
    assert (it.state()["epoch"], it.state()["position"]) == (1, 0)
    started = BatchIterator(ten_rows, batch_size=3, seed=5, epoch=1, position=3)
    perm1 = torch.randperm(10, generator=torch.Generator().manual_seed(6)).tolist()
    assert row_ids(next(started)) == perm1[3:6]


def test_batch_size_larger_than_dataset_uses_all_rows(ten_rows):
    it = BatchIterator(ten_rows, batch_size=64, seed=0)
    assert it.batch_size == 10 and it.batches_per_epoch == 1
    e0, e1 = take(it, 2)
    assert sorted(e0) == list(range(10)) and sorted(e1) == list(range(10)) and e0 != e1
    assert it.state()["batch_size"] == 64


def test_mismatched_state_is_refused(ten_rows):
    state = BatchIterator(ten_rows, 3, seed=5).state()
    with pytest.raises(ArtifactError, match="seed"):
        BatchIterator(ten_rows, 3, seed=6).load_state(state)
    with pytest.raises(ArtifactError, match="batch_size"):
        BatchIterator(ten_rows, 4, seed=5).load_state(state)
    with pytest.raises(ArtifactError, match="bad state"):
        BatchIterator(ten_rows, 3, seed=5).load_state({"epoch": -1, "position": 0})
    with pytest.raises(DataError):
        BatchIterator(ten_rows, 0)


# --------------------------------------------------------------------------------------------
# Shipped data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [("instructions.jsonl", 320), ("instructions_heldout.jsonl", 41)])
def test_shipped_instructions_load(tiny_tokenizer, name, count):
    path = DATA_DIR / name
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        assert set(obj) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in obj.values()) and obj["instruction"] and obj["output"]
    records = read_records(path)
    assert len(records) == count and {r.kind for r in records} == {"alpaca"}
    ds = build_dataset(path, tiny_tokenizer, seq_len=128)
    assert ds.n_records == count and len(ds) > 0 and ds.n_label_tokens > 0
    assert ds.n_dropped_rows == 0


def test_heldout_does_not_repeat_training_examples():
    def keys(name):
        return {(o["instruction"].lower(), o["input"].lower(), o["output"])
                for o in map(json.loads, (DATA_DIR / name).read_text(encoding="utf-8").splitlines())}
    train, held = keys("instructions.jsonl"), keys("instructions_heldout.jsonl")
    assert not {k[:2] for k in train} & {k[:2] for k in held}
    assert not {k[2] for k in train} & {k[2] for k in held}


def test_shipped_calibration_text_loads(tiny_tokenizer):
    records = read_records(DATA_DIR / "calib.txt")
    assert len(records) == 40 and all(r.kind == "text" for r in records)
    ds = build_dataset(DATA_DIR / "calib.txt", tiny_tokenizer, seq_len=128)
    assert ds.n_records == 40 and len(ds) > 10
