"""Environments and verifiers of "SFT Memorizes, RL Generalizes" (Chu et al., ICML 2025): GeneralPoints and V-IRL.
Leaves out data preparation: the offline V-IRL world is built once by make_virl_world.py (run on first use).
Details: README.md (GeneralPoints), docs/virl_env.md (V-IRL); departures from the official code say `# DEPARTURE:`.

Shared by sft.py, ppo_generalpoints.py, ppo_virl.py and eval.py (as CleanRL scripts import
`cleanrl_utils.atari_wrappers`). Everything here reproduces the official code (LeslieTrue/SFTvsRL, commit 5a6ea55).

Episode API (gymnasium-style, without gymnasium):
    obs, info = env.reset(seed=None)
    obs, reward, terminated, truncated, info = env.step(response_text)
    obs = {"messages": [...chat messages to feed the model next...], "image": PIL.Image | None}

Play one episode by hand (a bare formula or action goes into the oracle's answer block) or let the oracle play:
    python envs.py gp-l --seed 1        # type formulas such as (1+2)*8, the verifier answers
    python envs.py gp-vl --save-image cards.png --seed 3
    python envs.py virl-l --auto        # the oracle navigates a route of the generated world
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ---- Official strings (prompt_lib/prompts.py, utils_rl.py), character for character: the released *-Init checkpoints
#      were trained on them. See ../shared/spec/official-prompts.md.
Q_GeneralPoint_EQN_L = '\n[Task Description]\nYou are an expert {target_number} points card game player. You will receive a set of 4 cards.\nNote that {face_card_msg}, and each card must be used once.\nYour goal is to output a formula that evaluates to {target_number} using numbers from the cards and operators such as \'+\', \'-\', \'*\', \'/\', \'(\', \')\', and \'=\'.\n\n[Input]\nCards: {cards}\n\n[Output]\n{{\n  "cards": [x, y, z, w], where {face_card_msg},\n  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,\n  "formula": \'an equation that equals {target_number}\',\n}}\n\n'  # noqa: E501
Q_GeneralPoint_EQN_VL = '\n[Task Description]\nYou are an expert {target_number} points card game player. You are observing these four cards in the image.\nNote that {face_card_msg}, and each card must be used once.\nYour goal is to output a formula that evaluates to {target_number} using numbers from the cards and operators such as \'+\', \'-\', \'*\', \'/\', \'(\', \')\', and \'=\'.\n\n[Output]\nYour response should be a valid json file in the following format:\n{{\n  "cards": [x, y, z, w], where {face_card_msg},\n  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,\n  "formula": \'an equation that equals {target_number}\',\n}}\n\n'  # noqa: E501
ResponseEqn = '\n{{\n  "cards": {cards},\n  "number": {numbers},\n  "formula": "{formula}",\n}}'
FACE_CARD_MSG_ID = "'J', 'Q', and 'K' count as '10'."
FACE_CARD_MSG_OOD = "'J', 'Q', and 'K' count as '11', '12', and '13' respectively."
FEEDBACK_TEMPLATE = "You failed this trial because {verify_info}"
GENERIC_FEEDBACK = "your answer is wrong."  # ablation: feedback="generic" hides the verifier's message

# utils_rl.py REWARD_FN
REWARD_FN = {
    "CORRECT_SOLUTION": 5,
    "PARTIAL_SOLUTION": 1,
    "NO_SOLUTION": -1,
    "INCORRECT_VISION": -1.5,
    "INCORRECT_NUMBER": -2,
    "ILLEGAL_FORMULA": -3,
}
STEP_LIMIT_REWARD = -1  # general_points_oneline.py: the (verify_iter+1)-th call, answer not checked
OUTCOME_OF_REWARD = {v: k for k, v in REWARD_FN.items()}
# info["outcome"] of a GP step (the trainers' rollout/outcome/* metrics): a REWARD_FN key, a sum of several errors, or
# the unchecked call after the budget
GP_OUTCOMES = ("CORRECT_SOLUTION", "PARTIAL_SOLUTION", "NO_SOLUTION", "INCORRECT_VISION", "INCORRECT_NUMBER",
               "ILLEGAL_FORMULA", "AGGREGATED_ERROR", "STEP_LIMIT")

# utils_general.py RE_PATTERN_DICT
RE_PATTERN_DICT = {
    "cards": r'"cards": \[([^\]]+)\]',
    "number": r'"number": \[([^\]]+)\]',
    "formula": r'"formula": "(.*?)"',
    "action": r'"action": "(.*?)"',
    "current observation": r'"current observation": "(.*?)"',
    "current instruction": r'"current instruction": "(.*?)"',
}


# ---- Answer parsing: utils_general.re_match / robust_str_to_list semantics, in time linear in the answer's length
def re_match(text: str, key: str, as_text: bool = False):
    """JSON first, then the official regex; "None" (a string) when nothing matches. as_text: str() of a JSON value.

    For `cards` the regex capture is first tried as a ", "-separated int list (so unquoted numeric cards come back as
    a list of ints, which robust_str_to_list then rejects), else re-wrapped as "[...]"."""
    try:
        value = json.loads(text)[key]
        return str(value) if as_text else value
    except Exception:  # not JSON, not a dict, no such key, or nested too deep to load or print: the regex decides
        pass
    if key in ("cards", "number"):  # RE_PATTERN_DICT[key] without its quadratic backtracking (docs/verifier.md)
        head, pred = f'"{key}": [', None
        start = text.find(head)
        while start != -1 and pred is None:
            end = text.find("]", start + len(head))  # the pattern's capture ends at the first ']', and is not empty
            if end == -1:
                break
            pred = text[start + len(head):end] or None
            start = text.find(head, start + 1)
    else:
        m = re.search(RE_PATTERN_DICT[key], text)
        pred = None if m is None else m.group(1)
    if pred is None:
        return "None"
    if "cards" in key:
        try:
            return [int(x) for x in pred.split(", ")]
        except ValueError:
            return "[" + pred + "]"
    return pred


def robust_str_to_list(list_like, num_items: int = 4) -> list[str]:
    """Strip '[', ']', single quotes and spaces, split on commas; exactly `num_items` items or []. A non-string
    (e.g. a list from valid JSON) gives [] as in the official code."""
    if not isinstance(list_like, str):
        return []
    items = list_like.replace("[", "").replace("]", "").replace("'", "").replace(" ", "").split(",")
    return items if len(items) == num_items else []


def parse_formula(text: str) -> str:
    """The formula the verifier checks: the "formula" field, cut at the first '='."""
    return re_match(text, "formula", as_text=True).split("=")[0]


# ---- Exact arithmetic without eval() (model output is untrusted; the official code calls eval()) and without recursion
_TOKEN_RE = re.compile(r"\d+|[+\-*/()]")
MAX_NESTING = 200  # Python's parser limit: eval() of a formula nested deeper is a SyntaxError (docs/verifier.md)
MAX_NUMBER_DIGITS = 4300  # Python's int-string limit: int() of a longer digit string raises (the official crash)


def evaluate(tokens: list[str], exact: bool = True):
    """Evaluate a token list of non-negative integers, + - * / and parentheses with the usual precedence.

    exact=True: Fractions. exact=False: Python int/float semantics, i.e. what the official `eval(formula)` computes.
    Raises ValueError wherever eval raises SyntaxError (malformed input; like eval, '08' (not '00'), non-ASCII digits
    such as '３' and nesting deeper than MAX_NESTING are errors, never numbers) and ZeroDivisionError. Linear time."""
    prev, depth = None, 0
    for tok in tokens:
        kind = ("number" if tok.isdigit() else "operator" if tok in ("+", "-", "*", "/")
                else {"(": "open", ")": "close"}.get(tok))
        if not kind or (prev in ("number", "close")) != (kind in ("operator", "close")):
            raise ValueError(f"unexpected token {tok[:20]!r}")
        leading_zero = tok[0] == "0" and tok.strip("0") != ""  # '08' is a syntax error, '00' is 0
        if kind == "number" and (leading_zero or not tok.isascii() or len(tok) > MAX_NUMBER_DIGITS):
            raise ValueError(f"malformed number: {tok[:20]!r}")
        depth += (kind == "open") - (kind == "close")
        if not 0 <= depth <= MAX_NESTING:
            raise ValueError("unmatched ')'" if depth < 0 else "too many nested parentheses")
        prev = kind
    if prev not in ("number", "close") or depth:
        raise ValueError("unexpected end of formula")
    return _run_rpn(_to_rpn(tokens), {t: Fraction(int(t)) if exact else int(t) for t in tokens if t.isdigit()})


# ---- Solver (general_points_oneline.py): permutations x 3 operators x 7 bracket patterns, exact fractions
BRACKET_PATTERNS = (
    "{a}{o1}{b}{o2}{c}{o3}{d}",
    "({a}{o1}{b}){o2}{c}{o3}{d}",
    "({a}{o1}{b}{o2}{c}){o3}{d}",
    "{a}{o1}({b}{o2}{c}){o3}{d}",
    "{a}{o1}({b}{o2}{c}{o3}{d})",
    "{a}{o1}{b}{o2}({c}{o3}{d})",
    "({a}{o1}{b}){o2}({c}{o3}{d})",
)


def _to_rpn(tokens: list[str]) -> list[str]:
    """Shunting-yard: infix tokens (placeholders a-d, operators, parentheses) to postfix."""
    out, stack = [], []
    for tok in tokens:
        if tok in "+-*/":
            while stack and stack[-1] != "(" and (stack[-1] in "*/" or tok in "+-"):
                out.append(stack.pop())
            stack.append(tok)
        elif tok == "(":
            stack.append(tok)
        elif tok == ")":
            while stack[-1] != "(":
                out.append(stack.pop())
            stack.pop()
        else:
            out.append(tok)
    return out + stack[::-1]


# Every (bracket pattern, operator triple) once, as (formula template, postfix program) over placeholders a-d.
_PROGRAMS = [(tpl, _to_rpn(re.findall(r"[abcd]|[+\-*/()]", tpl)))
             for o1, o2, o3 in itertools.product("+-*/", repeat=3)
             for tpl in (p.format(a="a", b="b", c="c", d="d", o1=o1, o2=o2, o3=o3) for p in BRACKET_PATTERNS)]


def _run_rpn(program: list[str], env: dict) -> float:
    stack = []
    for tok in program:
        if tok in env:
            stack.append(env[tok])
        else:
            y, x = stack.pop(), stack.pop()
            stack.append(x + y if tok == "+" else x - y if tok == "-" else x * y if tok == "*" else x / y)
    return stack[0]


@lru_cache(maxsize=4096)
def solve(values: tuple[int, ...], target: int = 24) -> tuple[str, ...]:
    """All official-pattern formulas (no spaces, e.g. '(1+2)*8') over `values` that equal `target` exactly.

    Permutations are taken in the order of `values` (the official code shuffles them; only membership and prefixes
    of this list are ever used, so the order changes no reward). A float pass filters, exact fractions decide."""
    solutions = []
    for perm in dict.fromkeys(itertools.permutations(values)):
        env = dict(zip("abcd", map(float, perm)))
        for template, program in _PROGRAMS:
            try:
                if abs(_run_rpn(program, env) - target) > 1e-6:
                    continue
            except ZeroDivisionError:
                continue
            formula = "".join(str(perm["abcd".index(ch)]) if ch in "abcd" else ch for ch in template)
            if evaluate(_TOKEN_RE.findall(formula)) == target:
                solutions.append(formula)
    return tuple(dict.fromkeys(solutions))


# ---- Verifier (utils_rl.step_rewards): check order, rewards and messages as in the official code
def verify_gp(formula: str, card_values: list[int], solutions, target: int, recognized_cards=None,
              gt_cards=None, language_only: bool = True, exact_compare: bool = True) -> tuple[float, str]:
    """Return (reward, message). Rewards accumulate inside one call (e.g. two sequence errors give -6)."""
    if not language_only and sorted(gt_cards) != sorted(recognized_cards):
        return REWARD_FN["INCORRECT_VISION"], "you recognized wrong cards"  # official: no trailing period here

    reward, messages = 0, []

    def add(key, message):
        nonlocal reward
        reward += REWARD_FN[key]
        messages.append(message)

    def result():
        return reward, ", ".join(messages) + "."

    tokens = _TOKEN_RE.findall(formula)
    if "".join(tokens) != formula:
        add("ILLEGAL_FORMULA", "illegal characters")
        return result()
    prev, open_parens = "^", 0  # token kinds: n(umber), o(perator), ( and ); ^ = the start
    for kind in re.sub(r"\d+", "n", formula).translate(str.maketrans("+-*/", "oooo")):
        after_value = prev in "n)"
        if kind == "n" and after_value:
            add("ILLEGAL_FORMULA", "invalid sequence after number")
        elif kind == "o" and not after_value:
            add("ILLEGAL_FORMULA", "invalid sequence after operator")
        elif kind == "(":
            if after_value:
                add("ILLEGAL_FORMULA", "invalid sequence before '('")
            else:
                open_parens += 1
        elif kind == ")":
            if not after_value:
                add("ILLEGAL_FORMULA", "invalid sequence after ')'")
            elif open_parens:
                open_parens -= 1
            else:
                add("ILLEGAL_FORMULA", "unmatched closing parenthesis")
        prev = kind

    used = Counter()  # a number longer than MAX_NUMBER_DIGITS (the official int() raises) is an invalid number
    for digits, count in Counter(t for t in tokens if t.isdigit()).items():
        used[int(digits) if len(digits) <= MAX_NUMBER_DIGITS else f"<{len(digits)}-digit number>"] += count
    available = Counter(card_values)
    invalid = [n for n in used if n not in available]
    overused = [n for n in used if used[n] > available[n]]
    if invalid:
        add("INCORRECT_NUMBER", f"you used invalid numbers: {invalid}")
    elif overused:
        add("INCORRECT_NUMBER", f"you used numbers: {overused} too many times")
    underused = [n for n in available if available[n] > used[n]]
    if underused:
        add("INCORRECT_NUMBER", f"you didn't use numbers: {underused}")
    if reward != 0:
        return result()

    try:
        # DEPARTURE (default): exact fractions; exact_compare=False reproduces the official float `eval(...) == 24`,
        # which rejects e.g. 8/(3-8/3) (= 23.999999999999996 in floats).
        if evaluate(tokens, exact=exact_compare) == target:
            add("CORRECT_SOLUTION", "Correct solution")
            return result()
    except (ValueError, ZeroDivisionError, OverflowError):  # official: eval() raised
        if any(sol.startswith(formula) for sol in solutions):
            add("PARTIAL_SOLUTION", "partial solution")
            return result()

    register = ""
    for tok in tokens:
        prev_register, register = register, register + tok
        if not any(sol.startswith(register) for sol in solutions):
            if prev_register == "":
                add("NO_SOLUTION", "your formula does not match any solution")
            else:
                add("NO_SOLUTION", f"{prev_register} is partially correct but the full formula does not match any solution")
            break
    return result()


def outcome_of(reward: float) -> str:
    """StatLogger-style bucket of a verified reward; sums of several errors are AGGREGATED_ERROR."""
    return OUTCOME_OF_REWARD.get(reward, "AGGREGATED_ERROR")


# ---- Cards: sampling, instance ids and the seen/unseen split
RANK_NAMES = {1: "A", 10: "T", 11: "J", 12: "Q", 13: "K"}
SUITS = {"mixed": "HSDC", "black": "SC", "red": "HD"}  # red[i] is the red twin of black[i]: same seed, same hand
UNSEEN_FRACTION = 0.2  # share of ID instances held out from training (by a hash of the instance id)


def plain_card_name(rank: int) -> str:
    """'A', '2'..'10', 'J', 'Q', 'K' (the official 'T' is rewritten to '10' in prompts and ground truth)."""
    return "10" if rank == 10 else RANK_NAMES.get(rank, str(rank))


def gp_instance_id(values, ranks=None, suits=None) -> str:
    """Canonical id: sorted card values (GP-L); GP-VL adds the sorted rank+suit cards, since the image shows them."""
    iid = "-".join(str(v) for v in sorted(values))
    if ranks is not None:
        iid += "|" + "-".join(sorted(f"{RANK_NAMES.get(r, str(r))}{s}" for r, s in zip(ranks, suits)))
    return iid


def is_unseen(instance_id: str) -> bool:
    """Deterministic held-out membership: stable across processes, machines and Python hash seeds."""
    h = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:8], "big")
    return h / 2**64 < UNSEEN_FRACTION


# ---- Renderer: the official layout, drawn with Pillow (no card image assets)
CARD_COLOURS = {"H": (200, 0, 0), "D": (200, 0, 0), "S": (0, 0, 0), "C": (0, 0, 0)}


def _draw_suit(draw: ImageDraw.ImageDraw, suit: str, cx: float, cy: float, r: float, fill):
    """Heart, diamond, spade or club as filled shapes centred at (cx, cy) with half-size r."""
    if suit == "D":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
        return
    if suit in "HS":  # a heart; a spade is an upside-down heart plus a stem
        s = -1 if suit == "S" else 1
        lobe_y = cy - s * 0.35 * r
        for dx in (-0.5 * r, 0.5 * r):
            draw.ellipse([cx + dx - 0.52 * r, lobe_y - 0.52 * r, cx + dx + 0.52 * r, lobe_y + 0.52 * r], fill=fill)
        draw.polygon([(cx - r, lobe_y + s * 0.1 * r), (cx + r, lobe_y + s * 0.1 * r), (cx, cy + s * r)], fill=fill)
    else:  # club: three circles
        for dx, dy in ((0, -0.45 * r), (-0.5 * r, 0.2 * r), (0.5 * r, 0.2 * r)):
            draw.ellipse([cx + dx - 0.45 * r, cy + dy - 0.45 * r, cx + dx + 0.45 * r, cy + dy + 0.45 * r], fill=fill)
    if suit in "SC":
        draw.polygon([(cx, cy), (cx - 0.4 * r, cy + r), (cx + 0.4 * r, cy + r)], fill=fill)


@lru_cache(maxsize=32)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


CARD_RANK_AT, CARD_SUIT_AT = 0.30, 0.72  # heights (fractions of a card's) of the rank's and the suit's centres


def card_layout(resolution: int = 1200) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of the 4 cards on the official `resolution`^2 canvas: width int(res/4*0.9), height x7/5,
    x = 5 + int(i*w*1.1), vertically centred."""
    w = int(resolution / 4 * 0.9)
    h = int(w * 7 / 5)
    return [(5 + int(i * w * 1.1), (resolution - h) // 2, w, h) for i in range(4)]


def render_cards(ranks, suits, resolution: int = 1200, image_size: int | None = None) -> Image.Image:
    """The official canvas: `resolution`^2 filled with #35654d, the four cards of `card_layout`. Each card shows its
    rank large (so a small vision tower can tell '10' from 'J') above a large suit symbol, in red (hearts, diamonds)
    or black (spades, clubs). image_size: output side length after a LANCZOS resize (None = resolution)."""
    img = Image.new("RGB", (resolution, resolution), "#35654d")
    draw = ImageDraw.Draw(img)
    layout = card_layout(resolution)
    font = _font(max(8, int(layout[0][3] * 0.42)))
    for (x, y, w, h), rank, suit in zip(layout, ranks, suits):
        colour = CARD_COLOURS[suit]
        draw.rounded_rectangle([x, y, x + w, y + h], radius=max(2, w // 12), fill="white", outline=(60, 60, 60),
                               width=max(1, w // 90))
        draw.text((x + w / 2, y + h * CARD_RANK_AT), plain_card_name(rank), font=font, fill=colour, anchor="mm")
        _draw_suit(draw, suit, x + w / 2, y + h * CARD_SUIT_AT, w * 0.26, colour)
    if image_size is not None and image_size != resolution:
        img = img.resize((image_size, image_size), Image.LANCZOS)
    return img


# ---- The environment
class GeneralPointsEnv:
    """GeneralPoints (gym_cards/GeneralPoint-oneline-v0): make `target_points` from 4 cards, with up to
    `verify_iter` verified attempts (sequential revision) and a forced, unchecked extra turn worth -1.

    Official keyword names are kept. Additions: `resolution`/`image_size` (rendering), `split` ("all", "seen" =
    never the held-out hands, "unseen" = only held-out hands), `exact_compare`, `feedback` ("verifier", "generic",
    "none" = every attempt restarts from the fresh prompt), `seed`."""

    def __init__(self, target_points: int = 24, treat_face_cards_as_10: bool = True, ood: bool = False,
                 face_cards_color: str = "mixed", verify_iter: int = 5, language_only: bool = True,
                 resolution: int = 1200, image_size: int | None = None, split: str = "all",
                 exact_compare: bool = True, feedback: str = "verifier", seed: int | None = None):
        if not isinstance(target_points, int) or target_points <= 0:
            raise ValueError(f"target_points must be a positive integer, got {target_points!r}")
        if face_cards_color not in SUITS:
            raise ValueError(f"face_cards_color must be one of {sorted(SUITS)}, got {face_cards_color!r}")
        if not isinstance(verify_iter, int) or verify_iter < 1:
            raise ValueError(f"verify_iter must be an integer >= 1, got {verify_iter!r}")
        if split not in ("all", "seen", "unseen"):
            raise ValueError(f"split must be 'all', 'seen' or 'unseen', got {split!r}")
        if feedback not in ("verifier", "generic", "none"):
            raise ValueError(f"feedback must be 'verifier', 'generic' or 'none', got {feedback!r}")
        if resolution < 64 or (image_size is not None and image_size < 8):
            raise ValueError(f"resolution must be >= 64 and image_size >= 8, got {resolution!r}, {image_size!r}")
        self.target_points, self.treat_face_cards_as_10, self.ood = target_points, treat_face_cards_as_10, ood
        self.face_cards_color, self.verify_iter, self.language_only = face_cards_color, verify_iter, language_only
        self.resolution, self.image_size, self.split = resolution, image_size, split
        self.exact_compare, self.feedback = exact_compare, feedback
        self.face_card_msg = FACE_CARD_MSG_ID if treat_face_cards_as_10 else FACE_CARD_MSG_OOD
        self.rng = random.Random(seed)
        self.ranks: list[int] = []

    # -- hands ---------------------------------------------------------------------------------------------------
    def _draw_hand(self):
        """4 ranks uniform in 1..13 with replacement (rule OOD: 3 + one in 11..13, shuffled), suits uniform in the
        colour set, redrawn until solvable (and until the hand belongs to the requested split)."""
        suit_set = SUITS[self.face_cards_color]
        for _ in range(100_000):
            if self.ood:
                ranks = [self.rng.randint(1, 13) for _ in range(3)] + [self.rng.randint(11, 13)]
                self.rng.shuffle(ranks)
            else:
                ranks = [self.rng.randint(1, 13) for _ in range(4)]
            suits = [suit_set[self.rng.randrange(len(suit_set))] for _ in range(4)]
            values = [min(r, 10) if self.treat_face_cards_as_10 else r for r in ranks]
            if not solve(tuple(values), self.target_points):
                continue
            iid = self._instance_id(values, ranks, suits)
            if self.split == "all" or is_unseen(iid) == (self.split == "unseen"):
                return ranks, suits, values, iid
        raise RuntimeError(f"could not draw a solvable hand for target {self.target_points} in split {self.split!r}")

    def _instance_id(self, values, ranks, suits):
        return gp_instance_id(values) if self.language_only else gp_instance_id(values, ranks, suits)

    def _prompt(self) -> str:
        template = Q_GeneralPoint_EQN_L if self.language_only else Q_GeneralPoint_EQN_VL
        return template.format(target_number=self.target_points, face_card_msg=self.face_card_msg, cards=self.cards)

    # -- episode -------------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None):
        if seed is not None:
            self.rng = random.Random(seed)
        self.ranks, self.suits, self.values, self.instance_id = self._draw_hand()
        self.cards = [plain_card_name(r) for r in self.ranks]
        self.solutions = solve(tuple(self.values), self.target_points)
        self.remaining_step = self.verify_iter
        self.turn = 0
        self.verify_info = None
        self.outcome = None
        self.cards_correct = None
        self.is_success = False
        self.image = None if self.language_only else render_cards(self.ranks, self.suits, self.resolution,
                                                                 self.image_size)
        self.messages = [{"role": "user", "content": self._prompt()}]
        return self._obs(), self._info()

    def step(self, response_text: str):
        if not self.ranks:
            raise RuntimeError("call reset() before step()")
        if not isinstance(response_text, str):
            raise TypeError(f"step() takes the model's response text, got {type(response_text).__name__}")
        self.turn += 1
        self.remaining_step -= 1
        self.messages.append({"role": "assistant", "content": response_text})
        if self.remaining_step < 0:
            # general_points_oneline.py: call verify_iter+1 is not checked; -1, truncated
            self.verify_info, self.outcome, self.cards_correct = "step_limit_reached", "STEP_LIMIT", None
            return self._obs(), STEP_LIMIT_REWARD, False, True, self._info()

        recognized = robust_str_to_list(re_match(response_text, "cards"))
        self.cards_correct = sorted(recognized) == sorted(self.cards)
        reward, self.verify_info = verify_gp(parse_formula(response_text), self.values, self.solutions,
                                             self.target_points, recognized, self.cards, self.language_only,
                                             self.exact_compare)
        self.outcome = outcome_of(reward)
        terminated = reward == REWARD_FN["CORRECT_SOLUTION"]
        self.is_success = terminated
        if not terminated:
            self._append_feedback()
        return self._obs(), reward, terminated, False, self._info()

    def _append_feedback(self):
        if self.feedback == "none":  # ablation: independent retries, the model sees only the fresh prompt
            self.messages = self.messages[:1]
            return
        info = self.verify_info if self.feedback == "verifier" else GENERIC_FEEDBACK
        self.messages.append({"role": "user", "content": FEEDBACK_TEMPLATE.format(verify_info=info)})

    def _obs(self):
        return {"messages": [dict(m) for m in self.messages], "image": self.image}

    def _info(self):
        return {"cards": list(self.cards), "values": list(self.values), "instance_id": self.instance_id,
                "seen": not is_unseen(self.instance_id), "verify_info": self.verify_info, "outcome": self.outcome,
                "cards_correct": self.cards_correct, "turn": self.turn, "remaining_step": self.remaining_step,
                "is_success": self.is_success, "solutions": list(self.solutions), "suits": list(self.suits)}

    # -- oracle (SFT data) ---------------------------------------------------------------------------------------
    def oracle_response(self, rng: random.Random | None = None) -> str:
        """The optimal single-turn answer in the official ResponseEqn format (the SFT target):
        cards as a Python list of quoted names, numbers unquoted, formula with '=24'. The first solution, or a random
        one when `rng` is given."""
        formula = self.solutions[0] if rng is None else rng.choice(self.solutions)
        return self._response(self.cards, self.values, f"{formula}={self.target_points}")

    @staticmethod
    def _response(cards, numbers, formula) -> str:
        return ResponseEqn.format(cards=repr(list(cards)), numbers=repr(list(numbers)), formula=formula)

    def _wrong_response(self, rng: random.Random) -> str:
        """A plausible imperfect answer: a legal formula with the wrong value, a card left out or reused, a misread
        face card, or an illegal operator."""
        vals = list(self.values)
        rng.shuffle(vals)
        kind = rng.choice(["wrong_value", "missing", "reused", "face_value", "illegal"])
        cards, numbers = list(self.cards), list(self.values)
        if kind == "missing":
            formula = "+".join(map(str, vals[:3]))
        elif kind == "reused":
            formula = "*".join(map(str, vals[:3] + vals[:1]))
        elif kind == "face_value" and any(c in "JQK" for c in self.cards):
            numbers = [{"J": 11, "Q": 12, "K": 13}.get(c, v) for c, v in zip(cards, numbers)]
            formula = "+".join(map(str, numbers))
        elif kind == "illegal":
            formula = "x".join(map(str, vals))
        else:
            ops = [rng.choice("+-*") for _ in range(3)]
            formula = "".join(str(v) + o for v, o in zip(vals, ops + [""]))
        return self._response(cards, numbers, f"{formula}={self.target_points}")

    def revision_trajectory(self, rng: random.Random, max_errors: int | None = None) -> list[dict]:
        """An imperfect multi-turn episode for the Fig. 15 SFT ablation: k wrong answers (k uniform in
        0..max_errors, at most verify_iter-1), each followed by the real verifier feedback, then a correct answer.
        Call after reset(); the env is stepped, so the messages carry real feedback. Returns chat messages."""
        limit = self.verify_iter - 1 if max_errors is None else min(max_errors, self.verify_iter - 1)
        for _ in range(rng.randint(0, max(0, limit))):
            response = self._wrong_response(rng)
            _, reward, terminated, _, _ = self.step(response)
            if terminated:  # a "wrong" answer that happens to be right ends the episode: keep it
                return [dict(m) for m in self.messages]
        self.step(self.oracle_response(rng))
        return [dict(m) for m in self.messages]


# ---- V-IRL navigation (gym_virl/Navigation-v0). Official strings, character for character
Q_VIRL_L = '\n[Task Description]\nYou are an expert in navigation. You will receive a sequence of instructions to follow. You\nare also provided with your observation and action history in text. Your goal is to first analyze the instruction and identify the next sentence to be executed. \nThen, you need to provide the action to be taken based on the current observation and instruction.\n\n[Instruction]\n{instruction}\n\n[Action space]\n{action_space}\n\n[Observations and actions sequence]\n{obs_act_seq}\n\n[Output]\n{{\n  "current observation": latest observation from the observation sequence,\n  "current instruction": analyze the full instruction and identify the sentence to be executed,\n  "action": the action to be taken chosen from the action space,\n}}\n'  # noqa: E501
Q_VIRL_VL = '\n[Task Description]\nYou are an expert in navigation. You will receive a sequence of instructions to follow while observing your surrounding stree tviews. You\nare also provided with your observation and action history in text. Your goal is to first analyze the instruction and identify the next sentence to be executed. \nThen, you need to provide the action to be taken based on the current observation and instruction.\n\n[Instruction]\n{instruction}\n\n[Observation format]\nYou observe a 2x2 grid of streetview images with the following headings:\n[front, right\n back, left]\nYou need to identify if any of the landmarks in the instruction are visible in the street view grid.\n\n[Action space]\n{action_space}\n\n[Observations and actions sequence]\n{obs_act_seq}\n\n[Output]\n{{\n  "current observation": latest observation from the street view grid,\n  "current instruction": analyze the full instruction and identify the sentence to be executed,\n  "action": the action to be taken chosen from the action space,\n}}\n'  # noqa: E501
ResponseVIRL = '\n{{\n  "current observation": "{current_observation}",\n  "current instruction": "{current_instruction}",\n  "action": "{action}",\n}}\n'  # noqa: E501
VIRL_ACTION_SPACE_ABSOLUTE = '"forward()": indicates moving forward one step\n"turn_direction(x)": indicates adjust the ego agent direction towards x direction. x could be any following 8 directions [\'north\', \'northeast\', \'east\', \'southeast\', \'south\', \'southwest\', \'west\', \'northwest\']\n"stop()": indicates the navigation is finished.'  # noqa: E501
VIRL_ACTION_SPACE_RELATIVE = '"forward()": indicates moving forward one step\n"turn_direction(x)": indicates adjust the ego agent direction towards x direction. x could be any following [\'left\', \'right\', \'slightly left\', \'slightly right\']\n"stop()": indicates the navigation is finished.'  # noqa: E501
# utils_rl.step_rewards_virl: format_token is never .format()-ed, so the doubled braces reach the model as "{{"
VIRL_FORMAT_TOKEN = '\n[Output]\n{{\n  "current observation": latest observation from the streetview grid,\n  "current instruction": analyze the full instruction and identify the sentence to be executed,\n  "action": the action to be taken chosen from the action space,\n}}'  # noqa: E501
VIRL_MSG_CORRECT = "Correct action"
VIRL_MSG_NOT_AT_INTERSECTION = ("you are not at any intersection. Please avoid this observation and try again in the "
                                "same format:" + VIRL_FORMAT_TOKEN)
VIRL_MSG_AT_INTERSECTION = ("you are at an intersection. Please avoid this observation and try again in the same "
                            "format:" + VIRL_FORMAT_TOKEN)
VIRL_MSG_INCORRECT_ACTION = ("you make incorrect action. Please avoid this action and try again in the same format:"
                             + VIRL_FORMAT_TOKEN)
VIRL_MSG_STEP_LIMIT = "Exceed maximum verify steps"  # navigation_environment.py _terminate_step
REWARD_FN_VIRL = {"CORRECT_ACTION": 1, "INCORRECT_ACTION": -1, "INCORRECT_OBS": -1.5,
                  "INCORRECT_INSTRUCTION": -1.75}  # the last one is defined but never used by the official verifier
VIRL_STEP_LIMIT_REWARD = -1
VIRL_OUTCOMES = ("CORRECT_ACTION", "INCORRECT_ACTION", "INCORRECT_OBS", "STEP_LIMIT")  # info["outcome"] of a V-IRL step
VIRL_DIRECTIONS_ABS = ["north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest"]
VIRL_DIRECTIONS_REL = ["left", "right", "slightly left", "slightly right"]
VIRL_NO_LANDMARK_BLOCK = "No landmark nearby"    # default of a milestone block without `landmarks` (singular!)
VIRL_NO_LANDMARK_RAIL = "No landmarks nearby"    # observation of the start and of interpolated points (plural)
VIRL_INTERSECTION_OBS = "You observe an intersection"
VIRL_MAPPING_RADIUS = 20.0                       # metres; platform OFFLINE.MAPPING_RADIUS
EARTH_RADIUS_M = 6371000.0


def virl_re_match(text: str, key: str) -> str:
    """re_match for the V-IRL keys. DEPARTURE: a non-string JSON value becomes a string (the official verifier would
    crash on `"intersection" in 3`)."""
    return re_match(text, key, as_text=True)


def virl_verify(response_text: str, gt_action: str, gt_obs: str):
    """utils_rl.step_rewards_virl -> (reward, verify_info, outcome). `gt_obs` is the rail point's landmark text (not
    its intersection text), so a wrong answer whose observation mentions "intersection" costs -1.5 almost always."""
    action = virl_re_match(response_text, "action")
    obs = virl_re_match(response_text, "current observation")
    if action == gt_action:
        reward, msg, outcome = REWARD_FN_VIRL["CORRECT_ACTION"], VIRL_MSG_CORRECT, "CORRECT_ACTION"
    elif "intersection" in obs and "intersection" not in gt_obs:
        reward, msg, outcome = REWARD_FN_VIRL["INCORRECT_OBS"], VIRL_MSG_NOT_AT_INTERSECTION, "INCORRECT_OBS"
    elif "intersection" not in obs and "intersection" in gt_obs:
        reward, msg, outcome = REWARD_FN_VIRL["INCORRECT_OBS"], VIRL_MSG_AT_INTERSECTION, "INCORRECT_OBS"
    else:
        reward, msg, outcome = REWARD_FN_VIRL["INCORRECT_ACTION"], VIRL_MSG_INCORRECT_ACTION, "INCORRECT_ACTION"
    return reward, msg + ".", outcome  # utils_rl.aggregate_fn: messages joined by ", " and ended with "."


# ---- Geodesy
def virl_haversine(a, b):
    """Great-circle distance in metres between (lat, lng) points; either side may be an (n, 2) array of points."""
    a, b = np.radians(np.asarray(a, dtype=np.float64)), np.radians(np.asarray(b, dtype=np.float64))
    h = (np.sin((b[..., 0] - a[..., 0]) / 2) ** 2
         + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin((b[..., 1] - a[..., 1]) / 2) ** 2)
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(h, 1.0)))


class VirlRelocator:
    """Snap a geocode to a panorama (virl platform relocate_geocode_by_source, offline part): exact key lookup in
    gps_pano_mapping, else the nearest key by haversine if closer than `radius` metres, else None.
    DEPARTURE: no online Google Street View fallback (the caller drops the point or raises)."""

    def __init__(self, mapping: dict, radius: float = VIRL_MAPPING_RADIUS):
        self.mapping, self.radius = mapping, radius
        self.keys = list(mapping)
        self.points = np.array(self.keys, dtype=np.float64).reshape(-1, 2)  # (n, 2) lat, lng

    def __call__(self, geocode):
        key = (float(geocode[0]), float(geocode[1]))
        if key in self.mapping:
            return key, self.mapping[key]
        if not self.keys:
            return None
        d = virl_haversine(self.points, key)  # (n,)
        i = int(np.argmin(d))
        if d[i] < self.radius:
            return self.keys[i], self.mapping[self.keys[i]]
        return None


# ---- Instructions, labels and the expert rail (navigation_environment.py _parse_instruction_and_rail)
def virl_parse_milestones(milestone_info: str) -> list[dict]:
    """utils_general.parse_navigation_string: '{ key: value ... }' blocks -> list of dicts (quotes and trailing
    commas stripped, lines without ':' skipped)."""
    result = []
    for block in milestone_info.split("}"):
        block = block.strip().lstrip("{").strip()
        if not block:
            continue
        d = {}
        for line in block.split("\n"):
            line = line.strip().rstrip(",")
            if ":" not in line:
                continue
            key, value = (part.strip() for part in line.split(":", 1))
            d[key.strip("\"'")] = value.strip("\"'")
        if d:
            result.append(d)
    return result


def virl_parse_heading(text: str) -> tuple[int, str]:
    """'177 (south)' -> (177, 'south')."""
    m = re.fullmatch(r"\s*(-?\d+)\s*\(\s*([a-z]+)\s*\)\s*", text)
    if not m:
        raise ValueError(f"to_next_intersection_heading must look like '177 (south)', got {text!r}")
    return int(m.group(1)), m.group(2)


def virl_relative_word(delta: float) -> str:
    """Official thresholds: < -45 left, > 45 right, [-45, 0] slightly left, (0, 45] slightly right."""
    if delta < -45:
        return "left"
    if delta > 45:
        return "right"
    return "slightly left" if delta <= 0 else "slightly right"


def virl_instructions(blocks: list[dict], init_heading: float, wrap: bool = False) -> dict:
    """Instruction sentences and action labels from parsed milestone blocks.

    Δ = next heading − previous heading, with prev = init_heading for the first block. The official code does not
    wrap Δ (350° -> 10° is Δ = -340, labelled `left`); `wrap=True` maps Δ into (-180, 180] first
    (`slightly right`)."""
    sentences, abs_actions, rel_actions, headings, landmarks = [], [], [], [init_heading], []
    prev = init_heading
    for idx, block in enumerate(blocks):
        landmark = block.get("landmarks", VIRL_NO_LANDMARK_BLOCK)
        if "to_next_intersection_heading" not in block:
            raise ValueError(f"milestone block {idx} has no 'to_next_intersection_heading': {block!r}")
        deg, word = virl_parse_heading(block["to_next_intersection_heading"])
        delta = deg - prev
        if wrap:  # DEPARTURE (opt-in): the official labels never wrap
            delta = (delta + 180) % 360 - 180 if (delta + 180) % 360 != 0 else 180
        rel = virl_relative_word(delta)
        prev = deg
        landmarks.append(landmark)
        headings.append(deg)
        abs_actions.append(f"turn_direction({word})")
        rel_actions.append(f"turn_direction({rel})")
        if idx == len(blocks) - 1:
            sentences.append(f"Turn {rel} to face {word}.")
            sentences.append(f"Move forward until you reach destination where {landmark}.")
        else:
            sentences.append(f"{'First, turn' if idx == 0 else 'Turn'} {rel} to face {word}.")
            sentences.append("Move forward until you reach next intersection." if landmark == VIRL_NO_LANDMARK_BLOCK
                             else f"Move forward until you reach next intersection where {landmark}.")
    text = "".join(f"{i + 1}. {s}\n" for i, s in enumerate(sentences))
    return {"sentences": sentences, "text": text, "abs_actions": abs_actions, "rel_actions": rel_actions,
            "headings": headings, "landmarks": landmarks}


def virl_build_rail(route: dict, relocate, rng: random.Random, init_heading: float, absolute_action: bool = True,
                    drop_rate: float = 0.5, straight_line_length: int = 5, wrap: bool = False,
                    route_name: str = "route"):
    """The expert rail: [start] + geocode_list anchors with up to `straight_line_length` interpolated forward()
    points per segment (each dropped with `drop_rate`, relocated, kept only if > 8 m from both ends).
    Returns (instructions dict, list of rail point dicts). Anchors that cannot be relocated raise ValueError."""
    blocks = virl_parse_milestones(route["milestone_info"])
    geocodes = route["route_results"]["geocode_list"]
    if len(blocks) != len(geocodes) or not blocks:
        raise ValueError(f"{route_name}: milestone_info has {len(blocks)} blocks but geocode_list has "
                         f"{len(geocodes)} points (they must match and be non-empty)")
    try:
        ins = virl_instructions(blocks, init_heading, wrap)
    except ValueError as e:
        raise ValueError(f"{route_name}: {e}") from None
    landmark_obs = [VIRL_NO_LANDMARK_RAIL] + ins["landmarks"]
    actions = (ins["abs_actions"] if absolute_action else ins["rel_actions"]) + ["stop()"]
    sentences = ins["sentences"]

    def snap(geocode, what):
        hit = relocate(geocode)
        if hit is None:
            raise ValueError(f"{route_name}: {what} {list(geocode)} has no panorama within {VIRL_MAPPING_RADIUS:g} m "
                             f"in gps_pano_mapping (there is no online fallback)")
        return hit

    start, start_pano = snap(route["start_place"]["relocated_geocode"], "start point")
    rail, prev, instr_idx = [], start, 0
    anchors = [route["start_place"]["relocated_geocode"]] + list(geocodes)
    for idx, raw in enumerate(anchors):
        distance = virl_haversine(prev, raw)  # official: relocated previous anchor vs un-relocated anchor
        geocode, pano = (start, start_pano) if idx == 0 else snap(raw, f"anchor {idx} of geocode_list" if
                                                                    idx < len(anchors) - 1 else "destination")
        if distance > 5:
            for i in range(straight_line_length):
                if rng.random() < drop_rate:
                    continue
                f = (i + 1) / straight_line_length
                hit = relocate((prev[0] * (1 - f) + geocode[0] * f, prev[1] * (1 - f) + geocode[1] * f))
                if hit is None:
                    continue
                if virl_haversine(prev, hit[0]) > 8 and virl_haversine(geocode, hit[0]) > 8:
                    rail.append({"geocode": hit[0], "pano_id": hit[1], "heading": ins["headings"][idx],
                                 "gt_action": "forward()", "observation": VIRL_NO_LANDMARK_RAIL,
                                 "intersection": "", "instruction": sentences[min(instr_idx, len(sentences) - 1)],
                                 "instruction_idx": min(instr_idx, len(sentences) - 1) + 1, "anchor": None})
            instr_idx += 1
        if actions[idx] == "stop()":  # stop() and the last forward() share the last sentence
            instr_idx -= 1
        k = min(max(instr_idx, 0), len(sentences) - 1)
        rail.append({"geocode": geocode, "pano_id": pano, "heading": ins["headings"][idx], "gt_action": actions[idx],
                     "observation": landmark_obs[idx],
                     # _get_observation_rail blanks the intersection text at the stop() point
                     "intersection": VIRL_INTERSECTION_OBS if 0 < idx < len(anchors) - 1 else "",
                     "instruction": sentences[k], "instruction_idx": k + 1, "anchor": idx})
        instr_idx += 1
        prev = geocode
    for p in rail:
        p["oracle"] = f"{p['observation']}; {p['intersection']}"
    return ins, rail


def virl_obs_act_seq(oracles: list[str], actions: list[str], language_only: bool = True) -> str:
    """'O_i: obs\\nA_i: action\\n' for past points, then the current point with an empty action. In VL the current
    observation is replaced by 'You observe an image of 4 views; [You observe an intersection]'."""
    s = "".join(f"O_{i + 1}: {o}\nA_{i + 1}: {a}\n" for i, (o, a) in enumerate(zip(oracles, actions)))
    if len(oracles) > len(actions):
        n, cur = len(oracles), oracles[-1]
        if language_only:
            s += f"O_{n}: {cur}\nA_{n}: \n"
        else:
            inter = VIRL_INTERSECTION_OBS if VIRL_INTERSECTION_OBS in cur else ""
            s += f"O_{n}: You observe an image of 4 views; {inter}\nA_{n}: \n"
    return s


# ---- Street views: equirectangular panorama -> 4 perspective views -> 2x2 grid
@lru_cache(maxsize=8)
def _view_angles(size: int, fov: float, pitch: float) -> tuple:
    """Yaw and elevation (degrees) of every pixel of a size x size pinhole view: (size, size) each, read-only."""
    t = math.tan(math.radians(fov / 2))
    c = ((np.arange(size) + 0.5) / size * 2 - 1) * t
    x, y = np.meshgrid(c, c)  # x right, y down, camera looks along +z
    yaw, elev = np.degrees(np.arctan2(x, 1.0)), pitch - np.degrees(np.arctan2(y, np.sqrt(x * x + 1.0)))
    yaw.flags.writeable = elev.flags.writeable = False
    return yaw, elev


def virl_perspective_view(pano: np.ndarray, heading: float, rotation: float = 0.0, fov: float = 90.0,
                          size: int = 640, pitch: float = 0.0) -> np.ndarray:
    """Pinhole view of an equirectangular panorama (H, W, 3) uint8, looking at compass `heading`.
    Column u of the panorama has yaw 360*u/W and looks at heading (yaw - rotation + 180); the official camera
    heading ((heading - 180) mod 360 + rotation) mod 360. DEPARTURE: bilinear instead of cubic interpolation."""
    H, W = pano.shape[:2]
    yaw, elev = _view_angles(size, fov, pitch)
    theta = (((heading + yaw) - 180) % 360 + rotation) % 360
    u = theta / 360 * W - 0.5
    v = np.clip((90 - elev) / 180 * H - 0.5, 0, H - 1)
    u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = (u - u0)[..., None], (v - v0)[..., None]
    u0, u1, v1 = u0 % W, (u0 + 1) % W, np.minimum(v0 + 1, H - 1)
    flat = pano.reshape(H * W, -1)

    def p(v_, u_):  # the sampled pixels, as float32 (one flat index: numpy's two-array indexing is ~2x slower)
        return flat[v_ * W + u_].astype(np.float32)
    out = ((p(v0, u0) * (1 - fu) + p(v0, u1) * fu) * (1 - fv) + (p(v1, u0) * (1 - fu) + p(v1, u1) * fu) * fv)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def virl_view_headings(cur_heading: float) -> list[float]:
    """virl get_heading_list_by_range_and_fov(cur, 360, 90): cur-135, cur-45, cur+45, cur+135 (tiled row-major;
    the prompt's "[front, right / back, left]" does not describe these)."""
    return [(cur_heading + d) % 360 for d in (-135, -45, 45, 135)]


def virl_view_grid(pano, cur_heading: float, rotation: float = 0.0, resolution: int = 1200,
                   crop_size: int | None = 640, fov: float = 90.0, line_width: int = 5) -> Image.Image:
    """The V-IRL-VL observation: 4 views (FOV 90, rendered at crop_size, resized to resolution) in a 2x2 grid with
    `line_width` px black separators: a (2*resolution + line_width)^2 RGB image (official: 2405 x 2405)."""
    pano = np.asarray(pano.convert("RGB") if isinstance(pano, Image.Image) else pano)
    canvas = Image.new("RGB", (2 * resolution + line_width,) * 2, (0, 0, 0))
    for i, h in enumerate(virl_view_headings(cur_heading)):
        view = Image.fromarray(virl_perspective_view(pano, h, rotation, fov, crop_size or resolution))
        if view.size != (resolution, resolution):
            view = view.resize((resolution, resolution), Image.BICUBIC)
        canvas.paste(view, ((i % 2) * (resolution + line_width), (i // 2) * (resolution + line_width)))
    return canvas


# ---- Loading the official files (a generated world has the same files; make_virl_world.py builds it on first use)
_VIRL_ROUTE_KEYS = (("start_place", "relocated_geocode"), ("route_results", "geocode_list"), ("milestone_info",))


def virl_load_routes(route_info_path) -> list[dict]:
    """route_infos.json = [route_list, route_num]; only route_list is used. Raises one clear error if wrong."""
    path = Path(route_info_path)
    if not path.is_file():
        raise FileNotFoundError(f"V-IRL route file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"V-IRL route file {path} is not valid JSON: {e}") from None
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], list)):
        raise ValueError(f"V-IRL route file {path} has the wrong format: expected a JSON list "
                         f"[route_list, route_num], got {type(data).__name__}"
                         f"{' of length ' + str(len(data)) if isinstance(data, list) else ''}")
    routes = data[0]
    if not routes:
        raise ValueError(f"V-IRL route file {path} contains no routes")
    for i, r in enumerate(routes):
        for keys in _VIRL_ROUTE_KEYS:
            node = r
            for k in keys:
                if not isinstance(node, dict) or k not in node:
                    raise ValueError(f"V-IRL route file {path}: route {i} lacks '{'.'.join(keys)}'")
                node = node[k]
        if not isinstance(r["milestone_info"], str):
            raise ValueError(f"V-IRL route file {path}: route {i} 'milestone_info' must be a string of {{ }} blocks")
    return routes


def virl_load_mapping(gps_to_pano_path) -> dict:
    """gps_pano_mapping.pkl = {(lat, lng): pano_id}. (pickle: only load files you trust, as with the official code.)"""
    path = Path(gps_to_pano_path)
    if not path.is_file():
        raise FileNotFoundError(f"V-IRL gps-to-panorama mapping not found: {path}")
    try:
        with open(path, "rb") as f:
            mapping = pickle.load(f)
    except Exception as e:  # noqa: BLE001  (unpickling can raise almost anything on a bad file)
        raise ValueError(f"V-IRL mapping {path} could not be unpickled: {type(e).__name__}: {e}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, tuple) and len(k) == 2 for k in mapping):
        raise ValueError(f"V-IRL mapping {path} has the wrong format: expected a dict {{(lat, lng): pano_id}}")
    return {(float(k[0]), float(k[1])): str(v) for k, v in mapping.items()}


def virl_load_panorama(panorama_dir, pano_id: str):
    """street_views/{pano_id}.jpg and {pano_id}.metadata.json ('rotation', degrees) -> (np.uint8 HxWx3, rotation)."""
    d = Path(panorama_dir)
    img, meta = d / f"{pano_id}.jpg", d / f"{pano_id}.metadata.json"
    if not img.is_file():
        raise FileNotFoundError(f"V-IRL panorama {pano_id!r} not found: {img}")
    rotation = 0.0
    if meta.is_file():
        rotation = float(json.loads(meta.read_text()).get("rotation", 0.0))
    with Image.open(img) as im:
        return np.asarray(im.convert("RGB")), rotation


VIRL_VLN_MINI_SKINS = ["milan", "new_delhi", "buenos_aires", "london", "hong_kong", "nyc", "melbourne", "lagos",
                       "san_francisco"]  # the city skins of the generated worlds (make_virl_world.py), VLN-mini order
VIRL_WORLD_VERSION = 3  # of the worlds make_virl_world.py writes, in their folder name; v2: logo signs (same cities);
# v3: the signs 1.4x larger (make_virl_world.VIRL_SIGN_M)


def virl_world_files(folder) -> dict:
    """The four paths of a V-IRL data folder in the official layout (nyc_1k_routes/ and every generated world)."""
    d = Path(folder)
    return {"route_info_path": str(d / "route_infos.json"),
            "heldout_route_info_path": str(d / "route_infos_heldout.json"),
            "gps_to_pano_path": str(d / "gps_pano_mapping.pkl"), "panorama_dir": str(d / "street_views")}


def virl_world_dir(world: str = "nyc", seed: int = 0, cache_dir=None) -> Path:
    """Where generated world `world` lives: $SFTVSRL_CACHE (or ~/.cache/sftvsrl)/virl/{world}_seed{seed}_v1."""
    root = Path(cache_dir or os.environ.get("SFTVSRL_CACHE", os.path.expanduser("~/.cache/sftvsrl")))
    return root / "virl" / f"{world}_seed{seed}_v{VIRL_WORLD_VERSION}"


def virl_world_paths(world: str = "nyc", seed: int = 0, cache_dir=None) -> dict:
    """Paths of generated world `world` (a city skin or "vln_mini", see make_virl_world.py); the first call runs
    make_virl_world.py, which builds it in a temporary folder renamed when complete (nyc: ~3 s, ~9 MB)."""
    folder = virl_world_dir(world, seed, cache_dir)
    if not (folder / "gps_pano_mapping.pkl").is_file():
        cmd = [sys.executable, str(Path(__file__).resolve().with_name("make_virl_world.py")), "--world", world,
               "--seed", str(seed), "--out", str(folder)]
        done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise ValueError(f"could not generate the V-IRL world {world!r} ({' '.join(cmd)}):\n{done.stderr.strip()}")
    return virl_world_files(folder)


# ---- The environment
class NavigationEnv:
    """V-IRL navigation (gym_virl/Navigation-v0): follow a rail of turn / forward / stop points; at each point the
    model has `verify_iter` verified attempts (reset on each move); the next call at the same point gets -1 and
    ends the episode.

    Official keyword names are kept. Additions: `world` / `split` (the generated world used when no route files are
    given; split "train" or "heldout"), `order` (reset without options walks the routes 0, 1, 2, ... as the
    official evaluator does with options={"route_idx": k}), `wrap_relative` (wrap the heading difference of the
    relative labels; the official code does not), `resolution` (size of each of the 4 views; official 1200),
    `crop_size` (render size before resizing; official 640, None = render at `resolution`), `seed`."""

    def __init__(self, route_info_path=None, gps_to_pano_path=None, panorama_dir=None, absolute_action: bool = True,
                 verify_iter: int = 2, drop_rate: float = 0.5, straight_line_length: int = 5,
                 language_only: bool = True, resolution: int = 1200, crop_size: int | None = 640,
                 wrap_relative: bool = False, order: bool = False, world: str = "nyc", split: str = "train",
                 seed: int | None = None, cache_dir=None):
        if not isinstance(verify_iter, int) or verify_iter < 0:
            raise ValueError(f"verify_iter must be an integer >= 0, got {verify_iter!r}")
        if not 0 <= drop_rate <= 1:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        if not isinstance(straight_line_length, int) or straight_line_length < 1:
            raise ValueError(f"straight_line_length must be an integer >= 1, got {straight_line_length!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution!r}")
        if route_info_path is None and gps_to_pano_path is None and panorama_dir is None:
            paths = virl_world_paths(world, cache_dir=cache_dir)
            route_info_path = paths["heldout_route_info_path" if split == "heldout" else "route_info_path"]
            gps_to_pano_path, panorama_dir = paths["gps_to_pano_path"], paths["panorama_dir"]
            self.source = f"{world}/{split}"
        else:
            if route_info_path is None or gps_to_pano_path is None:
                raise ValueError("pass route_info_path and gps_to_pano_path (and panorama_dir for V-IRL-VL), or none "
                                 "of them to use the generated world")
            self.source = Path(route_info_path).stem
        if not language_only:
            if panorama_dir is None:
                raise ValueError("V-IRL-VL (language_only=False) needs panorama_dir")
            if not Path(panorama_dir).is_dir():
                raise FileNotFoundError(f"V-IRL panorama directory not found: {panorama_dir}")
        self.route_info_path, self.gps_to_pano_path, self.panorama_dir = route_info_path, gps_to_pano_path, panorama_dir
        self.absolute_action, self.verify_iter, self.drop_rate = absolute_action, verify_iter, drop_rate
        self.straight_line_length, self.language_only = straight_line_length, language_only
        self.resolution, self.crop_size, self.wrap_relative, self.order = resolution, crop_size, wrap_relative, order
        self.route_list = virl_load_routes(route_info_path)
        self.relocate = VirlRelocator(virl_load_mapping(gps_to_pano_path))
        self.action_space_text = VIRL_ACTION_SPACE_ABSOLUTE if absolute_action else VIRL_ACTION_SPACE_RELATIVE
        self.rng = random.Random(seed)
        self.episode = 0
        self.rail: list[dict] = []
        self.done = True

    # -- episode -------------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.rng = random.Random(seed)
        if options is not None and "route_idx" in options:
            idx = int(options["route_idx"])
            if not 0 <= idx < len(self.route_list):
                raise IndexError(f"route_idx {idx} out of range: {self.route_info_path} has "
                                 f"{len(self.route_list)} routes")
        elif self.order:
            idx = self.episode % len(self.route_list)
        else:
            idx = self.rng.randrange(len(self.route_list))
        self.episode += 1
        self.route_idx, self.route = idx, self.route_list[idx]
        heading = self.route.get("init_heading", 0) or 0
        if heading == 0:  # official: 0 or missing -> random heading
            heading = self.rng.randint(0, 359)
        self.init_heading = heading
        name = f"{self.route_info_path} route {idx} ({self.route.get('route_id', 'no route_id')})"
        self.instructions, self.rail = virl_build_rail(
            self.route, self.relocate, self.rng, heading, self.absolute_action, self.drop_rate,
            self.straight_line_length, self.wrap_relative, name)
        sig = hashlib.sha1(json.dumps([p["pano_id"] for p in self.rail]).encode()).hexdigest()[:8]
        self.instance_id = f"{self.source}:{idx}:h{heading}:{sig}"
        self.pos, self.turn, self.remaining_step = 0, 0, self.verify_iter
        self.verify_info, self.outcome, self.is_success, self.action, self.done = None, None, False, None, False
        self._image_cache = None
        self.messages = [{"role": "user", "content": self.prompt_at(0)}]
        return self._obs(), self._info(reward=None)

    def step(self, response_text: str):
        if self.done:
            raise RuntimeError("the episode is over (or never started): call reset() before step()")
        if not isinstance(response_text, str):
            raise TypeError(f"step() takes the model's response text, got {type(response_text).__name__}")
        self.turn += 1
        self.remaining_step -= 1
        point = self.rail[self.pos]
        self.messages.append({"role": "assistant", "content": response_text})
        if self.remaining_step < 0:
            # _terminate_step: answer not checked, -1, is_success False; at the stop() point terminated=True too
            self.verify_info, self.outcome, self.action, self.done = VIRL_MSG_STEP_LIMIT, "STEP_LIMIT", None, True
            terminated = point["gt_action"] == "stop()"
            return self._obs(), VIRL_STEP_LIMIT_REWARD, terminated, True, self._info(VIRL_STEP_LIMIT_REWARD)
        reward, self.verify_info, self.outcome = virl_verify(response_text, point["gt_action"], point["observation"])
        self.action = virl_re_match(response_text, "action")
        info_point = self.pos
        terminated = False
        if self.outcome == "CORRECT_ACTION":
            if point["gt_action"] == "stop()":
                terminated, self.is_success, self.done = True, True, True
            else:  # move_on_rail: next point, budget reset, fresh single-turn prompt
                self.pos += 1
                self.remaining_step = self.verify_iter
                self._image_cache = None
                self.messages = [{"role": "user", "content": self.prompt_at(self.pos)}]
        else:
            feedback = FEEDBACK_TEMPLATE.format(verify_info=self.verify_info)
            self.messages.append({"role": "user", "content": feedback})
        return self._obs(), reward, terminated, False, self._info(reward, info_point)

    # -- observations --------------------------------------------------------------------------------------------
    def prompt_at(self, k: int) -> str:
        """The prompt at rail point k: history O_1..O_k with the expert actions, the current O_{k+1}."""
        oracles = [p["oracle"] for p in self.rail[: k + 1]]
        actions = [p["gt_action"] for p in self.rail[:k]]
        template = Q_VIRL_L if self.language_only else Q_VIRL_VL
        return template.format(instruction=self.instructions["text"], action_space=self.action_space_text,
                               obs_act_seq=virl_obs_act_seq(oracles, actions, self.language_only))

    def image_at(self, k: int) -> Image.Image:
        p = self.rail[k]
        pano, rotation = virl_load_panorama(self.panorama_dir, p["pano_id"])
        return virl_view_grid(pano, p["heading"], rotation, self.resolution, self.crop_size)

    def _obs(self):
        image = None
        if not self.language_only:
            if self._image_cache is None or self._image_cache[0] != self.pos:
                self._image_cache = (self.pos, self.image_at(self.pos))
            image = self._image_cache[1]
        return {"messages": [dict(m) for m in self.messages], "image": image}

    def _info(self, reward, point_idx: int | None = None):
        p = self.rail[self.pos if point_idx is None else point_idx]
        return {"verify_info": self.verify_info, "outcome": self.outcome, "reward": reward,
                "is_correct": self.outcome == "CORRECT_ACTION", "is_success": self.is_success,
                "route_idx": self.route_idx, "route_id": self.route.get("route_id"), "instance_id": self.instance_id,
                "gt_action": p["gt_action"], "action": self.action,
                "rail_idx": self.pos if point_idx is None else point_idx,
                "rail_len": len(self.rail), "current_pos": self.pos, "turn": self.turn,
                "remaining_step": self.remaining_step, "current_obs": p["oracle"],
                "current_instruction": p["instruction"], "instruction_idx": p["instruction_idx"],
                "global_instruction": self.instructions["text"], "heading": p["heading"], "geocode": p["geocode"],
                "pano_id": p["pano_id"], "init_heading": self.init_heading}

    # -- oracle (SFT data) ---------------------------------------------------------------------------------------
    def oracle_response(self, rng: random.Random | None = None, k: int | None = None) -> str:
        """The optimal single-turn answer (ResponseVIRL) at the current rail point (or point k): the oracle
        observation text, the sentence being executed and the expert action. `rng` is unused (API as GP)."""
        p = self.rail[self.pos if k is None else k]
        return ResponseVIRL.format(current_observation=p["oracle"], current_instruction=p["instruction"],
                                   action=p["gt_action"])

    def expert_pairs(self) -> list[dict]:
        """Every rail point of the current episode as an optimal single-turn SFT pair:
        {"prompt": str, "response": str, "rail_idx": k} (use image_at(k) for V-IRL-VL)."""
        return [{"prompt": self.prompt_at(k), "response": self.oracle_response(k=k), "rail_idx": k}
                for k in range(len(self.rail))]

    def _wrong_response(self, rng: random.Random) -> str:
        """A plausible imperfect answer: a wrong action (another label of the action space, forward() or stop()),
        with the right observation or one that gets the intersection wrong (the -1.5 branch)."""
        p = self.rail[self.pos]
        words = VIRL_DIRECTIONS_ABS if self.absolute_action else VIRL_DIRECTIONS_REL
        choices = [a for a in ["forward()", "stop()"] + [f"turn_direction({w})" for w in words] if a != p["gt_action"]]
        obs = p["oracle"]
        if rng.random() < 0.3:
            obs = (f"{p['observation']}; " if VIRL_INTERSECTION_OBS in obs
                   else f"{p['observation']}; {VIRL_INTERSECTION_OBS}")
        return ResponseVIRL.format(current_observation=obs, current_instruction=p["instruction"],
                                   action=rng.choice(choices))

    def revision_trajectory(self, rng: random.Random, max_errors: int | None = None) -> list[dict]:
        """An imperfect multi-turn exchange at the current rail point (Fig. 15 SFT ablation): k wrong answers
        (k uniform in 0..max_errors, at most verify_iter-1) with the real verifier feedback, then the correct one.
        The env is stepped (it moves on, or ends after stop()). Returns the chat messages, starting with the prompt."""
        limit = self.verify_iter - 1 if max_errors is None else min(max_errors, self.verify_iter - 1)
        for _ in range(rng.randint(0, max(0, limit))):
            self.step(self._wrong_response(rng))
        messages = [dict(m) for m in self.messages]
        answer = self.oracle_response()
        self.step(answer)
        return messages + [{"role": "assistant", "content": answer}]


# ---- Probes: measures that move when success does not (issue 17) ----
# Pure functions of one answer and what the env states in its prompt; they parse as the verifier does (re_match,
# robust_str_to_list, evaluate: no eval(), linear time) and never change a reward. None = not measurable here.
GP_DISTANCE_CAP = 100  # |value - target| above this counts as this, so one wild formula cannot swamp a mean


def gp_probes(response_text: str, cards: list[str], target: int = 24, face_cards_as_10: bool = True) -> dict:
    """GP probes of one answer. `cards`: the hand's names ('A', '2'..'10', 'J', 'Q', 'K'; info["cards"]);
    face_cards_as_10: the rule stated in the prompt (True: J/Q/K count as 10 (ID); False: as 11/12/13 (rule OOD)).
    parsable: the "formula" field (cut at '=') is a well-formed expression of numbers and + - * / ( ).
    numbers_follow_stated_rule / numbers_follow_other_rule: the "number" list, as a multiset, equals the hand's values
      under the stated / the other rule (None when the list is not 4 integers; other_rule also None when the hand has
      no J/Q/K, where the rules agree): the memorisation probe.
    cards_used_once: the formula's numbers are the hand's values under the stated rule, each once (None: unparsable).
    target_distance: min(|value - target|, GP_DISTANCE_CAP) (None: unparsable or division by zero)."""
    ranks = [{"A": 1, "J": 11, "Q": 12, "K": 13}.get(c) or int(c) for c in cards]
    stated, other = ([[min(r, 10) for r in ranks], ranks])[:: 1 if face_cards_as_10 else -1]
    raw = re_match(response_text, "number")
    items = robust_str_to_list(raw if isinstance(raw, str) else ", ".join(map(str, raw)) if isinstance(raw, list)
                               else "")
    numbers = sorted(int(x) for x in items) if items and all(x.isdigit() and x.isascii() for x in items) else None
    formula = parse_formula(response_text)
    tokens = _TOKEN_RE.findall(formula)
    value = None
    try:
        value = evaluate(tokens) if "".join(tokens) == formula else None
        parsable = value is not None
    except ValueError:
        parsable = False
    except ZeroDivisionError:
        parsable = True
    return {"parsable": parsable,
            "numbers_follow_stated_rule": None if numbers is None else numbers == sorted(stated),
            "numbers_follow_other_rule": None if numbers is None or stated == other else numbers == sorted(other),
            "cards_used_once": Counter(int(t) for t in tokens if t.isdigit()) == Counter(stated) if parsable else None,
            "target_distance": None if value is None else float(min(abs(value - target), GP_DISTANCE_CAP))}


def virl_probes(response_text: str, gt_action: str, absolute_action: bool = True) -> dict:
    """V-IRL probes of one verified step. absolute_action: the action space stated in the prompt (True: the 8 compass
    directions (ID); False: left/right/slightly left/slightly right (rule OOD)); forward() and stop() are in both.
    action_correct: the action is the gold action (the verifier's test: per-step accuracy).
    action_in_stated_space / action_in_other_space: the action is one of the stated space's actions / a turn of the
    other space only (the memorisation probe)."""
    words = (VIRL_DIRECTIONS_ABS, VIRL_DIRECTIONS_REL)[:: 1 if absolute_action else -1]
    stated, other = ({"forward()", "stop()"} | {f"turn_direction({w})" for w in ws} for ws in words)
    action = virl_re_match(response_text, "action")
    return {"action_correct": action == gt_action, "action_in_stated_space": action in stated,
            "action_in_other_space": action in other - stated}


# ---- Describing an image: the targets of the vision pre-training stage (make_models.py) and the recognition probe
# (eval.py's describe-* settings). Not the official prompts: the official tasks never ask for a description.
GP_DESCRIBE_PROMPT = "What cards are shown, from left to right?"
VIRL_DESCRIBE_PROMPT = ("Which landmark signs can you read in the street view grid? Answer with their names only, "
                        f"separated by semicolons, or '{VIRL_NO_LANDMARK_RAIL}'.")
SUIT_NAMES = {"H": "hearts", "D": "diamonds", "S": "spades", "C": "clubs"}
_CARD_RE = re.compile(r"\b(A|[2-9]|10|J|Q|K) of (hearts|diamonds|spades|clubs)\b")


def gp_caption(ranks, suits) -> str:
    """'A of hearts, 7 of clubs, 7 of diamonds, 10 of spades': every card left to right with its suit."""
    return ", ".join(f"{plain_card_name(r)} of {SUIT_NAMES[s]}" for r, s in zip(ranks, suits))


def gp_read_caption(text: str) -> list[tuple[str, str]]:
    """The (card name, suit letter) pairs a description names, in order (linear-time regex; junk gives [])."""
    letter = {v: k for k, v in SUIT_NAMES.items()}
    return [(m[1], letter[m[2]]) for m in _CARD_RE.finditer(text[:2000])]


def virl_caption(names) -> str:
    """'Delancey Museum; Madison Deli' (the readable signs, grid order) or 'No landmarks nearby'."""
    return "; ".join(names) if names else VIRL_NO_LANDMARK_RAIL


def virl_read_caption(text: str) -> list[str]:
    """The landmark names a description lists ([] for 'No landmarks nearby' or junk)."""
    text = text[:2000].strip()
    return [] if text.startswith(VIRL_NO_LANDMARK_RAIL) else [n.strip() for n in text.split(";") if n.strip()]


class DescribeEnv:
    """The recognition probe as a one-turn environment: an image of the task and the describe prompt; the reply is
    scored against what the image shows (reward 1 when fully right), never verified.
    gp: a GP-VL hand of GeneralPointsEnv(**env_kwargs); cards_correct = the card names, in order, are the hand's.
    virl: a rail point of a held-out route whose observation names a landmark, in the generated world of skin
    worlds[i % len(worlds)] for the i-th reset; is_correct = the description names that landmark."""

    def __init__(self, task: str, worlds=("nyc",), **env_kwargs):
        if task not in ("gp", "virl"):
            raise ValueError(f"task must be 'gp' or 'virl', got {task!r}")
        self.task, self.worlds, self.env_kwargs, self.resets = task, list(worlds), env_kwargs, 0
        self.envs = {}

    def _env(self, world=None):
        if world not in self.envs:
            self.envs[world] = (GeneralPointsEnv(language_only=False, **self.env_kwargs) if self.task == "gp" else
                                NavigationEnv(language_only=False, world=world, split="heldout", **self.env_kwargs))
        return self.envs[world]

    def reset(self, seed: int | None = None, options: dict | None = None):
        rng = random.Random(seed)
        index = (options or {}).get("index", self.resets)
        self.resets += 1
        if self.task == "gp":
            env = self._env()
            env.reset(seed=seed)
            self.image, self.truth = env.image, list(zip(env.cards, env.suits))
            prompt, info = GP_DESCRIBE_PROMPT, {"cards": env.cards, "instance_id": env.instance_id}
        else:
            self.world = world = self.worlds[index % len(self.worlds)]
            env = self._env(world)
            for _ in range(1000):
                env.reset(seed=rng.randrange(2 ** 31))
                marks = [k for k, p in enumerate(env.rail) if " is on your " in p["observation"]]
                if marks:
                    break
            else:
                raise RuntimeError(f"no held-out route of world {world!r} passes a landmark")
            k = rng.choice(marks)
            self.image, self.truth = env.image_at(k), env.rail[k]["observation"].split(" is on your ")[0]
            prompt, info = VIRL_DESCRIBE_PROMPT, {"route_idx": env.route_idx, "world": world,
                                                  "instance_id": f"{world}:{env.instance_id}:{k}"}
        self.messages = [{"role": "user", "content": prompt}]
        return {"messages": [dict(m) for m in self.messages], "image": self.image}, info

    def step(self, response_text: str):
        if self.task == "gp":
            read = gp_read_caption(response_text)
            hits = sum(a[0] == b[0] for a, b in zip(read, self.truth))
            correct = [a[0] for a in read] == [b[0] for b in self.truth]
            info = {"cards_correct": correct, "card_hits": hits, "suits_correct": read == self.truth}
        else:
            correct = self.truth in virl_read_caption(response_text)
            info = {"landmark": self.truth, "world": self.world}
        info |= {"is_correct": correct, "is_success": correct, "outcome": "RECOGNIZED" if correct else "MISSED",
                 "verify_info": ""}
        return {"messages": self.messages, "image": self.image}, float(correct), True, False, info


if __name__ == "__main__":  # play one episode in the terminal
    p = argparse.ArgumentParser(description="Play one episode: type a GP formula such as (1+2)*8, a V-IRL action "
                                "such as forward() or turn_direction(north), or a whole answer block; empty line quits")
    p.add_argument("task", choices=["gp-l", "gp-vl", "virl-l", "virl-vl"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ood", action="store_true", help="rule OOD: J, Q, K count as 11, 12, 13 / relative turn labels")
    p.add_argument("--color", default="mixed", choices=sorted(SUITS), help="GP card colours")
    p.add_argument("--world", default="nyc", help="V-IRL generated world (vln_mini: 9 other cities)")
    p.add_argument("--auto", action="store_true", help="the oracle answers")
    p.add_argument("--save-image", default=None, help="write the first image observation to this PNG and exit")
    a = p.parse_args()
    gp, kw = a.task.startswith("gp"), dict(language_only=a.task.endswith("-l") and not a.save_image)
    env = (GeneralPointsEnv(treat_face_cards_as_10=not a.ood, ood=a.ood, face_cards_color=a.color, **kw) if gp
           else NavigationEnv(absolute_action=not a.ood, world=a.world, resolution=256, crop_size=None, **kw))
    obs, info = env.reset(seed=a.seed)
    if a.save_image:
        obs["image"].save(a.save_image)
        sys.exit()
    print(obs["messages"][-1]["content"])
    for line in iter(env.oracle_response, None) if a.auto else iter(lambda: sys.stdin.readline().strip(), ""):
        text = line if "{" in line else re.sub(r'"(formula|action)": "[^"]*"', lambda m: f'"{m[1]}": "{line}"',
                                               env.oracle_response())
        obs, reward, terminated, truncated, info = env.step(text)
        where = f" | next: {env.rail[env.pos]['oracle']}" if not (gp or env.done) and info["is_correct"] else ""
        print(f"{re_match(text, 'formula' if gp else 'action')}: reward {reward:+g}, "
              f"{info['verify_info'].splitlines()[0]}{where}")
        if terminated or truncated:
            print("episode over:", "success" if info["is_success"] else "failed")
            break
