"""GeneralPoints: solver, sampling, parser, verifier, episode dynamics, renderer, split, oracle, demo."""
import itertools
import random
import re
import subprocess
import sys
import time
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import envs
from envs import GeneralPointsEnv, REWARD_FN, verify_gp


def answer(cards, numbers, formula):
    return envs.ResponseEqn.format(cards=repr(list(cards)), numbers=repr(list(numbers)), formula=formula)


# ---------------------------------------------------------------- solver
def _all_trees_reach(nums, target=24):
    """Brute force over every binary expression tree (independent of the 7 official bracket patterns)."""
    if len(nums) == 1:
        return nums[0] == target
    for i, j in itertools.permutations(range(len(nums)), 2):
        rest = [n for k, n in enumerate(nums) if k not in (i, j)]
        a, b = nums[i], nums[j]
        for r in [a + b, a - b, a * b] + ([a / b] if b else []):
            if _all_trees_reach(rest + [r], target):
                return True
    return False


def test_solver_matches_brute_force():
    multisets = list(itertools.combinations_with_replacement(range(1, 14), 4))
    for values in random.Random(0).sample(multisets, 300) + [(3, 8, 8, 3), (1, 1, 1, 1), (1, 5, 5, 5), (13, 13, 13, 13)]:
        sols = envs.solve(values)
        assert bool(sols) == _all_trees_reach([Fraction(v) for v in values]), values


@pytest.mark.parametrize("values", [(3, 8, 8, 3), (1, 5, 5, 5), (10, 10, 4, 4), (1, 2, 3, 4), (11, 12, 13, 1)])
def test_every_solution_is_exact_and_uses_each_card_once(values):
    sols = envs.solve(values)
    assert sols
    for s in sols:
        assert " " not in s
        assert sorted(int(n) for n in envs._TOKEN_RE.findall(s) if n.isdigit()) == sorted(values)
        # trusted, self-generated string: python eval over Fractions is an independent oracle here
        assert eval(envs._TOKEN_RE.sub(lambda m: f"Fraction({m.group()})" if m.group().isdigit() else m.group(), s)) == 24
    assert "8/(3-8/3)" in envs.solve((3, 8, 8, 3))


def test_unsolvable_and_other_targets():
    assert envs.solve((1, 1, 1, 1)) == ()
    assert "1+1+1+1" in envs.solve((1, 1, 1, 1), 4)


# ---------------------------------------------------------------- sampling
def test_same_seed_same_hand_and_known_hand():
    a, b = GeneralPointsEnv(), GeneralPointsEnv()
    assert a.reset(seed=1)[1]["cards"] == b.reset(seed=1)[1]["cards"] == ["A", "7", "7", "10"]
    hands = [a.reset()[1]["cards"] for _ in range(5)]
    b.reset(seed=1)
    assert hands == [b.reset()[1]["cards"] for _ in range(5)]


def test_sampling_solvable_face_cards_and_colours():
    for color, allowed in [("black", "SC"), ("red", "HD"), ("mixed", "HSDC")]:
        env = GeneralPointsEnv(face_cards_color=color, seed=0)
        for _ in range(50):
            _, info = env.reset()
            assert set(info["suits"]) <= set(allowed)
            assert envs.solve(tuple(info["values"]))
            assert info["values"] == [min(env.ranks[i], 10) for i in range(4)]
    ood = GeneralPointsEnv(treat_face_cards_as_10=False, ood=True, seed=0)
    for _ in range(100):
        _, info = ood.reset()
        assert any(c in ("J", "Q", "K") for c in info["cards"])
        assert info["values"] == ood.ranks and envs.solve(tuple(info["values"]))
        assert "'J', 'Q', and 'K' count as '11', '12', and '13' respectively." in ood.messages[0]["content"]


