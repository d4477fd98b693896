"""benchmarks/ruler.py's answer file: a run stopped part way keeps what it answered, and the
same command started again runs only what is missing (long GPU campaigns run in pieces)."""

import json

import pytest
import ruler
from ruler_tasks import Sample

TASKS = ["niah_single_noise", "vt"]


def fake_samples(lengths, samples=3, timing=1):
    """{length: (samples task-major, timing samples)} with answers "a<task>-<i>"."""
    out = {}
    for n in lengths:
        items = [Sample(task, n, i, (n, t, i), (f"a{t}-{i}",), (), 8) for t, task in enumerate(TASKS)
                 for i in range(samples)]
        timed = [Sample("niah_single_number", n, 100 + i, (n, 9, i), ("x",), (), 1) for i in range(timing)]
        out[n] = (items, timed)
    return out


class FakeEngine:
    """Stands in for a spawned engine: answers each cell (the first answer of every task
    wrong), appending to the answer file as the worker does; can stop after some cells."""

    def __init__(self, stop_after=None):
        self.stop_after, self.specs, self.cells_run = stop_after, [], 0

    def __call__(self, spec):
        self.specs.append(spec)
        for cell in spec["cells"]:
            if self.stop_after is not None and self.cells_run == self.stop_after:
                raise KeyboardInterrupt  # the call's time limit
            self.cells_run += 1
            t = TASKS.index(cell["task"])
            texts = [("wrong" if i == 0 else f"it is a{t}-{i}") for i in range(len(cell["token_ids"]))]
            ruler.append_answer(spec["answers"], {**cell["key"], "expected": cell["expected"], "texts": texts,
                                                  "density": 0.5,
                                                  "sparse_tokens": 10, "dense_tokens": 10, "query_aware": 0.0})
        for item in spec["ttft"]:
            ruler.append_answer(spec["answers"], {**item["key"], "ttft_ms": 12.5})
        return {}


def run(tmp_path, engine, lengths=(1024, 4096), config=None):
    variants = [("native", 2048, [1024]), ("yarn", 8192, [4096])]
    options = {"model": "m", "via": "vllm", "max_num_batched_tokens": None, "stats_dir": str(tmp_path)}
    return ruler.run_engine_cells("flex", config if config is not None else {}, None, variants,
                                  fake_samples(lengths), TASKS, list(lengths), tmp_path / "answers.jsonl", options,
                                  run=engine)


def test_a_stopped_run_goes_on_where_it_stopped(tmp_path):
    first = FakeEngine(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, first)
    assert len(ruler.read_answers(tmp_path / "answers.jsonl")) == 1
    again = FakeEngine()
    result = run(tmp_path, again)
    # the second run got only what the first did not answer: 1 task at 1024, 2 at 4096
    assert [(c["length"], c["task"]) for s in again.specs for c in s["cells"]] == [
        (1024, "vt"), (4096, "niah_single_noise"), (4096, "vt")]
    assert [s["model"] for s in again.specs] == ["native", "yarn"]
    assert len(result["rows"]) == 4
    assert all(r["n"] == 3 and r["all_correct"] == 2 and r["ttft_ms"] == 12.5 for r in result["rows"])
    assert result["scores"]["1024"] == [0.0, 1.0, 1.0] * 2
    assert len(result["texts"]["4096"]) == 6
    # a third run has nothing to do
    idle = FakeEngine()
    assert run(tmp_path, idle) == result and idle.specs == []


def test_other_settings_under_the_same_name_run_again(tmp_path):
    run(tmp_path, FakeEngine())
    other = FakeEngine()
    run(tmp_path, other, config={"gamma": 0.9})
    assert other.cells_run == 4


def test_the_same_settings_under_another_default_run_again(tmp_path, monkeypatch):
    # "{}" under a package whose default gamma is 0.9: not the answers "{}" gave at 0.95
    run(tmp_path, FakeEngine())
    resolved = ruler.resolved_settings
    monkeypatch.setattr(ruler, "resolved_settings", lambda s: s if s is None else {**resolved(s), "gamma": 0.9})
    other_default = FakeEngine()
    run(tmp_path, other_default)
    assert other_default.cells_run == 4
    monkeypatch.undo()
    gammas = {r["config"]["gamma"] for r in ruler.read_answers(tmp_path / "answers.jsonl").values() if "task" in r}
    assert gammas == {0.95, 0.9}
    named = FakeEngine()
    run(tmp_path, named, config={"gamma": 0.9})
    assert named.cells_run == 4  # the same blocks, but other settings as given: its own cells


