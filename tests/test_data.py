"""Reading records: normalising, tokenising with and without a chat template,
the response flags, file formats, bad rows, over-long records and example ids.

Everything runs on the real tiny BPE tokenizer built by conftest, loaded with
transformers.AutoTokenizer; nothing is mocked.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import build_tiny_teacher, train_records, write_jsonl
from hpd_tools.data import Fields, example_id, read_examples
from hpd_tools.errors import DataError

END = "<|im_end|>"
BIG = 4096

LONG_TEXT = " ".join(
    f"The {w} walked slowly across the wide field and stopped near the old stone wall number {i}."
    for i, w in enumerate(["farmer", "teacher", "doctor", "sailor", "baker", "painter", "singer", "writer"] * 3)
)


@pytest.fixture(scope="session")
def tok(teacher):
    t = AutoTokenizer.from_pretrained(teacher)
    assert t.chat_template and t.eos_token == END
    return t


@pytest.fixture(scope="module")
def nt_tok(tmp_path_factory):
    """A tokenizer without a chat template."""
    path = build_tiny_teacher(tmp_path_factory.mktemp("nt") / "nt", chat_template=False)
    t = AutoTokenizer.from_pretrained(path)
    assert not t.chat_template
    return t


def chat(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def read(tmp_path: Path, records: list, tokenizer, name: str = "data.jsonl", **kw):
    path = write_jsonl(tmp_path / name, records)
    kw.setdefault("max_length", BIG)
    return read_examples(path, tokenizer, **kw)


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


# --- chat records with a template -----------------------------------------------------


def test_chat_record_flags_exactly_the_assistant_turn(tmp_path, tok):
    records = train_records(5)
    examples, report = read(tmp_path, records, tok)
    assert report.rows == report.kept == len(examples) == 5 and not report.skipped
    for record, ex in zip(records, examples):
        user, assistant = (m["content"] for m in record["messages"])
        assert ex.tokens.dtype == np.int32 and ex.response.dtype == np.bool_
        assert ex.tokens.shape == ex.response.shape
        # One contiguous response block at the end: the assistant content and <|im_end|>.
        assert runs(ex.response) == [(int(np.argmax(ex.response)), len(ex.tokens))]
        assert tok.decode(ex.tokens[ex.response]) == assistant + END
        assert ex.tokens[-1] == tok.eos_token_id and ex.response[-1]
        # Everything before it is the prompt, rendered with the generation prompt, unflagged.
        prompt = tok.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)
        assert tok.decode(ex.tokens[~ex.response]) == prompt
        assert user in prompt
        # The whole sequence is the template's rendering, minus the newline after the last <|im_end|>.
        rendered = tok.apply_chat_template(record["messages"], tokenize=False)
        assert rendered.endswith(END + "\n")
        assert tok.decode(ex.tokens) == rendered[:-1]


def test_prompt_response_record_equals_messages_record(tmp_path, tok):
    msgs = train_records(3)
    pairs = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in msgs]
    a, _ = read(tmp_path, msgs, tok, name="msgs.jsonl")
    b, _ = read(tmp_path, pairs, tok, name="pairs.jsonl")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.response, y.response)
        assert x.example_id == y.example_id
    assert len({x.example_id for x in a}) == 3


@pytest.mark.parametrize("system", [False, True])
def test_multi_turn_flags_every_assistant_turn(tmp_path, tok, system):
    turns = [
        ("user", "What is the capital of France?"),
        ("assistant", "The capital of France is Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome is the capital of Italy."),
    ]
    if system:
        turns.insert(0, ("system", "You answer briefly."))
    record = chat(*turns)
    [ex], report = read(tmp_path, [record], tok)
    assert report.kept == 1
    blocks = runs(ex.response)
    assert len(blocks) == 2
    (s1, e1), (s2, e2) = blocks
    assert tok.decode(ex.tokens[s1:e1]) == "The capital of France is Paris." + END
    assert tok.decode(ex.tokens[s2:e2]) == "Rome is the capital of Italy." + END
    assert e2 == len(ex.tokens)
    # The second user turn sits, unflagged, between the two assistant turns.
    between = tok.decode(ex.tokens[e1:s2])
    assert between == "\n<|im_start|>user\nAnd of Italy?" + END + "\n<|im_start|>assistant\n"
    assert "And of Italy?" not in tok.decode(ex.tokens[ex.response])
    first = tok.decode(ex.tokens[:s1])
    assert "What is the capital of France?" in first and (("You answer briefly." in first) == system)
    rendered = tok.apply_chat_template(record["messages"], tokenize=False)
    assert tok.decode(ex.tokens) == rendered[: -len("\n")]


# --- no chat template -------------------------------------------------------------------


def test_without_template_prompt_then_response_then_eos(tmp_path, nt_tok):
    prompt, response = "Name a primary colour.", "Blue is a primary colour."
    records = [{"prompt": prompt, "response": response}, chat(("user", prompt), ("assistant", response))]
    examples, report = read(tmp_path, records, nt_tok)
    assert report.kept == 2
    p = nt_tok(prompt, add_special_tokens=True)["input_ids"]
    r = nt_tok(response, add_special_tokens=False)["input_ids"]
    assert p and r and nt_tok.eos_token_id is not None
    for ex in examples:
        assert ex.tokens.tolist() == p + r + [nt_tok.eos_token_id]
        assert ex.response.tolist() == [False] * len(p) + [True] * (len(r) + 1)
        assert nt_tok.decode(ex.tokens[ex.response]) == response + nt_tok.eos_token
    assert examples[0].example_id == examples[1].example_id


def test_without_template_multi_turn_is_skipped(tmp_path, nt_tok):
    records = [
        {"prompt": "Hi", "response": "Hello."},
        chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
        chat(("system", "s"), ("user", "a"), ("assistant", "b")),
    ]
    examples, report = read(tmp_path, records, nt_tok)
    assert [ex.row for ex in examples] == [1]
    reason = "multi-turn chat needs a tokenizer with a chat template"
    assert report.skipped == Counter({reason: 2})
    assert report.first_rows[reason] == [2, 3]
    with pytest.raises(DataError, match="line 2: multi-turn"):
        read(tmp_path, records, nt_tok, strict=True)


# --- field names ------------------------------------------------------------------------


def test_field_name_overrides(tmp_path, tok):
    base = train_records(2)
    renamed_chat = [{"conversation": r["messages"]} for r in base]
    renamed_pair = [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in base]
    fields = Fields(messages="conversation", prompt="question", response="answer")
    ref, _ = read(tmp_path, base, tok, name="ref.jsonl")
    a, _ = read(tmp_path, renamed_chat, tok, name="a.jsonl", fields=fields)
    b, _ = read(tmp_path, renamed_pair, tok, name="b.jsonl", fields=fields)
    for x, y, z in zip(ref, a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.tokens, z.tokens)
        np.testing.assert_array_equal(x.response, z.response)
        assert x.example_id == y.example_id == z.example_id
    # With the default names the renamed records have no usable field.
    path = write_jsonl(tmp_path / "mixed.jsonl", base[:1] + renamed_chat)
    _, report = read_examples(path, tok, max_length=BIG)
    assert report.skipped == Counter({"missing fields: neither 'messages' nor 'prompt'/'response'": 2})
    # An override for only the response field still finds 'prompt'.
    [ex], _ = read(tmp_path, [{"prompt": "Hi", "output": "Hello there."}], tok, name="c.jsonl", fields=Fields(response="output"))
    assert tok.decode(ex.tokens[ex.response]) == "Hello there." + END


# --- file formats -----------------------------------------------------------------------


def _write_all_formats(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    import datasets
    import pandas as pd

    out = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records)}
    out["json"] = tmp_path / "d.json"
    out["json"].write_text(json.dumps(records))
    out["json_data"] = tmp_path / "d_data.json"
    out["json_data"].write_text(json.dumps({"data": records}))
    out["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(records).to_parquet(out["parquet"])
    out["folder"] = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(out["folder"]))
    out["folder_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(out["folder_dict"]))
    return out


@pytest.mark.parametrize("kind", ["chat", "pairs"])
def test_formats_give_identical_examples(tmp_path, tok, kind):
    records = train_records(6)
    if kind == "pairs":
        records = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in records]
    paths = _write_all_formats(tmp_path, records)
    results = {name: read_examples(p, tok, max_length=BIG) for name, p in paths.items()}
    ref, ref_report = results["jsonl"]
    assert len(ref) == 6 and ref_report.kept == 6
    assert [ex.row for ex in ref] == [1, 2, 3, 4, 5, 6]
    for name, (examples, report) in results.items():
        assert report.rows == report.kept == 6 and not report.skipped, name
        assert [e.example_id for e in examples] == [e.example_id for e in ref], name
        for x, y in zip(examples, ref):
            np.testing.assert_array_equal(x.tokens, y.tokens, err_msg=name)
            np.testing.assert_array_equal(x.response, y.response, err_msg=name)


def test_folder_without_train_split_and_foreign_folder(tmp_path, tok):
    import datasets

    records = train_records(2)
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="no 'train'"):
        read_examples(tmp_path / "dd", tok, max_length=BIG)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="not a saved `datasets` folder"):
        read_examples(tmp_path / "plain", tok, max_length=BIG)


# --- bad rows ---------------------------------------------------------------------------

GOOD = {"prompt": "Say hi.", "response": "Hi!"}
# (raw line or record, reason counted in the report)
BAD_ROWS = [
    ('{"prompt": "x", "response": ', "malformed JSON"),
    ({"prompt": "only a prompt"}, "missing field 'response'"),
    ({"response": "only a response"}, "missing field 'prompt'"),
    ({"prompt": "x", "response": None}, "missing field 'response'"),
    ({"prompt": "x", "response": ""}, "empty response"),
    ({"prompt": "x", "response": "  \n\t "}, "empty response"),
    (chat(("user", "x"), ("assistant", "   ")), "empty response"),
    ({"prompt": "x", "response": 7}, "field 'response' is int, not a string"),
    (chat(("user", "x"), ("assistant", 5)), "message 1 content is int, not a string"),
    ([{"prompt": "x", "response": "y"}], "record is a list, not an object"),
    ("42", "record is a int, not an object"),
    (chat(("bot", "x"), ("assistant", "y")), "message 0 has unknown role 'bot'"),
    (chat(("user", "x"), ("user", "y")), "no assistant message"),
    ({"messages": []}, "field 'messages' is not a non-empty list of messages"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "message 0 lacks 'role' or 'content'"),
    ({"text": "x"}, "missing fields: neither 'messages' nor 'prompt'/'response'"),
]


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
    lines: list = [GOOD]
    expected = Counter()
    first_rows: dict[str, list[int]] = {}
    for bad, reason in BAD_ROWS:
        lines.append(bad)
        expected[reason] += 1
        first_rows.setdefault(reason, []).append(len(lines))
    lines.append("")  # a blank line is not a row but still a line
    lines.append(GOOD)
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in lines))
    examples, report = read_examples(path, tok, max_length=BIG)
    assert [ex.row for ex in examples] == [1, len(lines)]
    assert report.rows == len(BAD_ROWS) + 2 and report.kept == 2
    assert report.skipped == expected
    assert report.first_rows == first_rows
    d = report.as_dict()
    assert d["skipped"]["empty response"] == {"count": 3, "first_rows": first_rows["empty response"]}
    json.dumps(d)  # the report is JSON-serialisable


def test_first_rows_keeps_five_but_counts_all(tmp_path, tok):
    _, report = read(tmp_path, [GOOD] + [{"prompt": "x"}] * 7, tok)
    assert report.skipped["missing field 'response'"] == 7
    assert report.first_rows["missing field 'response'"] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("bad,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_strict_stops_at_first_bad_row_with_one_line(tmp_path, tok, bad, reason):
    path = write_jsonl(tmp_path / "strict.jsonl", [GOOD, GOOD, bad, {"prompt": "y"}])
    with pytest.raises(DataError) as info:
        read_examples(path, tok, max_length=BIG, strict=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path} line 3: {reason}")
    # Without strict the same file is read, bad rows skipped.
    examples, report = read_examples(path, tok, max_length=BIG)
    assert len(examples) == 2 and report.skipped[reason] >= 1


def test_strict_names_row_for_json(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {"prompt": "x"}]))
    with pytest.raises(DataError, match=r"d\.json row \d+: missing field 'response'"):
        read_examples(path, tok, max_length=BIG, strict=True)


# --- length -----------------------------------------------------------------------------


def test_long_response_is_truncated_and_long_prompt_skipped(tmp_path, tok):
    short = {"prompt": "Hi", "response": "Hello."}
    long_response = {"prompt": "Hi", "response": LONG_TEXT}
    long_prompt = {"prompt": LONG_TEXT, "response": "Yes."}
    full, _ = read(tmp_path, [short, long_response, long_prompt], tok, name="full.jsonl")
    prompt_len = int(np.argmax(full[1].response))
    assert prompt_len == int(np.argmax(full[0].response))  # same prompt
    max_length = len(full[0].tokens) + 5
    assert len(full[1].tokens) > max_length and int(np.argmax(full[2].response)) > max_length

    examples, report = read(tmp_path, [short, long_response, long_prompt], tok, max_length=max_length)
    assert [ex.row for ex in examples] == [1, 2]
    assert report.truncated == 1 and report.kept == 2
    cut = examples[1]
    assert len(cut.tokens) == len(cut.response) == max_length
    np.testing.assert_array_equal(cut.tokens, full[1].tokens[:max_length])
    np.testing.assert_array_equal(cut.response, full[1].response[:max_length])
    np.testing.assert_array_equal(examples[0].tokens, full[0].tokens)  # short one untouched
    [(reason, n)] = report.skipped.items()
    assert reason.startswith("prompt is longer than") and n == 1
    assert str(max_length) in reason and report.first_rows[reason] == [3]


def test_truncation_boundary(tmp_path, tok):
    record = {"prompt": "Hi", "response": LONG_TEXT}
    [full], _ = read(tmp_path, [record], tok, name="full.jsonl")
    prompt_len = int(np.argmax(full.response))
    # Room for exactly one response token: kept, truncated.
    [ex], report = read(tmp_path, [record], tok, max_length=prompt_len + 1)
    assert len(ex.tokens) == prompt_len + 1 and ex.response.sum() == 1 and ex.response[-1]
    assert report.truncated == 1 and not report.skipped
    # No room for any response token: skipped (a record with an empty prompt still fits).
    filler = {"prompt": "", "response": "Ok."}
    examples, report = read(tmp_path, [record, filler], tok, max_length=prompt_len)
    assert [e.row for e in examples] == [2]
    assert report.skipped == Counter({f"prompt is longer than --max-length {prompt_len}": 1})
    with pytest.raises(DataError, match=r"line 1: prompt is longer than"):
        read(tmp_path, [record, filler], tok, max_length=prompt_len, strict=True)
    # Only the prompt: too short to be a record.
    with pytest.raises(DataError, match="no usable records"):
        read(tmp_path, [record], tok, max_length=prompt_len)


# --- whole-file errors ------------------------------------------------------------------


def test_no_usable_rows_raises(tmp_path, tok):
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"prompt": "x"}, "{oops", {"prompt": "x", "response": " "}])
    with pytest.raises(DataError) as info:
        read_examples(path, tok, max_length=BIG)
    msg = str(info.value)
    assert str(path) in msg and "no usable records" in msg and "3 rows read" in msg and "\n" not in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable records"):
        read_examples(empty, tok, max_length=BIG)


def test_missing_path_and_unknown_suffix(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_examples(missing, tok, max_length=BIG)
    assert str(missing) in str(info.value)
    txt = tmp_path / "data.txt"
    txt.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"unknown data format '\.txt'"):
        read_examples(txt, tok, max_length=BIG)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "x",')
    with pytest.raises(DataError, match="malformed JSON"):
        read_examples(bad_json, tok, max_length=BIG)
    not_list = tmp_path / "obj.json"
    not_list.write_text(json.dumps({"rows": [GOOD]}))
    with pytest.raises(DataError, match="expected a JSON list"):
        read_examples(not_list, tok, max_length=BIG)


# --- example ids ------------------------------------------------------------------------


def test_example_ids_are_stable_and_content_based(tmp_path, tok, nt_tok):
    records = train_records(20)
    a, _ = read(tmp_path, records, tok, name="a.jsonl")
    b, _ = read(tmp_path, records, tok, name="b.jsonl")
    c, _ = read(tmp_path, records, nt_tok, name="c.jsonl")
    ids = [e.example_id for e in a]
    assert ids == [e.example_id for e in b] == [e.example_id for e in c]
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < 2**64 for i in ids)
    assert ids[0] == example_id(records[0]["messages"])
    # Fields other than the messages (and message keys other than role/content) do not count.
    stripped = {"messages": [{"content": m["content"], "role": m["role"], "name": "x"} for m in records[0]["messages"]]}
    [s], _ = read(tmp_path, [stripped], tok, name="s.jsonl")
    assert s.example_id == ids[0]
    # Any change of content or role changes the id.
    changed = json.loads(json.dumps(records[0]))
    changed["messages"][1]["content"] += " "
    [x], _ = read(tmp_path, [changed], tok, name="x.jsonl")
    assert x.example_id != ids[0]
    assert example_id([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) != example_id(
        [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]
    )
    # A known value pins the hash across versions (first 8 bytes of SHA-256 of the canonical JSON).
    import hashlib

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    canonical = '[{"content":"a","role":"user"},{"content":"b","role":"assistant"}]'
    assert example_id(msgs) == int(hashlib.sha256(canonical.encode()).hexdigest()[:16], 16)


def test_assistant_first_turn_flags_only_its_content(tmp_path, tok):
    record = chat(("assistant", "Hello, how can I help?"), ("user", "Tell me a fact."), ("assistant", "Water boils at 100 C at sea level."))
    [ex], _ = read(tmp_path, [record], tok)
    (s1, e1), (s2, e2) = runs(ex.response)
    assert tok.decode(ex.tokens[s2:e2]) == "Water boils at 100 C at sea level." + END  # later turns are right
    assert tok.decode(ex.tokens[s1:e1]) == "Hello, how can I help?" + END