def test_prompt_is_official_character_for_character():
    env = GeneralPointsEnv()
    obs, info = env.reset(seed=1)
    expected = ("\n[Task Description]\nYou are an expert 24 points card game player. You will receive a set of 4 cards.\n"
                "Note that 'J', 'Q', and 'K' count as '10'., and each card must be used once.\nYour goal is to output "
                "a formula that evaluates to 24 using numbers from the cards and operators such as '+', '-', '*', '/',"
                " '(', ')', and '='.\n\n[Input]\nCards: ['A', '7', '7', '10']\n\n[Output]\n{\n  \"cards\": [x, y, z, "
                "w], where 'J', 'Q', and 'K' count as '10'.,\n  \"number\": [a, b, c, d], where a, b, c, and d are the"
                " numbers on the cards,\n  \"formula\": 'an equation that equals 24',\n}\n\n")
    assert obs["messages"] == [{"role": "user", "content": expected}] and obs["image"] is None
    vl, _ = GeneralPointsEnv(language_only=False, image_size=64).reset(seed=1)
    assert "You are observing these four cards in the image." in vl["messages"][0]["content"]
    assert "[Input]" not in vl["messages"][0]["content"] and vl["image"].size == (64, 64)
    assert env.oracle_response() == ('\n{\n  "cards": [\'A\', \'7\', \'7\', \'10\'],\n  "number": [1, 7, 7, 10],\n'
                                     '  "formula": "1*7+7+10=24",\n}')


# ---------------------------------------------------------------- parser
def test_re_match_semantics():
    assert envs.re_match('{"formula": "1+2"}', "formula") == "1+2"  # JSON first
    assert envs.re_match('"formula": "(1+2)*8=24", junk', "formula") == "(1+2)*8=24"
    assert envs.parse_formula('"formula": "(1+2)*8=24"') == "(1+2)*8"
    assert envs.re_match("no answer", "formula") == "None"
    assert envs.re_match('"cards": [1, 2, 3, 4]', "cards") == [1, 2, 3, 4]  # unquoted ints -> list -> rejected
    assert envs.robust_str_to_list(envs.re_match('"cards": [1, 2, 3, 4]', "cards")) == []
    assert envs.robust_str_to_list(envs.re_match('"cards": [\'A\', \'2\', \'K\', \'10\']', "cards")) == ["A", "2", "K", "10"]
    assert envs.robust_str_to_list(envs.re_match('{"cards": ["A", "2", "K", "10"]}', "cards")) == []  # valid JSON
    assert envs.robust_str_to_list(envs.re_match('"cards": ["A", "2", "K", "10"]', "cards")) == ['"A"', '"2"', '"K"', '"10"']
    assert envs.robust_str_to_list("['A', '2']") == []


# ---------------------------------------------------------------- verifier branches
SOL = envs.solve((1, 2, 3, 4))


@pytest.mark.parametrize("formula,reward,message", [
    ("1*2*3*4", 5, "Correct solution."),
    ("(1+2+3)*4", 5, "Correct solution."),
    ("1+2+3+4", -1, "1 is partially correct but the full formula does not match any solution."),
    ("(1+2+3)*4-0", -2, "you used invalid numbers: [0]."),
    ("(1+2+3)+4*", -1, "(1+2+3) is partially correct but the full formula does not match any solution."),
    ("(1+2)*(3+4)", -1, "(1+2 is partially correct but the full formula does not match any solution."),
    ("(1+2+3", -2, "you didn't use numbers: [4]."),
    ("4*(1+2+3", 1, "partial solution."),
    ("((1+2+3)*4", -1, "( is partially correct but the full formula does not match any solution."),
    ("1 * 2 * 3 * 4", -3, "illegal characters."),
    ("1x2x3x4", -3, "illegal characters."),
    ("None", -3, "illegal characters."),
    ("1**2*3*4", -3, "invalid sequence after operator."),
    ("+1*2*3*4", -3, "invalid sequence after operator."),
    ("(1)2*3*4", -3, "invalid sequence after number."),
    ("1(2*3*4)", -6, "invalid sequence before '(', unmatched closing parenthesis."),
    ("1*2*3*4)", -3, "unmatched closing parenthesis."),
    ("1*2*3*()4", -6, "invalid sequence after ')', invalid sequence after number."),
    ("1*2*3*5", -4, "you used invalid numbers: [5], you didn't use numbers: [4]."),
    ("1*2*3*4*4", -2, "you used numbers: [4] too many times."),
    ("2*3*4", -2, "you didn't use numbers: [1]."),
    ("", -2, "you didn't use numbers: [1, 2, 3, 4]."),
])
def test_verifier_branches(formula, reward, message):
    assert verify_gp(formula, [1, 2, 3, 4], SOL, 24) == (reward, message)