def test_a_length_with_a_task_missing_has_rows_but_no_prompt_scores(tmp_path):
    answers = tmp_path / "answers.jsonl"
    run(tmp_path, FakeEngine())
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    keep = [r for r in records if not (r.get("length") == 4096 and r.get("task") == "vt")]
    answers.write_text("".join(json.dumps(r) + "\n" for r in keep))
    who = {"engine": "flex", "settings": {}, "config": ruler.resolved_settings({}), "rates": None,
           "via": "vllm", "model": "m"}
    result = ruler.assemble(who,
                            ruler.read_answers(answers), fake_samples([1024, 4096]), TASKS, [1024, 4096])
    assert len(result["rows"]) == 3
    assert set(result["scores"]) == {"1024"}, "paired() reads whole lengths only"


def test_a_line_cut_short_is_skipped_and_the_next_record_kept(tmp_path):
    path = tmp_path / "answers.jsonl"
    ruler.append_answer(path, {"engine": "a", "length": 1, "task": "t", "texts": ["x"]})
    with open(path, "a") as f:
        f.write('{"engine": "b", "len')  # a writer stopped mid-line
    ruler.append_answer(path, {"engine": "c", "length": 1, "task": "t", "texts": ["y"]})
    got = ruler.read_answers(path)
    assert sorted(r["engine"] for r in got.values()) == ["a", "c"]


def test_timing_items_are_medians_of_their_prompts(tmp_path):
    path = tmp_path / "answers.jsonl"
    seen = []
    spec = {"answers": str(path), "ttft": [{"key": {"engine": "e", "length": 8, "ttft": "d"},
                                             "token_ids": [[1], [2], [3]]}]}
    ruler.time_prompts(spec, seen.append, gpu=False)
    assert seen == [[1], [2], [3]]
    (record,) = ruler.read_answers(path).values()
    assert record["engine"] == "e" and record["ttft_ms"] >= 0


def test_the_answer_file_alone_scores_as_the_samples_do(tmp_path):
    # the table of another machine's answers: the records' expected answers, no prompts
    result = run(tmp_path, FakeEngine())
    records = list(ruler.read_answers(tmp_path / "answers.jsonl").values())
    table = ruler.results_from_answers(records)
    rows = table["engines"]["flex"]["rows"]
    assert sorted((r["length"], r["task"], r["accuracy"], r["all_correct"]) for r in rows) == sorted(
        (r["length"], r["task"], r["accuracy"], r["all_correct"]) for r in result["rows"])
    assert ruler.report(table).count("(2/3)") == 4


def cell_record(engine, task, prompts, texts, length=1024):
    return {"engine": engine, "length": length, "task": task, "prompts": prompts, "texts": texts,
            "expected": [["a"]] * len(texts), "density": None, "sparse_tokens": 0, "dense_tokens": 0}


def test_one_engine_name_under_two_defaults_has_a_column_for_each():
    old = {**cell_record("flex", "t1", "p1", ["a", "b", "b"]), "config": {"gamma": 0.95, "tau": 0.1}}
    new = {**cell_record("flex", "t1", "p1", ["a", "a", "b"]), "config": {"gamma": 0.9, "tau": 0.1}}
    dense = cell_record("dense", "t1", "p1", ["a", "a", "a"])
    table = ruler.results_from_answers([dense, old, new])
    assert list(table["engines"]) == ["dense", "flex[gamma=0.95]", "flex[gamma=0.9]"]
    assert [r["all_correct"] for e in table["engines"].values() for r in e["rows"]] == [3, 1, 2]
    # a plain name picks every column of that engine; one engine under one setting keeps its name
    assert list(ruler.results_from_answers([dense, old, new], ["dense", "flex"])["engines"]) == [
        "dense", "flex[gamma=0.95]", "flex[gamma=0.9]"]
    assert list(ruler.results_from_answers([dense, new])["engines"]) == ["dense", "flex"]


def test_the_comparison_pairs_only_cells_on_the_same_prompts():
    records = [cell_record("dense", "t1", "p1", ["a", "a", "b"]), cell_record("flex", "t1", "p1", ["b", "a", "a"]),
               cell_record("dense", "t2", "p2", ["a", "a", "a"]), cell_record("flex", "t2", "OTHER", ["b"] * 3),
               cell_record("dense", "t3", "p3", ["a"] * 3)]  # flex did not answer t3
    table = ruler.results_from_answers(records)
    assert table["meta"]["pairs"]["flex"]["1024"] == (["t1"], 3)
    assert table["engines"]["flex"]["scores"]["1024"] == [0.0, 1.0, 1.0]
    line = next(s for s in ruler.paired(table).splitlines() if s.strip().startswith("flex"))
    assert "1024: 1/1" in line and "t1 1/1" in line and "t2" not in line, line
    # each engine pairs with the reference on its own shared cells, whatever a third answered
    three = ruler.results_from_answers(records + [cell_record("old", "t3", "p3", ["b", "a", "a"])])
    assert three["meta"]["pairs"]["flex"]["1024"] == (["t1"], 3)
    assert three["meta"]["pairs"]["old"]["1024"] == (["t3"], 3)
    assert "1024: 1/0" in next(s for s in ruler.paired(three).splitlines() if s.strip().startswith("old"))
    # the other engine first: it becomes the reference; unnamed engines are left out
    assert list(ruler.results_from_answers(records, ["flex", "dense"])["engines"]) == ["flex", "dense"]
    assert list(ruler.results_from_answers(records, ["flex"])["engines"]) == ["flex"]


