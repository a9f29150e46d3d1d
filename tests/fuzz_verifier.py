"""Fuzz the verifiers (issue 15): every answer gets a reward and a message in bounded time, and no reward is wrong.

    python tests/fuzz_verifier.py --answers 40000            # GP-L/GP-VL x ID/OOD, 10,000 answers each
    python tests/fuzz_verifier.py --answers 8000 --virl 400  # what tests/test_fuzz_verifier.py runs in CI

Each setting first gets a fixed list of adversarial answers (the shapes of issue 15: deep nesting, numbers around
Python's 4,300-digit limit, repeated keys without their closing bracket, JSON nested around the recursion limit,
1 MB strings), then seeded random answers (oracle answers, random formulas over the hand, mutated solutions, token
soup, padding, huge numbers, repeated keys, nested JSON, random text). Every +5 is checked by an independent exact
evaluator (Python's `ast` parser, only integer literals and + - * / allowed, `fractions.Fraction` arithmetic; never
eval() of an answer), and so is every answer that evaluator calls correct. V-IRL: every +1 must be the parsed action.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import sys
import time
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402

MB = 1_000_000
GP_SETTINGS = {  # name: GeneralPointsEnv keywords (resolution 64: the image plays no part in the verifier)
    "gp-l-id": dict(),
    "gp-l-ood": dict(treat_face_cards_as_10=False, ood=True),
    "gp-vl-id": dict(language_only=False, face_cards_color="black", resolution=64),
    "gp-vl-ood": dict(language_only=False, face_cards_color="black", resolution=64, treat_face_cards_as_10=False,
                      ood=True),
}


# ---------------------------------------------------------------- the independent judge
def _field(text: str, key: str) -> str:
    """The official answer parsing, written again: json.loads(text)[key], else the first '"key": "..."' on one line."""
    try:
        return str(json.loads(text)[key])
    except Exception:  # noqa: BLE001
        m = re.search(f'"{key}": "(.*?)"', text)
        return "None" if m is None else m.group(1)


def _cards(text: str) -> list[str]:
    """The official card parsing (re_match + robust_str_to_list), written again without the backtracking regex."""
    try:
        value = json.loads(text)["cards"]
    except Exception:  # noqa: BLE001
        value = None
        for m in re.finditer(re.escape('"cards": ['), text):
            close = text.find("]", m.end())
            if close == -1:
                break
            if close > m.end():
                inner = text[m.end():close]
                try:
                    value = [int(x) for x in inner.split(", ")]
                except ValueError:
                    value = inner
                break
    if not isinstance(value, str):
        return []
    items = value.replace("[", "").replace("]", "").replace("'", "").replace(" ", "").split(",")
    return items if len(items) == 4 else []


def exact_value(formula: str):
    """(value, numbers) of a formula of ASCII digits, + - * / and parentheses under Python's own grammar, in exact
    fractions; None if it is not one (syntax error, unary sign, leading zero, division by zero, too deep)."""
    if not formula or not set(formula) <= set("0123456789+-*/()"):
        return None
    try:
        tree = ast.parse(formula, mode="eval").body
    except Exception:  # noqa: BLE001  (SyntaxError, too deep, too long)
        return None
    numbers, stack, values = [], [tree], {}
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}
    order = []
    while stack:  # post-order without recursion
        node = stack.pop()
        if isinstance(node, ast.Constant) and type(node.value) is int:
            values[id(node)] = Fraction(node.value)
            numbers.append(node.value)
        elif isinstance(node, ast.BinOp) and type(node.op) in ops:
            order.append(node)
            stack += [node.left, node.right]
        else:
            return None
    for node in reversed(order):
        try:
            values[id(node)] = ops[type(node.op)](values[id(node.left)], values[id(node.right)])
        except ZeroDivisionError:
            return None
    return values[id(tree)], sorted(numbers)


def truly_correct(text: str, env: envs.GeneralPointsEnv) -> bool:
    """Would an honest referee give +5? The formula field (cut at '=') equals the target exactly and uses every card
    value once; for GP-VL the cards field also names the hand."""
    formula = _field(text, "formula").split("=")[0]
    if sorted(int(d) for d in re.findall(r"[0-9]+", formula) if len(d) < 6) != sorted(env.values):
        return False  # quick filter before the parser
    result = exact_value(formula)
    if result is None or result != (env.target_points, sorted(env.values)):
        return False
    return env.language_only or sorted(_cards(text)) == sorted(env.cards)


# ---------------------------------------------------------------- answers
def _wrap(env, formula: str, style: int = 0) -> str:
    if style == 1:
        return json.dumps({"cards": env.cards, "number": env.values, "formula": formula})
    if style == 2:
        return f'"cards": {list(env.cards)!r}, "formula": "{formula}"'
    return envs.ResponseEqn.format(cards=repr(list(env.cards)), numbers=repr(list(env.values)), formula=formula)


def fixed_answers(env) -> list[tuple[str, str]]:
    """(shape, answer): the repros of issue 15 and the edges of every cap, for the hand `env` holds."""
    s, v = env.solutions[0], env.values
    card = str(v[0])
    out = [("oracle", env.oracle_response())]
    for d in (199, 200, 201, 330, 400, 1000, 100_000, 400_000):
        out.append((f"nested-{d}", _wrap(env, "(" * d + s + ")" * d, d % 3)))
        out.append((f"unclosed-{d}", _wrap(env, "(" * d + s, 2)))
    out.append(("repro-issue", '{"formula": "' + "(" * 400 + s + ")" * 400 + '"}'))
    for n in (4299, 4300, 4301, 5000, 100_000, MB):
        out.append((f"number-{n}", _wrap(env, "7" * n + "+" + s, 2)))
        out.append((f"zeros-{n}", _wrap(env, s.replace(card, "0" * n + card, 1), 2)))
    out.append(("json-int-4300", '{"formula": ' + "1" * 4300 + "}"))
    out.append(("json-int-4301", '{"formula": ' + "1" * 4301 + "}"))
    for key in ("cards", "number", "formula", "action"):
        for n in (1000, 10_000, 100_000):
            out.append((f"repeat-{key}-{n}", f'"{key}": [' * n + _wrap(env, s)))
            out.append((f"repeat-{key}-q-{n}", f'"{key}": "' * n))
    out.append(("repeat-cards-1MB", '"cards": [' * (MB // 10)))
    out.append(("repeat-answer", _wrap(env, "1+2") + _wrap(env, s) * 3000))
    out.append(("dup-json-keys", '{"formula": "1+2", "formula": "' + s + '"}'))
    for d in (900, 980, 990, 995, 998, 1000, 1001, 5000, 100_000):
        out.append((f"json-nest-{d}", '{"formula": ' + "[" * d + "]" * d + ', "cards": ' + "[" * d + "]" * d + "}"))
    out.append(("json-open-1MB", "[" * MB))
    out.append(("json-dict-nest", '{"formula": ' + '{"a": ' * 990 + "1" + "}" * 991))
    for value in ("24", "1e999", "-24", "null", "true", "[1, 2]", "{}", '"="', "NaN", "1" * 1000 + ".5"):
        out.append((f"json-value-{value[:8]}", '{"formula": ' + value + ', "cards": ' + value + "}"))
    pad = "x" * MB
    out += [("pad-before-1MB", pad + _wrap(env, s)), ("pad-after-1MB", _wrap(env, s) + pad),
            ("ones-1MB", _wrap(env, "1+" * (MB // 2) + "1", 2)), ("closes-1MB", _wrap(env, "1)" * (MB // 2), 2)),
            ("plus-1MB", _wrap(env, "+" * MB, 2)), ("parens-1MB", _wrap(env, "(1)+" * (MB // 4), 2)),
            ("mix-1MB", _wrap(env, "1)(+" * (MB // 4), 2)),
            ("distinct-1MB", _wrap(env, "+".join(map(str, range(150_000))), 2)),
            ("digits-1MB", _wrap(env, "9" * MB, 2)), ("unicode-digits", _wrap(env, "３" * 1000 + s, 2)),
            ("newline-1MB", '"formula": "' + "1+\n" * (MB // 3)), ("quote-1MB", '"formula": "' * (MB // 12)),
            ("surrogates", "\ud800\udfff" + _wrap(env, s)), ("nul", "\x00" * 1000 + _wrap(env, s)), ("empty", "")]
    return out


def random_formula(rng: random.Random, values: list[int]) -> str:
    """A random expression tree over the hand (sometimes a wrong, missing or extra number), random parentheses."""
    nums = [str(x) for x in values]
    r = rng.random()
    if r < 0.1:
        nums[rng.randrange(4)] = str(rng.randint(0, 14))
    elif r < 0.15:
        nums.pop()
    elif r < 0.2:
        nums.append(rng.choice(nums))
    rng.shuffle(nums)
    items = [n if rng.random() < 0.9 else f"({n})" for n in nums]
    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        e = items[i] + rng.choice("+-*/") + items[i + 1]
        items[i:i + 2] = ["(" * rng.choice((0, 0, 1, 1, 2)) + e + ")" * rng.choice((0, 1, 1, 1, 2))]
    return items[0]


SOUP = list("0123456789+-*/()=") + [" ", "x", ".", "^", "**", "３", "×", "÷", "'", '"', "\n", "10", "13", "00"]


def random_answer(rng: random.Random, env) -> tuple[str, str]:
    s = rng.choice(env.solutions)
    kind = rng.randrange(14)
    if kind == 0:
        return "oracle", env.oracle_response(rng) if rng.random() < 0.5 else _wrap(env, s, rng.randrange(3))
    if kind in (1, 2, 3):
        return "random-formula", _wrap(env, random_formula(rng, env.values) + rng.choice(("", "=24", "=")),
                                       rng.randrange(3))
    if kind == 4:
        f = list(s)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(f) + 1)
            op = rng.randrange(3)
            if op == 0:
                f.insert(i, rng.choice(SOUP))
            elif f:
                f[min(i, len(f) - 1)] = rng.choice(SOUP) if op == 1 else ""
        return "mutated", _wrap(env, "".join(f), rng.randrange(3))
    if kind == 5:
        return "soup", _wrap(env, "".join(rng.choice(SOUP) for _ in range(rng.randint(0, 40))), rng.randrange(3))
    if kind == 6:
        d, e = rng.randint(0, 450), rng.randint(0, 450)
        return "nesting", _wrap(env, "(" * d + s + ")" * e, rng.randrange(3))
    if kind == 7:
        n = int(10 ** rng.uniform(0, 5.3))
        big = rng.choice(("7", "0" * n + str(env.values[0]), str(rng.randint(1, 9)) * n))
        return "big-number", _wrap(env, rng.choice((big + "+" + s, s.replace(str(env.values[0]), big, 1))), 2)
    if kind == 8:
        key = rng.choice(("cards", "number", "formula", "action", "current observation"))
        junk = rng.choice((f'"{key}": [', f'"{key}": "', f'"{key}": [1, ', f'{{"{key}": '))
        return "repeated-key", junk * int(10 ** rng.uniform(0, 4.5)) + rng.choice(("", _wrap(env, s)))
    if kind == 9:
        d = int(10 ** rng.uniform(0, 4))
        opener, closer = rng.choice((("[", "]"), ('{"a": ', "}"), ('["', '"]')))
        return "json-nesting", '{"formula": ' + opener * d + closer * d * rng.randint(0, 1) + "}"
    if kind == 10:
        n = int(10 ** rng.uniform(3, 5))
        pad = "".join(rng.choice(("x", " ", "]", "[", '"', "\n", "{", "}")) for _ in range(64)) * (n // 64)
        return "padding", rng.choice((pad + _wrap(env, s), _wrap(env, s) + pad, pad))
    if kind == 11:
        cards = list(env.cards)
        rng.shuffle(cards)
        if rng.random() < 0.5:
            cards[rng.randrange(4)] = rng.choice(("A", "10", "J", "T", "K", "1", '"Q"'))
        listed = repr(cards) if rng.random() < 0.8 else str(cards).replace("'", "")
        return "cards", envs.ResponseEqn.format(cards=listed, numbers=repr(list(env.values)), formula=s)
    if kind == 12:
        return "text", "".join(chr(rng.choice((rng.randint(32, 126), rng.randint(0, 0x2FFF)))) for _ in
                               range(rng.randint(0, 300)))
    return "json-value", '{"formula": ' + rng.choice(("24", "[]", "{}", "null", f'"{s}"', f"[\"{s}\"]", "1.5")) + "}"


# ---------------------------------------------------------------- the runs
class Tally:
    def __init__(self, name: str):
        self.name, self.answers, self.correct, self.errors = name, 0, 0, []
        self.wrong, self.missed, self.max_wall, self.max_cpu, self.slowest = [], [], 0.0, 0.0, ""

    def call(self, env, shape: str, text: str):
        """One step; returns (reward, info) or None after an exception (recorded)."""
        self.answers += 1
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            _, reward, _, _, info = env.step(text)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{shape}: {type(e).__name__}: {str(e)[:100]}")
            return None
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall > self.max_wall:
            self.max_wall, self.slowest = wall, f"{shape} ({len(text):,} chars)"
        self.max_cpu = max(self.max_cpu, cpu)
        if not (isinstance(reward, (int, float)) and math.isfinite(reward) and isinstance(info["verify_info"], str)
                and info["verify_info"]):
            self.errors.append(f"{shape}: no reward or message: {reward!r} {info['verify_info']!r:.100}")
        return reward, info

    def summary(self) -> dict:
        return {"setting": self.name, "answers": self.answers, "exceptions": len(self.errors),
                "wrong_reward": len(self.wrong), "missed_reward": len(self.missed), "rewarded": self.correct,
                "max_wall_s": round(self.max_wall, 3), "max_cpu_s": round(self.max_cpu, 3), "slowest": self.slowest,
                "examples": (self.errors + self.wrong + self.missed)[:3]}


def fuzz_gp(setting: str, n_answers: int, seed: int = 0, hands: int = 300) -> dict:
    """n_answers (at least the fixed list) on one setting: the fixed ones on the hand of `seed`, then random answers
    on `hands` different hands (a few hundred: solving a new hand costs more than verifying an answer)."""
    rng = random.Random(f"{seed}-{setting}")
    env = envs.GeneralPointsEnv(verify_iter=1, **GP_SETTINGS[setting])
    tally = Tally(setting)
    env.reset(seed=seed)
    fixed = fixed_answers(env)
    for i in range(max(n_answers, len(fixed))):
        env.reset(seed=seed if i < len(fixed) else seed + rng.randrange(hands))
        shape, text = fixed[i] if i < len(fixed) else random_answer(rng, env)
        result = tally.call(env, shape, text)
        if result is None:
            continue
        reward, judged = result[0] == envs.REWARD_FN["CORRECT_SOLUTION"], truly_correct(text, env)
        tally.correct += reward
        if reward and not judged:
            tally.wrong.append(f"wrong +5 ({shape}): {text[:200]!r}")
        elif judged and not reward:
            tally.missed.append(f"missed +5 ({shape}, {result[0]}, {result[1]['verify_info'][:60]}): {text[:200]!r}")
    return tally.summary()


def fuzz_virl(n_random: int, seed: int = 0) -> dict:
    rng = random.Random(f"{seed}-virl")
    env = envs.NavigationEnv(seed=seed)
    tally = Tally("virl-l")
    for i in range(n_random):
        env.reset()
        gt = env.rail[env.pos]["gt_action"]
        good = env.oracle_response()
        kind = i % 8
        if kind == 0:
            shape, text = "oracle", good
        elif kind == 1:
            shape, text = "wrong", env._wrong_response(rng)
        elif kind == 2:
            key = rng.choice(("action", "current observation", "current instruction"))
            shape, text = "repeated-key", f'"{key}": "' * int(10 ** rng.uniform(0, 5)) + rng.choice(("", good))
        elif kind == 3:
            d = rng.choice((10, 990, 995, 1000, 100_000))
            shape, text = "json-nesting", '{"action": ' + "[" * d + "]" * d + ', "current observation": ' + \
                "[" * d + '"intersection"' + "]" * d + "}"
        elif kind == 4:
            shape, text = "pad-1MB", rng.choice(("x" * MB + good, good + "\n" * MB, '"action": "' + "y" * MB))
        elif kind == 5:
            shape, text = "json-value", '{"action": ' + rng.choice(("1", "null", "[]", f'"{gt}"', f'["{gt}"]')) + "}"
        elif kind == 6:
            shape, text = "text", "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 300)))
        else:
            shape, text = "action-mutated", good.replace(gt, gt[:-1] + rng.choice(("", ")", " )", "))")))
        result = tally.call(env, shape, text)
        if result is None:
            continue
        reward, judged = result[0] == envs.REWARD_FN_VIRL["CORRECT_ACTION"], _field(text, "action") == gt
        tally.correct += reward
        if reward != judged:
            (tally.wrong if reward else tally.missed).append(f"{shape}: reward {result[0]}: {text[:200]!r}")
    return tally.summary()


def run(answers: int, virl: int, seed: int = 0, hands: int = 300, out=sys.stdout) -> list[dict]:
    results = []
    for setting in GP_SETTINGS:
        results.append(fuzz_gp(setting, answers // len(GP_SETTINGS), seed, hands))
        print(json.dumps(results[-1]), file=out, flush=True)
    if virl:
        results.append(fuzz_virl(virl, seed))
        print(json.dumps(results[-1]), file=out, flush=True)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--answers", type=int, default=40_000, help="GP answers in all, split over the 4 settings")
    p.add_argument("--virl", type=int, default=2_000, help="V-IRL-L answers (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hands", type=int, default=300, help="distinct hand seeds per GP setting")
    a = p.parse_args()
    t0 = time.time()
    res = run(a.answers, a.virl, a.seed, a.hands)
    total = {k: sum(r[k] for r in res) for k in ("answers", "exceptions", "wrong_reward", "missed_reward", "rewarded")}
    total["max_wall_s"] = max(r["max_wall_s"] for r in res)
    total["max_cpu_s"] = max(r["max_cpu_s"] for r in res)
    total["wall_s"] = round(time.time() - t0, 1)
    print("total", json.dumps(total))
    sys.exit(0 if total["exceptions"] == total["wrong_reward"] == total["missed_reward"] == 0
             and total["max_wall_s"] < 1 else 1)