def test_verifier_no_match_from_first_token_and_float_flag():
    sols = envs.solve((3, 8, 8, 3))
    assert verify_gp("3+3+8+8", [3, 8, 8, 3], sols, 24) == (-1, "your formula does not match any solution.")
    assert verify_gp("8/(3-8/3)", [3, 8, 8, 3], sols, 24) == (5, "Correct solution.")
    assert verify_gp("8/(3-8/3)", [3, 8, 8, 3], sols, 24, exact_compare=False) == (0, ".")  # official float ==
    assert verify_gp("3/(3-3)", [3, 3, 3], ("3/(3-3)x",), 24) == (1, "partial solution.")  # ZeroDivision -> prefix


def test_vision_check_comes_first_and_has_no_period():
    env = GeneralPointsEnv(language_only=False, face_cards_color="black", image_size=32)
    env.reset(seed=5)
    wrong_cards = ["A", "A", "A", "A"] if env.cards != ["A"] * 4 else ["2"] * 4
    _, r, term, trunc, info = env.step(answer(wrong_cards, env.values, "1 x"))
    assert (r, info["verify_info"], info["outcome"], info["cards_correct"]) == (-1.5, "you recognized wrong cards",
                                                                              "INCORRECT_VISION", False)
    _, r, term, _, info = env.step(answer(env.cards[::-1], env.values, env.solutions[0]))
    assert r == 5 and term and info["cards_correct"] and info["is_success"]


def test_forced_extra_turn_and_feedback_conversation():
    env = GeneralPointsEnv(verify_iter=2)
    obs, info = env.reset(seed=3)
    bad = answer(env.cards, env.values, "1")
    obs, r1, t1, tr1, info = env.step(bad)
    assert not t1 and not tr1 and info["turn"] == 1
    assert [m["role"] for m in obs["messages"]] == ["user", "assistant", "user"]
    assert obs["messages"][1]["content"] == bad
    assert obs["messages"][2]["content"] == "You failed this trial because " + info["verify_info"]
    obs, r2, t2, tr2, info = env.step(bad)
    assert not tr2 and len(obs["messages"]) == 5
    # call verify_iter+1 is not checked, even with a correct answer
    obs, r3, t3, tr3, info = env.step(answer(env.cards, env.values, env.solutions[0]))
    assert (r3, t3, tr3, info["verify_info"], info["outcome"]) == (-1, False, True, "step_limit_reached", "STEP_LIMIT")


def test_feedback_ablations():
    g = GeneralPointsEnv(feedback="generic")
    g.reset(seed=3)
    obs, *_ = g.step("junk")
    assert obs["messages"][-1]["content"] == "You failed this trial because your answer is wrong."
    n = GeneralPointsEnv(feedback="none")
    first, _ = n.reset(seed=3)
    obs, *_ = n.step("junk")
    assert obs["messages"] == first["messages"]


# ---------------------------------------------------------------- metamorphic and red team
def _rewards(values, formulas, **kw):
    sols = envs.solve(tuple(values))
    return [verify_gp(f, list(values), sols, 24, **kw)[0] for f in formulas]


def test_permuting_cards_changes_no_reward():
    rng = random.Random(0)
    for _ in range(40):
        values = [rng.randint(1, 10) for _ in range(4)]
        formulas = ["".join(str(v) + rng.choice("+-*/") for v in rng.sample(values, 4))[:-1] for _ in range(5)]
        formulas += list(envs.solve(tuple(values))[:3]) + ["1+2", "(" + "*".join(map(str, values))]
        base = _rewards(values, formulas)
        for perm in itertools.permutations(values):
            assert _rewards(perm, formulas) == base


