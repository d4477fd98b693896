"""benchmarks/ttft.py --table: rounds saved by separate calls (--first-round) print as one table,
the median and range over all of them."""

import json
import sys

import pytest
import ttft


def rows(first_round, ms):
    return [{"shape": "s", "engine": e, "chunked": "on", "compilation": "eager", "round": first_round, "N": 65536,
             "ttft_ms": t, "decode_ms_per_token": 3.0, "package": "p"} for e, t in ms.items()]


def test_table_merges_rounds_of_separate_files(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(rows(0, {"FLASH_ATTN": 900.0, "FLEX_PREFILL": 600.0})
                            + [{"engine": "FLEX_PREFILL", "round": 0, "host": {"N": 65536}}]))
    b.write_text(json.dumps(rows(1, {"FLASH_ATTN": 1000.0, "FLEX_PREFILL": 400.0})))
    monkeypatch.setattr(sys, "argv", ["ttft.py", "--table", str(a), str(b)])
    ttft.main()
    line = [x for x in capsys.readouterr().out.splitlines() if "65536" in x]
    assert len(line) == 1
    # median of two rounds is their mean; the range shows both processes
    assert "950.0 [900-1000]" in line[0] and "500.0 [400-600]" in line[0]
    assert "FLEX_PREFILL=1.90x" in line[0]


def test_table_without_timed_rows_says_so(tmp_path, monkeypatch):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"engine": "FLASH_ATTN", "round": 0, "host": {"N": 1}}]))
    monkeypatch.setattr(sys, "argv", ["ttft.py", "--table", str(a)])
    with pytest.raises(SystemExit, match="no timed rows"):
        ttft.main()
