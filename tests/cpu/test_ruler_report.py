"""benchmarks/ruler.py's prompt-by-prompt comparison: the accuracy claims against dense rest on it."""


import ruler


def test_sign_test_is_the_two_sided_binomial_tail():
    assert ruler.sign_test(0, 0) == 1.0
    assert ruler.sign_test(4, 4) == 1.0
    assert ruler.sign_test(0, 8) == 2 / 2 ** 8  # all eight one way, either way
    assert abs(ruler.sign_test(6, 3) - 2 * (1 + 9 + 36 + 84) / 2 ** 9) < 1e-12
    assert ruler.sign_test(3, 6) == ruler.sign_test(6, 3)


def test_paired_counts_the_prompts_only_one_engine_answered_per_task():
    # two tasks of three prompts each, task-major as build_samples orders them
    results = {"meta": {"tasks": ["a", "b"], "samples": 3}, "engines": {
        "dense": {"scores": {"2048": [1.0, 1.0, 0.0, 1.0, 0.5, 0.0]}},
        "flex": {"scores": {"2048": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]}},
        "old": {"rows": []},  # a file without per-prompt scores takes no part
    }}
    text = ruler.paired(results)
    assert "against dense" in text
    line = next(s for s in text.splitlines() if s.strip().startswith("flex"))
    # task a: dense only prompt 1, flex only prompt 2; task b: dense only prompt 0, flex only prompt 1 (0.5 is not full)
    assert "2048: 2/2" in line and "a 1/1" in line and "b 1/1" in line, line
    assert "old" not in text


def test_paired_is_empty_without_two_engines_of_scores():
    assert ruler.paired({"meta": {"tasks": ["a"], "samples": 1}, "engines": {"dense": {"scores": {"1": [1.0]}}}}) == ""