def test_face_card_rule_changes_rewards_only_for_hands_with_face_cards():
    rng = random.Random(1)
    for _ in range(200):
        ranks = [rng.randint(1, 13) for _ in range(4)]
        id_vals, ood_vals = [min(r, 10) for r in ranks], ranks
        formulas = list(envs.solve(tuple(id_vals))[:2]) + ["+".join(map(str, id_vals))]
        if not any(r > 10 for r in ranks):
            assert _rewards(id_vals, formulas) == _rewards(ood_vals, formulas)
        elif envs.solve(tuple(id_vals)):
            # a formula solving the hand with J/Q/K = 10 is never correct under the OOD rule
            assert 5 not in _rewards(ood_vals, envs.solve(tuple(id_vals))[:5])


RED_TEAM = ["8*3*1*1*1", "8*3+1+1", "3*8", "(3*8)", "3*8*1", "3*8*1*1+0", "24", "3**2", "3*8×1×1", "3*8÷1÷1",
            "3 * 8 * 1 * 1", "__import__('os').system('true')", "3*8*1*1;", "3*8*1*1.0", "3*08*1*1", "3*8*(1)*(1",
            "0x18", "3*8*1^1", "3*8*1%1*1", "1*1*3*8,", "３*8*1*1"]


def test_red_team_answers_never_score():
    values = [1, 1, 3, 8]
    sols = envs.solve(tuple(values))
    for f in RED_TEAM:
        assert verify_gp(f, values, sols, 24)[0] != 5, f
        assert verify_gp(f, values, sols, 24, exact_compare=False)[0] != 5, f
    # J counted as 10 under the OOD rule (J = 11)
    ood_vals = [11, 2, 1, 1]
    assert verify_gp("(10+2)*(1+1)", ood_vals, envs.solve(tuple(ood_vals)), 24)[0] == -4
    assert verify_gp("(11+1)*(2*1)", ood_vals, envs.solve(tuple(ood_vals)), 24)[0] == 5  # the honest answer


REACHABLE = {5, 1, -1, 0, -1.5} | {-(3 * k + 2 * j) for k in range(40) for j in range(3)} - {0} | {0}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/()= x.'\"{}[],:cardsformula") + ["\n", "é", "×"]),
               max_size=60))
def test_fuzz_arbitrary_strings(text):
    env = GeneralPointsEnv(verify_iter=1)
    env.reset(seed=7)
    for candidate in (text, answer(env.cards, env.values, text), '{"formula": ' + repr(text) + "}"):
        env.reset(seed=7)
        _, r, _, _, info = env.step(candidate)
        assert r in REACHABLE and info["outcome"] in envs.GP_OUTCOMES


def test_outcome_names():
    """The trainers' rollout/outcome/* metrics take these names from envs: every REWARD_FN key, the sums, the limit."""
    assert envs.GP_OUTCOMES == (*REWARD_FN, "AGGREGATED_ERROR", "STEP_LIMIT")
    assert envs.outcome_of(-4) == "AGGREGATED_ERROR" and envs.outcome_of(-1.5) == "INCORRECT_VISION"


# ---------------------------------------------------------------- always an answer (issue 15, docs/verifier.md)
def test_evaluate_agrees_with_python_eval_and_never_recurses():
    """Differential test against eval() on self-generated strings of a closed alphabet (never on model text)."""
    rng = random.Random(0)
    alphabet = ["1", "2", "3", "12", "0", "08", "+", "-", "*", "/", "(", ")"]
    formulas = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(4000)]
    formulas += ["(" * d + "1+2" + ")" * e for d in (199, 200, 201) for e in (d - 1, d)]
    formulas += ["(" * 150 + "1+" + "(" * 50 + "2" + ")" * 200, "(" * 150 + "1+" + "(" * 51 + "2" + ")" * 201]
    compared = 0
    for f in formulas:
        if re.search(r"(^|[-+*/(])[-+*/]", f):
            continue  # unary signs, ** and //: the verifier's sequence check rejects them before evaluate()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)  # "'int' object is not callable"
                expected = eval(f)  # noqa: S307  (closed alphabet, generated here)
            expected = expected if isinstance(expected, (int, float)) else SyntaxError
        except (SyntaxError, TypeError):  # TypeError: "2(1)" calls an int, "1*()" multiplies a tuple
            expected = SyntaxError
        except ZeroDivisionError:
            expected = ZeroDivisionError
        try:
            got = envs.evaluate(envs._TOKEN_RE.findall(f), exact=False)
        except ValueError:
            got = SyntaxError
        except ZeroDivisionError:
            got = ZeroDivisionError
        assert got == expected, f
        compared += 1
    assert compared > 1000
    deep = "(" * 100_000 + "1+2" + ")" * 100_000  # no RecursionError, ever
    with pytest.raises(ValueError, match="nested"):
        envs.evaluate(envs._TOKEN_RE.findall(deep))


