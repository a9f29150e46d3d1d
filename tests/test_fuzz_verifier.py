"""The verifiers always answer (issue 15): seeded fuzzing of GP-L/GP-VL x ID/OOD and V-IRL-L.

A few thousand answers per setting (the fixed adversarial list of tests/fuzz_verifier.py first: deep nesting, numbers
around the 4,300-digit limit, repeated keys without their closing bracket, JSON nested past the recursion limit,
1 MB strings), each checked for: no exception, a reward and a message, under 1 s of CPU time, and agreement with an
independent exact evaluator on every +5 (V-IRL: every +1). The full-size run is `python tests/fuzz_verifier.py`.
"""
import pytest

import fuzz_verifier  # tests/fuzz_verifier.py (pytest puts tests/ on sys.path: it has no __init__.py)

GP_ANSWERS_PER_SETTING = 3000


def _check(result):
    assert result["exceptions"] == 0, result["examples"]
    assert result["wrong_reward"] == 0, result["examples"]
    assert result["missed_reward"] == 0, result["examples"]
    # CPU time, not wall time: the bound is the verifier's, not the machine's load
    assert result["max_cpu_s"] < 1.0, result["slowest"]


@pytest.mark.parametrize("setting", list(fuzz_verifier.GP_SETTINGS))
def test_gp_verifier_always_answers(setting):
    result = fuzz_verifier.fuzz_gp(setting, GP_ANSWERS_PER_SETTING, seed=0, hands=40)
    assert result["answers"] == GP_ANSWERS_PER_SETTING and result["rewarded"] > 100
    _check(result)


def test_virl_verifier_always_answers():
    result = fuzz_verifier.fuzz_virl(200, seed=0)
    assert result["rewarded"] > 10
    _check(result)


def test_the_judge_is_independent_and_exact():
    """The referee of the fuzz test: Python's own grammar, exact fractions, no eval()."""
    value = fuzz_verifier.exact_value
    assert value("8/(3-8/3)") == (24, [3, 3, 8, 8])
    assert value("(" * 200 + "1" + ")" * 200) == (1, [1]) and value("(" * 201 + "1" + ")" * 201) is None
    for bad in ("08+1", "-1+25", "1+(2", "1/0", "2**3", "1 +2", "３+1", "__import__('os')", "1" * 4301, ""):
        assert value(bad) is None, bad
