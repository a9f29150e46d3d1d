"""envs.py probes (issue 17): hand cases for each GP / V-IRL probe, and agreement with the verifier on many answers."""
import random

import pytest

from envs import (VIRL_ACTION_SPACE_ABSOLUTE, VIRL_ACTION_SPACE_RELATIVE, VIRL_DIRECTIONS_ABS, VIRL_DIRECTIONS_REL,
                  GeneralPointsEnv, NavigationEnv, ResponseEqn, gp_probes, virl_probes)

HAND = ["4", "10", "J", "9"]  # ID values [4, 10, 10, 9]; rule-OOD values [4, 10, 11, 9]


def answer(numbers, formula, cards=HAND):
    return ResponseEqn.format(cards=repr(list(cards)), numbers=repr(list(numbers)), formula=formula)


@pytest.mark.parametrize("text, face_as_10, expected", [
    # the stated rule, solved: ID (J = 10) and rule OOD (J = 11)
    (answer([4, 10, 10, 9], "4*(10-10+9)-12=24"), True, (True, True, False, False, 0.0)),
    (answer([4, 10, 11, 9], "4+10*(11-9)=24"), False, (True, True, False, True, 0.0)),
    # memorised: a rule-OOD prompt answered with J = 10 (the "number" list and the formula's numbers)
    (answer([4, 10, 10, 9], "(10+10)+9-4=24"), False, (True, False, True, False, 1.0)),
    # an ID prompt answered with J = 11
    (answer([4, 10, 11, 9], "4+10*(11-9)=24"), True, (True, False, True, False, 0.0)),
    # a card twice (and one left out), an unknown number, a division by zero, 3 numbers
    (answer([4, 10, 10, 9], "4*4+10-9"), True, (True, True, False, False, 7.0)),
    (answer([4, 10, 10, 9], "24"), True, (True, True, False, False, 0.0)),
    (answer([4, 10, 10, 9], "4/(10-10)+9"), True, (True, True, False, True, None)),
    (answer([4, 10, 9], "4+10+10+9"), True, (True, None, None, True, 9.0)),
    # huge values are capped
    (answer([4, 10, 10, 9], "9999*9999"), True, (True, True, False, False, 100.0)),
])
def test_gp_probes_hand_cases(text, face_as_10, expected):
    parsable, stated, other, once, distance = expected
    p = gp_probes(text, HAND, 24, face_as_10)
    assert (p["parsable"], p["numbers_follow_stated_rule"], p["numbers_follow_other_rule"], p["cards_used_once"],
            p["target_distance"]) == (parsable, stated, other, once if parsable else None, distance)


@pytest.mark.parametrize("formula", ["None", "(1 + 2)*8", "4x10x10x9", "(4+10", "4++10", ""])
def test_gp_probes_unparsable_formula(formula):
    p = gp_probes(answer([4, 10, 10, 9], formula), HAND)
    assert p["parsable"] is False and p["cards_used_once"] is None and p["target_distance"] is None
    assert p["numbers_follow_stated_rule"] is True  # the "number" list is judged on its own


def test_gp_probes_without_face_card_and_garbage():
    hand = ["A", "2", "3", "4"]
    p = gp_probes(answer([1, 2, 3, 4], "1*2*3*4=24", hand), hand)
    assert p == dict(parsable=True, numbers_follow_stated_rule=True, numbers_follow_other_rule=None,
                     cards_used_once=True, target_distance=0.0)  # the two rules agree: no memorisation probe
    assert set(gp_probes("no answer at all", hand).values()) == {False, None}
    # valid JSON (the number list comes back as a list): parsed like the regex path
    p = gp_probes('{"cards": ["A", "2", "3", "4"], "number": [1, 2, 3, 4], "formula": "(1+2+3)*4"}', hand)
    assert p["numbers_follow_stated_rule"] and p["cards_used_once"] and p["target_distance"] == 0.0
    assert gp_probes(answer(["1", "x", 3, 4], "1"), hand)["numbers_follow_stated_rule"] is None


@pytest.mark.parametrize("ood", [False, True])
def test_gp_probes_agree_with_the_verifier(ood):
    """On oracle and plausible wrong answers of real hands: CORRECT_SOLUTION <=> parsable, each card once, distance 0;
    INCORRECT_NUMBER never comes with `cards_used_once`; ILLEGAL_FORMULA never with `parsable`."""
    env, rng, seen = GeneralPointsEnv(treat_face_cards_as_10=not ood, ood=ood), random.Random(0), set()
    for seed in range(150):
        _, info = env.reset(seed=seed)
        text = env.oracle_response(rng) if seed % 3 == 0 else env._wrong_response(rng)
        p = gp_probes(text, info["cards"], env.target_points, env.treat_face_cards_as_10)
        outcome = env.step(text)[-1]["outcome"]
        seen.add(outcome)
        assert (outcome == "CORRECT_SOLUTION") == (p["parsable"] and p["cards_used_once"] and p["target_distance"] == 0)
        assert not (outcome == "INCORRECT_NUMBER" and p["cards_used_once"])
        assert not (outcome == "ILLEGAL_FORMULA" and p["parsable"])
        assert p["numbers_follow_stated_rule"] or any(c in "JQK" for c in info["cards"])  # only a misread face card
    assert {"CORRECT_SOLUTION", "INCORRECT_NUMBER", "ILLEGAL_FORMULA"} <= seen


def test_virl_probes_action_spaces_follow_the_prompts():
    for words, prompt in ((VIRL_DIRECTIONS_ABS, VIRL_ACTION_SPACE_ABSOLUTE), (VIRL_DIRECTIONS_REL,
                                                                              VIRL_ACTION_SPACE_RELATIVE)):
        assert all(f"'{w}'" in prompt for w in words) and "forward()" in prompt and "stop()" in prompt

    def act(a):
        return '{"current observation": "x", "current instruction": "y", "action": "%s"}' % a
    cases = [("turn_direction(north)", True, (True, False)), ("turn_direction(north)", False, (False, True)),
             ("turn_direction(slightly left)", False, (True, False)), ("turn_direction(left)", True, (False, True)),
             ("forward()", False, (True, False)), ("stop()", True, (True, False)),
             ("turn_direction(up)", True, (False, False)), ("north", True, (False, False))]
    for action, absolute, (stated, other) in cases:
        p = virl_probes(act(action), "forward()", absolute)
        assert (p["action_in_stated_space"], p["action_in_other_space"]) == (stated, other), (action, absolute)
        assert p["action_correct"] == (action == "forward()")
    assert virl_probes("no answer", "forward()") == dict(action_correct=False, action_in_stated_space=False,
                                                         action_in_other_space=False)


@pytest.mark.parametrize("absolute", [True, False])
def test_virl_probes_on_the_oracle_rail(absolute):
    env = NavigationEnv(absolute_action=absolute, seed=0)
    for _ in range(3):
        env.reset()
        for k, pair in enumerate(env.expert_pairs()):
            p = virl_probes(pair["response"], env.rail[k]["gt_action"], absolute)
            assert p == dict(action_correct=True, action_in_stated_space=True, action_in_other_space=False)