def test_nesting_cap_is_pythons_and_keeps_the_official_outcome():
    env = GeneralPointsEnv()
    s = env.reset(seed=0)[1]["solutions"][0]
    for depth, reward in ((200, 5), (201, -1), (330, -1), (100_000, -1)):  # eval() fails from 201 levels on
        env.reset(seed=0)
        assert env.step('{"formula": "' + "(" * depth + s + ")" * depth + '"}')[1] == reward, depth


def test_numbers_past_the_int_string_limit_are_invalid_numbers():
    values, sols = [1, 2, 3, 4], envs.solve((1, 2, 3, 4))
    assert verify_gp("1" * 4300 + "*1*2*3*4", values, sols, 24)[0] == -2  # int() still works: the official outcome
    assert verify_gp("7" * 5000 + "*1*2*3*4", values, sols, 24) == (-2, "you used invalid numbers: "
                                                                        "['<5000-digit number>'].")
    assert verify_gp("0" * 5000 + "1*2*3*4", values, sols, 24) == (-4, "you used invalid numbers: "
                                                                       "['<5001-digit number>'], you didn't use "
                                                                       "numbers: [1].")


def test_card_field_matches_the_official_regex_in_linear_time():
    def official(text, key):  # utils_general.re_match after a failed json.loads, with the backtracking regex
        m = re.search(envs.RE_PATTERN_DICT[key], text)
        if m is None:
            return "None"
        try:
            return [int(x) for x in m.group(1).split(", ")] if key == "cards" else m.group(1)
        except ValueError:
            return "[" + m.group(1) + "]"

    rng = random.Random(1)
    pieces = ['"cards": [', '"cards": [', "]", "'A'", ", ", "1", "x", "\n", '"number": [']
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        for key in ("cards", "number"):
            assert envs.re_match(text, key) == official(text, key), text
    start = time.process_time()
    assert envs.re_match('"cards": [' * 100_000, "cards") == "None"  # the official regex: minutes
    assert time.process_time() - start < 1


