"""records.py: the crash-safe JSONL log that evaluation and the labeller share."""

from __future__ import annotations

from dataclasses import dataclass

import records


@dataclass
class Note:
    id: str
    text: str


def test_a_record_holding_a_unicode_line_separator_reads_back_whole(tmp_path):
    # str.splitlines() splits at U+2028 / U+2029 / U+0085: a record written without escaping must still be one line
    path = tmp_path / "log.jsonl"
    path.write_bytes('{"id": "a", "text": "one\u2028two\u0085three"}\n'.encode())
    assert records.read_records(path, Note) == [Note("a", "one\u2028two\u0085three")]


def test_a_partial_last_line_is_ignored_and_cut_only_on_repair(tmp_path):
    path = tmp_path / "log.jsonl"
    with records.RecordLog(path) as log:
        log.append(Note("a", "x"))
    path.write_bytes(path.read_bytes() + b'{"id": "b", "te')
    assert records.read_records(path, Note) == [Note("a", "x")] and path.read_bytes().endswith(b"te")
    assert records.read_records(path, Note, repair=True) == [Note("a", "x")]
    assert path.read_bytes() == b'{"id": "a", "text": "x"}\n'