def test_records_without_expected_answers_are_refused_by_name():
    old = cell_record("dense", "t1", "p1", ["a"])
    del old["expected"]
    with pytest.raises(SystemExit, match="dense 1024 t1"):
        ruler.results_from_answers([old])


def test_dense_under_another_name_is_a_dense_engine_of_its_own():
    engines, _ = ruler.parse_engines(["dense"], ["dense2=dense", 'g90={"gamma": 0.9}'])
    assert engines == {"dense": None, "dense2": None, "g90": {"gamma": 0.9}}
    with pytest.raises(SystemExit, match="must be JSON"):
        ruler.parse_engines([], ["typo=dens"])


def test_every_line_of_the_gpu_queue_is_a_ruler_command_line():
    """A line ruler.py refuses would fail only on the GPU, three tries in, with device time spent."""
    import pathlib
    import shlex

    queue = pathlib.Path(ruler.__file__).parent / "gpu" / "qwen-ruler.queue"
    lines = [x for x in queue.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines
    for line in lines:
        words = shlex.split(line.partition(" ")[2] if line.startswith("package=") else line)
        args = ruler.arguments().parse_args(["--model", "qwen2.5-coder-1.5b", *words])
        engines, _ = ruler.parse_engines(args.engines, args.engine, args.rates)
        assert engines, line


def test_answers_found_by_one_engine_are_split_by_where_their_needle_stands():
    def record(engine, texts):
        return {"engine": engine, "settings": None, "config": None, "rates": None, "via": "vllm", "model": "m",
                "length": 32, "task": "niah_multivalue", "prompts": "p", "texts": texts,
                "expected": [["a1", "a2"], ["b1", "b2"]]}

    # prompt 0: a1's needle at token 3 (first chunk), a2's at 20; prompt 1: b1 at 5, b2 at 25
    starts = {0: [3, 20], 1: [5, 25]}
    records = [record("dense", ["a1 a2", "b1 b2"]), record("flex", ["a1", "b1 b2 a2"])]
    asked = []

    def positions(model, task, n, i, expected):
        asked.append(model)
        return starts[i]

    out = ruler.by_position(records, None, positions, chunk=16)
    assert set(asked) == {"m"}  # the prompts are made again with the records' own model
    # dense alone found a2 (after the first chunk); flex found nothing dense missed
    assert out.splitlines()[1].split(": ", 1)[1] == "0/0 | 1/0; niah_multivalue 0/0 | 1/0"
    records[1]["texts"] = ["a2", "b1 b2"]  # now flex misses a1 (first chunk) and finds a2
    out = ruler.by_position(records, None, positions, chunk=16)
    assert out.splitlines()[1].split(": ", 1)[1] == "1/0 | 0/0; niah_multivalue 1/0 | 0/0"
    left_out = ruler.by_position(records, None, lambda *a: None, chunk=16)
    assert "2 prompts left out" in left_out


def test_records_that_say_where_their_needles_stand_need_no_prompts():
    def record(engine, texts):
        return {"engine": engine, "settings": None, "config": None, "rates": None, "via": "vllm", "model": "m",
                "length": 32, "task": "vt", "prompts": "p", "texts": texts, "expected": [["X", "Y"]],
                "answer_starts": [[4, 30]]}

    def no_prompts(*args):
        raise AssertionError("the records say where the needles stand")

    out = ruler.by_position([record("dense", ["X Y"]), record("flex", ["X"])], None, no_prompts, chunk=16)
    assert out.splitlines()[1].split(": ", 1)[1] == "0/0 | 1/0; vt 0/0 | 1/0"
    # a longer prompt: one column per chunk, the last (a part chunk) holding the question
    long = [{**record(e, t), "length": 40, "answer_starts": [[20, 38]]} for e, t in (("dense", ["Y"]), ("flex", ["X"]))]
    out = ruler.by_position(long, None, no_prompts, chunk=16)
    assert out.splitlines()[1].split(": ", 1)[1] == "0/0 | 0/1 | 1/0; vt 0/0 | 0/1 | 1/0"


class CharTokenizer:
    """One token per character: a tokenizer for the task generator without a model."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_each_answer_starts_where_its_needle_stands():
    from ruler_tasks import Generator

    gen = Generator(CharTokenizer())
    for task in ("niah_multivalue", "niah_multikey", "vt"):
        sample = gen.sample(task, 3000, 1)
        assert len(sample.answer_starts) == len(sample.answers)
        for answer, start in zip(sample.answers, sample.answer_starts):
            needle = next(b for a, b in sample.needle_spans if a == start)
            assert answer in "".join(map(chr, sample.token_ids[start:needle]))
    assert gen.sample("cwe", 20000, 1).answer_starts == ()