# ---------------------------------------------------------------- split
def test_seen_unseen_disjoint_and_stable_across_processes():
    ids = [envs.gp_instance_id(v) for v in itertools.combinations_with_replacement(range(1, 11), 4) if envs.solve(v)]
    unseen = {i for i in ids if envs.is_unseen(i)}
    assert 0.1 < len(unseen) / len(ids) < 0.3
    code = ("import itertools, envs; print(sorted(envs.gp_instance_id(v) for v in "
            "itertools.combinations_with_replacement(range(1, 11), 4) if envs.solve(v) and "
            "envs.is_unseen(envs.gp_instance_id(v))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=envs.__file__[:-8],
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert out.strip() == str(sorted(unseen))
    seen_env, unseen_env = GeneralPointsEnv(split="seen", seed=0), GeneralPointsEnv(split="unseen", seed=0)
    seen_ids = {seen_env.reset()[1]["instance_id"] for _ in range(300)}
    unseen_ids = {unseen_env.reset()[1]["instance_id"] for _ in range(100)}
    assert seen_ids and unseen_ids and not (seen_ids & unseen_ids) and unseen_ids <= unseen
    vl = GeneralPointsEnv(language_only=False, split="unseen", seed=0, image_size=16)
    _, info = vl.reset()
    assert "|" in info["instance_id"] and not info["seen"]


# ---------------------------------------------------------------- renderer
def test_render_deterministic_and_red_black_differ_only_in_colour_and_suit():
    black = GeneralPointsEnv(language_only=False, face_cards_color="black")
    red = GeneralPointsEnv(language_only=False, face_cards_color="red")
    ob, ib = black.reset(seed=11)
    orr, ir = red.reset(seed=11)
    assert ib["cards"] == ir["cards"]
    again, _ = GeneralPointsEnv(language_only=False, face_cards_color="black").reset(seed=11)
    assert np.array_equal(np.asarray(ob["image"]), np.asarray(again["image"]))
    b, r = np.asarray(ob["image"]).astype(int), np.asarray(orr["image"]).astype(int)
    assert b.shape == (1200, 1200, 3)
    assert tuple(b[0, 0]) == (0x35, 0x65, 0x4D)
    # rank glyph band of each card: same ink pixels, black ink in one, red ink in the other
    w, h = int(1200 / 4 * 0.9), int(int(1200 / 4 * 0.9) * 7 / 5)
    y0 = (1200 - h) // 2
    band = slice(y0 + int(h * 0.1), y0 + int(h * 0.5))
    # text is anti-aliased towards white; red (200,0,0) and black (0,0,0) share G = B = 0, so in the rank glyphs
    # only the red channel may differ
    assert (b[band][..., 0] < 90).sum() > 1000 and (r[band][..., 0] > (b[band][..., 0] + 100)).sum() > 1000
    assert np.abs(b[band][..., 1:] - r[band][..., 1:]).max() <= 1
    # card edges where the official code pastes them
    for i in range(4):
        x = 5 + int(i * w * 1.1)
        assert tuple(b[y0 + h // 2, x + 3]) == (255, 255, 255)
    small = envs.render_cards([10, 11, 12, 13], "HSDC", image_size=128)
    assert small.size == (128, 128)


# ---------------------------------------------------------------- bad input, oracle, demo
@pytest.mark.parametrize("kwargs", [dict(target_points=0), dict(target_points=-3), dict(face_cards_color="blue"),
                                    dict(verify_iter=0), dict(split="train"), dict(feedback="loud")])
def test_bad_constructor_input(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GeneralPointsEnv(**kwargs)


def test_step_before_reset_and_non_string():
    with pytest.raises(RuntimeError):
        GeneralPointsEnv().step("x")
    env = GeneralPointsEnv()
    env.reset(seed=0)
    with pytest.raises(TypeError):
        env.step(None)


def test_oracle_solves_and_revision_trajectories_carry_real_feedback():
    env = GeneralPointsEnv(seed=0)
    rng = random.Random(0)
    saw_error = False
    for _ in range(30):
        env.reset()
        assert env.step(env.oracle_response(rng))[1] == 5
        env.reset()
        msgs = env.revision_trajectory(rng, max_errors=3)
        assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant" and env.is_success
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        for m in msgs[2::2]:
            saw_error = True
            assert m["content"].startswith("You failed this trial because ")
    assert saw_error


def test_terminal_demo(tmp_path):
    root = envs.__file__[:-8]
    png = tmp_path / "cards.png"
    subprocess.run([sys.executable, "envs.py", "gp-vl", "--seed", "3", "--save-image", str(png)], check=True, cwd=root)
    assert png.stat().st_size > 1000
    out = subprocess.run([sys.executable, "envs.py", "gp-l", "--seed", "1"], input="1+2\n1*7+7+10\n", text=True,
                         capture_output=True, check=True, cwd=root).stdout
    assert "1+2: reward -4, you used invalid numbers: [2], you didn't use numbers: [7, 10].\n" in out
    assert out.endswith("1*7+7+10: reward +5, Correct solution.\nepisode over: success\n")
    out = subprocess.run([sys.executable, "envs.py", "gp-l", "--seed", "1", "--ood", "--auto"], text=True,
                         capture_output=True, check=True, cwd=root).stdout
    assert "'J', 'Q', and 'K' count as '11', '12', and '13' respectively." in out and "success" in out
    out = subprocess.run([sys.executable, "envs.py", "gp-l", "--seed", "1"], input="", text=True,  # EOF quits
                         capture_output=True, check=True, cwd=root).stdout
    assert "episode over" not in out
