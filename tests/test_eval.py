"""eval.py: metrics arithmetic with scripted policies, statistics on hand-computed cases, checkpoint discovery,
the model-backed policy on tiny models, and the CLI end to end (subprocess)."""
import ast
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import eval as ev
import report
import envs
from envs import GP_DESCRIBE_PROMPT, ResponseEqn, solve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- statistics on hand-computed cases ----
def test_wilson_interval_known_values():
    lo, hi = report.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = report.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = report.wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    # 3.4 % of 234 (the paper's GP-L SFT OOD number = 8/234)
    lo, hi = report.wilson_interval(8, 234)
    assert lo == pytest.approx(0.01744, abs=1e-4) and hi == pytest.approx(0.06606, abs=1e-4)
    assert all(math.isnan(x) for x in report.wilson_interval(0, 0))


def test_mcnemar_exact_hand_cases():
    assert report.mcnemar_exact(0, 0) == 1.0
    assert report.mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # all 5 discordant pairs one way
    assert report.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert report.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert report.mcnemar_exact(3, 3) == 1.0
    assert report.mcnemar_exact(1, 0) == 1.0


def test_paired_bootstrap_and_mde():
    a = np.array([1, 0, 1, 0, 1, 0, 0, 0])
    diff, lo, hi = report.paired_bootstrap(a, np.ones(8), a, np.ones(8), samples=500)
    assert (diff, lo, hi) == (0.0, 0.0, 0.0)  # identical answers: no uncertainty in the paired difference
    b = np.ones(8)
    diff, lo, hi = report.paired_bootstrap(a, np.ones(8), b, np.ones(8), samples=2000)
    assert diff == pytest.approx(5 / 8) and 0 < lo <= diff <= hi <= 1
    # ratio metric (per-step accuracy): sum(num)/sum(den), not a mean of ratios
    diff, _, _ = report.paired_bootstrap([1, 0], [1, 3], [2, 3], [2, 3], samples=10)
    assert diff == pytest.approx(5 / 5 - 1 / 4)
    # one sample (num_a = None): B's own value; den 0 = not measured in that episode
    mean, lo, hi = report.paired_bootstrap(None, None, [3.0, 0.0, -1.0, 2.0], [1, 0, 1, 1], samples=2000)
    assert mean == pytest.approx(4 / 3) and -1 <= lo < mean < hi <= 3


# ---- minimum detectable effect: exact power, checked against a brute-force enumeration written out here ----
def _mcnemar_p(b, c):
    m = b + c
    return 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2 ** m)


def _power_paired(n, p_a, p_b, alpha=0.05):  # every (b, c) of the trinomial over n pairs
    return sum(math.comb(n, b) * math.comb(n - b, c) * p_a ** b * p_b ** c * (1 - p_a - p_b) ** (n - b - c)
               for b in range(n + 1) for c in range(n + 1 - b) if _mcnemar_p(b, c) <= alpha)


def _fisher_p(x, y, n):  # two-sided: the tables of the same margins no likelier than the observed one
    pmf = {k: math.comb(n, k) * math.comb(n, x + y - k) / math.comb(2 * n, x + y)
           for k in range(max(0, x + y - n), min(x + y, n) + 1)}
    return sum(q for q in pmf.values() if q <= pmf[x] * (1 + 1e-7))


def _power_unpaired(n, p_a, p_b, alpha=0.05):
    pmf = lambda k, p: math.comb(n, k) * p ** k * (1 - p) ** (n - k)  # noqa: E731
    return sum(pmf(x, p_a) * pmf(y, p_b) for x in range(n + 1) for y in range(n + 1) if _fisher_p(x, y, n) <= alpha)


@pytest.mark.parametrize("n, background, paired", [(10, 0.0, True), (20, 0.05, True), (32, 0.0, True),
                                                    (32, 0.1, True), (50, 0.02, True), (40, 0.25, True),
                                                    (10, 0.0, False), (20, 0.3, False), (32, 0.1, False)])
def test_mde_is_the_smallest_effect_with_exact_power_080(n, background, paired):
    brute = _power_paired if paired else _power_unpaired
    for d in (0.1, 0.3):
        assert report.exact_power(n, background, background + d, paired) == pytest.approx(brute(n, background,
                                                                                            background + d), abs=1e-9)
    mde = report.minimum_detectable_effect(n, background, paired)
    assert brute(n, background, background + mde) >= 0.8 > brute(n, background, background + mde - 1e-4)


def test_mde_at_32_pairs_matches_the_exact_mcnemar_numbers():
    """n = 32, no background discordance: p < 0.05 needs >= 6 one-sided discordant pairs (6/32 = 19 points), 80 %
    power needs ~24 points (the normal approximation printed ~9 with the observed discordance)."""
    assert report.mcnemar_exact(6, 0) < 0.05 < report.mcnemar_exact(5, 0)
    assert report.exact_power(32, 0.0, 6 / 32) == pytest.approx(1 - sum(math.comb(32, k) * (6 / 32) ** k * (26 / 32) **
                                                                     (32 - k) for k in range(6)))
    assert 0.23 < report.minimum_detectable_effect(32) < 0.245
    assert report.minimum_detectable_effect(4) is None  # 4 pairs can never reach p < 0.05
    assert report.minimum_detectable_effect(234, 0.05) < report.minimum_detectable_effect(234, 0.115, paired=False)


# ---- GP episodes with a scripted policy on the real environment ----
def _values(cards, face_as_10=True):
    face = {"A": 1, "J": 10, "Q": 10, "K": 10} if face_as_10 else {"A": 1, "J": 11, "Q": 12, "K": 13}
    return [face.get(c, None) or int(c) for c in cards]


def scripted_gp_policy(plans: dict, calls: list):
    """plans: first prompt -> list of answer kinds per turn. Returns a policy that builds those answers."""
    def policy(batch):
        calls.append(len(batch))
        out = []
        for messages, image in batch:
            prompt = messages[0]["content"]
            cards = ast.literal_eval(re.search(r"Cards: (\[.*?\])", prompt).group(1))
            values = _values(cards, "count as '10'" in prompt)
            turn = sum(m["role"] == "assistant" for m in messages)
            kind = plans[prompt][min(turn, len(plans[prompt]) - 1)]
            shown = ["Z", "Z", "Z", "Z"] if kind == "badcards" else cards
            formula = {"correct": solve(tuple(values), 24)[0] if kind == "correct" else None,
                       "illegal": "x".join(map(str, values))}.get(kind) or "-".join(map(str, values))  # < 24
            out.append(ResponseEqn.format(cards=repr(shown), numbers=repr(values), formula=formula + "=24"))
        return out
    return policy


def test_gp_metrics_scripted_policy():
    setting = ev.Setting("gp-l", "id", dict(verify_iter=3, language_only=True, treat_face_cards_as_10=True,
                                             ood=False), num_episodes=6, seed=0)
    plan_list = [["correct"], ["wrong", "correct"], ["wrong"] * 4, ["badcards", "wrong", "correct"],
                 ["illegal"] * 4, ["correct"]]
    env = ev.make_env(setting)
    prompts = [env.reset(seed=s)[0]["messages"][0]["content"] for s in setting.episode_seeds()]
    assert len(set(prompts)) == 6
    calls = []
    episodes = ev.run_episodes(setting, scripted_gp_policy(dict(zip(prompts, plan_list)), calls), batch_size=4,
                               log_every_s=1e9)
    assert [e["num_steps"] for e in episodes] == [1, 2, 4, 3, 4, 1]  # the forced 4th call counts as a step
    assert [e["success_turn"] for e in episodes] == [1, 2, None, 3, None, 1]
    assert episodes[2]["turns"][-1]["truncated"] and episodes[2]["turns"][-1]["reward"] == -1
    assert episodes[1]["turns"][1]["messages"][-1]["content"].startswith("You failed this trial because")
    m = ev.metrics_of(setting, episodes)
    assert m["success"] == (4, 6)
    old = [{k: v for k, v in json.loads(json.dumps(e)).items() if k not in ("reward", "probes", "success")}
           for e in episodes]  # --resume of a file written before these fields existed: derived again
    again = ev.resumed({("a", "gp-l", "id", i): e for i, e in enumerate(old)}, "a", setting)
    assert [again[i] for i in range(6)] == json.loads(json.dumps(episodes))
    with pytest.raises(SystemExit, match="lacks a logged field"):
        ev.resumed({("a", "gp-l", "id", 0): dict(old[0], turns=[])}, "a", setting)
    assert (m["success@turn-1"], m["success@turn-2"], m["success@turn-3"]) == ((2, 6), (3, 6), (4, 6))
    assert "recognition" not in m  # GP-L: the cards are in the prompt's text
    m_vl = ev.metrics_of(dataclasses.replace(setting, task="gp-vl"), episodes)  # same arithmetic, VL label
    assert m_vl["recognition"] == (5, 6)  # only the "badcards" first answer misreads the hand
    # outcomes of all 15 answers; probes of the 6 first answers (correct, wrong, wrong, badcards, illegal, correct)
    assert (m["answers: CORRECT_SOLUTION"], m["answers: ILLEGAL_FORMULA"], m["answers: STEP_LIMIT"]) == \
        ((4, 15), (3, 15), (2, 15))
    assert m["first answer: parsable"] == (5, 6) and m["first answer: cards used once"] == (5, 5)
    assert m["first answer: numbers follow stated rule"] == (6, 6)
    faces = sum(any(c in "JQK" for c in e["cards"]) for e in episodes)
    assert m["first answer: numbers follow other rule"] == (0, faces) and faces > 0
    assert [e["reward"] for e in episodes][:2] == [5.0, sum(t["reward"] for t in episodes[1]["turns"])]
    means = ev.means_of(episodes, samples=200)
    assert means["reward / episode"][0] == pytest.approx(sum(e["reward"] for e in episodes) / 6)
    assert means["reward / answer"][0] == pytest.approx(sum(e["reward"] for e in episodes) / 15)
    assert means["first answer: target distance"][3] == 5 and means["first answer: target distance"][0] > 0
    assert [e["seen"] for e in episodes] == [True, True, False, False, True, True]  # seed 0: 2 held-out hands
    assert m["success (seen instances)"] == (3, 4) and m["success (unseen instances)"] == (1, 2)
    # batching: one policy call per turn for every active episode, never more than batch_size
    assert max(calls) == 4 and calls[0] == 4 and sum(calls) == sum(e["num_steps"] for e in episodes)
    assert len(calls) < sum(e["num_steps"] for e in episodes)


def test_gp_recognition_run_is_single_turn():
    args = ev.Args(gp_num_episodes=3, separate_recognition_runs=True)
    settings = {s.name: s for s in ev.build_settings(args, "gp-vl")}
    assert set(settings) == {"id", "rule-ood", "visual-ood", "recog-id", "recog-rule-ood", "recog-visual-ood",
                             "describe-id", "describe-visual-ood"}
    assert settings["visual-ood"].env_kwargs["face_cards_color"] == "red"
    assert settings["rule-ood"].env_kwargs["face_cards_color"] == "black"
    assert settings["rule-ood"].env_kwargs["ood"] and not settings["rule-ood"].env_kwargs["treat_face_cards_as_10"]
    recog = ev.Setting("gp-l", "recog-id", dict(settings["recog-id"].env_kwargs, language_only=True), 3, 42,
                       max_turns=1)
    episodes = ev.run_episodes(recog, lambda batch: ["nothing"] * len(batch), log_every_s=1e9)
    assert [e["num_steps"] for e in episodes] == [1, 1, 1]
    m = ev.metrics_of(recog, episodes)
    assert m["success"] == (0, 3) and not any("@turn" in k for k in m) and "recognition" not in m
    assert ev.metrics_of(dataclasses.replace(recog, task="gp-vl"), episodes)["recognition"] == (0, 3)


def test_describe_settings_score_descriptions_of_held_out_hands():
    """The recognition probe (detail #19): one turn per held-out hand, scored per card at its position."""
    settings = {s.name: s for s in ev.build_settings(ev.Args(gp_num_episodes=6, gp_image_size=64), "gp-vl")}
    assert settings["describe-id"].env_kwargs == dict(face_cards_color="black", split="unseen", image_size=64)
    assert settings["describe-visual-ood"].env_kwargs["face_cards_color"] == "red"
    assert ev.build_settings(ev.Args(describe=False), "gp-vl")[-1].name == "visual-ood"
    answer = "A of spades, 7 of clubs, K of spades, 10 of clubs"
    episodes = ev.run_episodes(settings["describe-id"], lambda batch: [answer] * len(batch), log_every_s=1e9)
    assert all(e["num_steps"] == 1 and e["turns"][0]["messages"][0]["content"] == GP_DESCRIBE_PROMPT
               for e in episodes)
    assert all(envs.is_unseen(e["instance_id"]) for e in episodes)
    hits = sum(a == b for e in episodes for a, b in zip(["A", "7", "K", "10"], e["cards"]))
    whole = sum(e["cards"] == ["A", "7", "K", "10"] for e in episodes)
    m = ev.metrics_of(settings["describe-id"], episodes)
    assert m["recognition: per card"] == (hits, 24) and m["recognition: whole hand"] == (whole, 6)
    assert m["success"] == (whole, 6) and "recognition" not in m and not any(k.startswith("answers:") for k in m)


def test_describe_settings_of_virl_name_landmarks_per_skin():
    settings = {s.name: s for s in ev.build_settings(ev.Args(virl_describe_views=2, virl_resolution=32), "virl-vl")}
    assert settings["describe-id"].env_kwargs["worlds"] == ["nyc"]
    assert len(settings["describe-visual-ood"].env_kwargs["worlds"]) == 8
    episodes = ev.run_episodes(settings["describe-id"], lambda batch: ["No landmarks nearby"] * len(batch),
                               log_every_s=1e9)
    m = ev.metrics_of(settings["describe-id"], episodes)
    assert m["recognition: landmark named"] == (0, 2) and m["recognition: landmark named (nyc)"] == (0, 2)
    names = iter([e["turns"][0]["landmark"] for e in episodes])  # each episode records the landmark it asks for
    episodes = ev.run_episodes(settings["describe-id"], lambda batch: [f"Nowhere Cafe; {next(names)}" for _ in batch],
                               log_every_s=1e9)
    assert ev.metrics_of(settings["describe-id"], episodes)["recognition: landmark named"] == (2, 2)
    # visual OOD: episode i views the (i mod 8)-th skin, whatever env object serves it (batches reuse envs)
    ood = dataclasses.replace(settings["describe-visual-ood"], num_episodes=16, env_kwargs=dict(
        settings["describe-visual-ood"].env_kwargs, worlds=["milan", "london"]))
    episodes = ev.run_episodes(ood, lambda batch: ["No landmarks nearby"] * len(batch), batch_size=3, log_every_s=1e9)
    m = ev.metrics_of(ood, episodes)
    assert m["recognition: landmark named (milan)"] == (0, 8) == m["recognition: landmark named (london)"]


# ---- V-IRL arithmetic with a fake navigation env (same episode API) ----
class FakeNav:
    """3 rail points; 'ok' is the right action; verify_iter wrong answers per point, then a forced -1."""

    def __init__(self, verify_iter=2, **kwargs):
        self.verify_iter = verify_iter

    def reset(self, seed=None, options=None):
        self.seed, self.pos, self.remaining = seed, 0, self.verify_iter
        return self._obs(), dict(instance_id=str(seed), seen=FakeNav.seen[seed])

    def _obs(self):
        return {"messages": [{"role": "user", "content": f"route {self.seed}"}], "image": None}

    def step(self, text):
        self.remaining -= 1
        info = dict(is_success=False)
        if self.remaining < 0:
            return self._obs(), -1.0, False, True, info
        if text != "ok":
            return self._obs(), -1.0, False, False, info
        if self.pos == 2:
            return self._obs(), 1.0, True, False, dict(is_success=True)
        self.pos, self.remaining = self.pos + 1, self.verify_iter
        return self._obs(), 1.0, False, False, info


def test_virl_per_step_accuracy_counts_retries_and_forced_steps():
    setting = ev.Setting("virl-l", "id", dict(verify_iter=2), num_episodes=3, seed=12)
    seeds = setting.episode_seeds()
    plans = {seeds[0]: ["ok", "ok", "ok"], seeds[1]: ["bad", "ok", "bad", "bad", "bad"],
             seeds[2]: ["ok", "bad", "ok", "ok"]}
    FakeNav.seen = {seeds[0]: True, seeds[1]: True, seeds[2]: False}
    counters = {s: 0 for s in seeds}

    def policy(batch):
        out = []
        for messages, _ in batch:
            s = int(messages[0]["content"].split()[1])
            out.append(plans[s][counters[s]])
            counters[s] += 1
        return out

    episodes = ev.run_episodes(setting, policy, env_factory=lambda s: FakeNav(**s.env_kwargs), log_every_s=1e9)
    assert [e["num_steps"] for e in episodes] == [3, 5, 4]
    assert [e["num_correct_steps"] for e in episodes] == [3, 1, 3]
    m = ev.metrics_of(setting, episodes)
    assert m["per-step accuracy"] == (7, 12) and m["success"] == (2, 3)
    # verified steps (the forced -1 calls of the fake env carry no outcome, so all 12 count): no answer block
    assert m["steps: action in stated space"] == (0, 12) and [e["reward"] for e in episodes] == [3.0, -3.0, 2.0]
    assert m["success (seen instances)"] == (1, 2) and m["success (unseen instances)"] == (1, 1)
    assert m["per-step accuracy (seen instances)"] == (4, 8) and m["per-step accuracy (unseen instances)"] == (3, 4)


def test_virl_real_env_wrong_then_oracle_is_half_the_steps():
    """On the real NavigationEnv: a wrong answer, then the oracle's, at every rail point -> per-step accuracy exactly
    1/2 (retries count), every route solved."""
    setting = [s for s in ev.build_settings(ev.Args(virl_num_episodes=3), "virl-l") if s.name == "rule-ood"][0]
    envs = []

    def factory(s):
        envs.append(ev.make_env(s))
        return envs[-1]

    def policy(batch):
        out = []
        for messages, _ in batch:
            env = next(e for e in envs if not e.done and e.messages[0]["content"] == messages[0]["content"])
            out.append(env.oracle_response() if messages[-1]["content"].startswith("You failed") else "no idea")
        return out

    episodes = ev.run_episodes(setting, policy, batch_size=2, env_factory=factory, log_every_s=1e9)
    m = ev.metrics_of(setting, episodes)
    assert m["success"] == (3, 3)
    assert 2 * m["per-step accuracy"][0] == m["per-step accuracy"][1] == sum(e["num_steps"] for e in episodes)
    # rule OOD: every oracle action is of the stated (relative) space; "no idea" has no action
    assert m["steps: action in stated space"] == (m["per-step accuracy"][0], m["per-step accuracy"][1])
    assert m["steps: action in other space"][0] == 0
    assert m["answers: CORRECT_ACTION"][0] == m["per-step accuracy"][0]


def test_virl_visual_ood_routes_in_fixed_order():
    args = ev.Args(virl_visual_ood_routes=4)
    settings = {s.name: s for s in ev.build_settings(args, "virl-vl")}
    assert list(settings) == ["id", "id-unseen", "rule-ood", "visual-ood", "describe-id", "describe-visual-ood"]
    assert settings["id"].env_kwargs["absolute_action"] and not settings["rule-ood"].env_kwargs["absolute_action"]
    assert settings["id-unseen"].env_kwargs["split"] == "heldout" and settings["id"].num_episodes == 48
    visual = settings["visual-ood"]
    assert visual.route_order and visual.num_episodes == 4 and visual.env_kwargs["world"] == "vln_mini"
    official = ev.build_settings(ev.Args(virl_visual_ood_dir="/data/VLN_mini", virl_data_dir="/data/nyc"), "virl-l")
    assert [s.name for s in official] == ["id", "rule-ood"]
    assert official[0].env_kwargs["route_info_path"] == "/data/nyc/route_infos.json"
    seen_options = []

    class Recorder(FakeNav):
        def reset(self, seed=None, options=None):
            seen_options.append(options["route_idx"])
            FakeNav.seen = {seed: True}
            return super().reset(seed, options)

    ev.run_episodes(visual, lambda b: ["x"] * len(b), batch_size=2, env_factory=lambda s: Recorder(),
                    log_every_s=1e9)
    assert seen_options == [0, 1, 2, 3]


# ---- paired comparison and reporting ----
def test_paired_comparison_and_table():
    def eps(successes):
        return [dict(seed=i, task="gp-l", success=bool(x), num_steps=1, num_correct_steps=int(x),
                     reward=5.0 if x else -1.0, probes={"target_distance": [0.0, 1] if x else [0.0, 0]})
                for i, x in enumerate(successes)]
    a, b = [1, 0, 0, 0, 0, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    results = [dict(label=l, task="gp-l", setting="rule-ood", metrics={"success": (sum(x), 10)},
                    means=ev.means_of(eps(x), samples=500)) for l, x in (("A", a), ("B", b))]
    episodes = {("A", "gp-l", "rule-ood"): eps(a), ("B", "gp-l", "rule-ood"): eps(b)}
    cmp = {c["metric"]: c for c in ev.paired_comparisons(results, episodes, [("A", "B")],
                                                          ev.Args(bootstrap_samples=1000))}
    assert list(cmp) == ["success", "reward / episode", "reward / answer", "first answer: target distance"]
    x = cmp["success"]
    assert (x["a_only"], x["b_only"]) == (1, 5)
    assert x["mcnemar_p"] == pytest.approx(2 * (1 + 6) / 64)
    assert x["difference"] == pytest.approx(0.4) and x["bootstrap_lo"] < 0.4 < x["bootstrap_hi"]
    # background = min(b, c) / n = 0.1: no effect reaches 80 % power on 10 pairs; unpaired from A's 20 %
    assert x["mde_paired"] is None and x["mde_unpaired"] == report.minimum_detectable_effect(10, 0.2, paired=False)
    assert cmp["reward / episode"]["difference"] == pytest.approx(2.4) and "mcnemar_p" not in cmp["reward / episode"]
    assert cmp["reward / episode"]["mde_normal"] > 0
    rows = report.rows_of(results)
    table = report.markdown_table(rows, ["A", "B"], reference_column=True)
    assert "| gp-l rule-ood | success | 20.0 [5.7, 51.0] (2/10) | 60.0 [31.3, 83.2] (6/10) | 11.5 / 15.0 / 3.4 |" \
        in table
    measures = report.measures_table(rows, results, ["A", "B"])
    assert "| gp-l rule-ood | reward / episode | +0.20 [" in measures and "| +2.60 [" in measures
    text = report.paired_text(list(cmp.values()))
    assert "1 / 5, p = 0.219" in text  # 14/64
    assert "| gp-l rule-ood (n = 10) | B - A | reward / episode | +2.40 [" in text


def _state(step, flops, **extra):
    """A trainer_state.json as sft.py and ppo_*.py write it (CONTEXT schema: step, tokens, flops, run_name, args)."""
    return json.dumps(dict(step=step, tokens_trained=10 * step, tokens_generated=0, d_init_tokens=0, flops=flops,
                           run_name="run", args={}, **extra))


def test_find_checkpoints_reads_step_and_flops_by_name(tmp_path):
    for name in ("step_10", "step_2", "final", "not_a_ckpt"):
        (tmp_path / name).mkdir()
        if name != "not_a_ckpt":
            (tmp_path / name / "config.json").write_text("{}")
    for name, step, flops in (("step_2", 2, 100.0), ("step_10", 10, 500.0), ("final", 12, 600.0)):
        (tmp_path / name / "trainer_state.json").write_text(_state(step, flops))
    # a metrics log is not read: step and FLOPs come from trainer_state.json only (no key or unit guessing)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 12, "compute/flops": 1, "compute/gflops": 1}) + "\n")
    ckpts = ev.find_checkpoints(str(tmp_path))
    assert [(c["name"], c["step"], c["flops"]) for c in ckpts] == [("step_2", 2, 100), ("step_10", 10, 500),
                                                                  ("final", 12, 600)]
    # ppo_*.py layout: run/checkpoints/update_XXXX/; `step` = PPO updates
    ppo = tmp_path / "ppo"
    for u in (2, 1):
        (ppo / "checkpoints" / f"update_{u:04d}").mkdir(parents=True)
        (ppo / "checkpoints" / f"update_{u:04d}" / "config.json").write_text("{}")
        (ppo / "checkpoints" / f"update_{u:04d}" / "trainer_state.json").write_text(_state(u, 1.5e9 * u, update=u))
    (ppo / "checkpoints" / "update_0003.tmp").mkdir()  # an interrupted save is skipped
    (ppo / "checkpoints" / "update_0003.tmp" / "config.json").write_text("{}")
    ckpts = ev.find_checkpoints(str(ppo))
    assert [(c["name"], c["step"], c["flops"]) for c in ckpts] == [("update_0001", 1, 1.5e9), ("update_0002", 2, 3e9)]


def test_find_checkpoints_without_trainer_state(tmp_path):
    """No trainer_state.json (or one without the keys): the step in the directory name, no FLOPs, no crash."""
    for name in ("step_3", "step_1", "final"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "step_3" / "trainer_state.json").write_text(json.dumps({"run_name": "old"}))
    ckpts = ev.find_checkpoints(str(tmp_path))
    assert [(c["name"], c["step"], c["flops"]) for c in ckpts] == [("step_1", 1, None), ("step_3", 3, None),
                                                                  ("final", None, None)]


def test_curves_fall_back_to_steps_without_flops(tmp_path, capsys):
    def point(arm, label, step, flops, k):
        lo, hi = report.wilson_interval(k, 4)
        return dict(arm=arm, checkpoint=label, step=step, flops=flops, task="gp-l", setting="id", metric="success",
                    value=100 * k / 4, lo=100 * lo, hi=100 * hi)
    points = [point("sft", "init", 0.0, 0.0, 1), point("sft", "sft/step_2", 2, 1e9, 2),
              point("ppo", "init", 0.0, 0.0, 1), point("ppo", "ppo/update_1", 1, None, 3)]
    png = tmp_path / "curves_gp-l.png"
    report.plot_curves(points, str(png), "gp-l")
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{png}: x axis = training step, no FLOPs in the trainer_state.json of ppo/update_1"]
    assert png.stat().st_size > 1000
    report.plot_curves(points[:2], str(png), "gp-l")  # every point has FLOPs: nothing to say
    assert capsys.readouterr().out == ""


def test_curve_points_start_every_arm_at_the_init_and_include_the_mean_reward():
    checkpoints = [dict(label="init", arm=None, step=None, flops=None), dict(label="sft/step_2", arm="sft", step=2,
                                                                             flops=1e9),
                   dict(label="rl/update_1", arm="rl", step=1, flops=2e9)]
    rows = report.rows_of([dict(label=c["label"], task="gp-l", setting="id",
                                metrics={"success": (k, 4), "format": (4, 4)}) for c, k in zip(checkpoints, (1, 2, 3))])
    results = [dict(label=c["label"], task="gp-l", setting="id", means={"reward / episode": (m, m - 1, m + 1, 4)})
               for c, m in zip(checkpoints, (-2.0, -1.0, 0.5))]
    points = report.curve_points(rows, results, checkpoints)
    by = {(p["arm"], p["metric"], p["step"]): p for p in points}
    assert set(by) == {(a, m, s) for a, s in (("sft", 0.0), ("sft", 2), ("rl", 0.0), ("rl", 1))
                       for m in ("success", "reward / episode")}  # "format" is not a curve
    assert by[("rl", "success", 1)]["value"] == 75.0 and by[("sft", "success", 0.0)]["value"] == 25.0
    assert by[("rl", "reward / episode", 0.0)]["value"] == -2.0 and by[("rl", "reward / episode", 1)]["hi"] == 1.5


# ---- the model-backed policy on tiny models ----
def test_model_policy_tiny_vl():
    """The VL path (image before the first user text, Idefics3 processor); the text path runs in the CLI test."""
    model, processor = ev.load_model("tiny", vl_task=True)
    policy = ev.ModelPolicy(model, processor, max_new_tokens=3, temperature=0.0, top_p=1.0, top_k=0, device="cpu")
    setting = ev.Setting("gp-vl", "visual-ood", dict(language_only=False, face_cards_color="red", image_size=64,
                                                     verify_iter=1), num_episodes=3, seed=1)
    episodes = ev.run_episodes(setting, policy, batch_size=2, log_every_s=1e9)
    assert all(1 <= e["num_steps"] <= 2 for e in episodes)
    assert all(isinstance(t["response"], str) for e in episodes for t in e["turns"])
    again = ev.run_episodes(setting, policy, batch_size=3, log_every_s=1e9)  # greedy: batching-invariant text
    assert [t["response"] for e in again for t in e["turns"]] == [t["response"] for e in episodes for t in e["turns"]]


# ---- CLI end to end ----
def _cmd(*argv):
    return [sys.executable, "eval.py", *argv]


def _run(*argv):
    return subprocess.run(_cmd(*argv), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_cli_run_dir_curves_table_and_replay(tmp_path):
    run = tmp_path / "sft_tiny"
    run.mkdir()
    model, tok = ev.load_model("tiny", vl_task=False)
    for step in (1, 3):
        model.save_pretrained(run / f"step_{step}")
        tok.save_pretrained(run / f"step_{step}")
        (run / f"step_{step}" / "trainer_state.json").write_text(_state(step, step * 1e9))
    out = tmp_path / "out"
    r = _run("--run-dir", str(run), "--init-path", "tiny", "--task", "gp-l", "--gp-num-episodes", "3",
             "--gp-verify-iter", "2", "--max-new-tokens", "3", "--settings", "rule-ood", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "episodes/s" in r.stdout and "ETA" in r.stdout
    assert (out / "curves_gp-l.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert "sft_tiny/step_3" in table and "init" in table and "Paired comparisons" in table
    assert "success@turn-k" in table
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 1 * 3  # checkpoints x settings x episodes
    rec = json.loads(lines[0])
    assert {"seed", "instance_id", "turns", "checkpoint"} <= set(rec)
    assert {"messages", "response", "reward", "verify_info"} <= set(rec["turns"][0])
    results = json.loads((out / "results.json").read_text())
    assert results["sampling"]["do_sample"] is False and results["sampling"]["top_k"] == 0
    assert {c["flops"] for c in results["checkpoints"]} == {0.0, 1e9, 3e9}
    assert (out / "results.csv").read_text().startswith("task,setting,metric,checkpoint,k,n,rate")
    assert ev.replay(str(out / "episodes.jsonl")) == 0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model_path=["/nonexistent/ckpt"]), "not found"),
    (dict(model_path=["tiny"], task="gp-xl"), "unknown --task"),
    (dict(model_path=["smollm2"], task="gp-vl"), "text-only"),
    (dict(model_path=["tiny-lm"], task="gp-vl"), "text-only"),
    (dict(model_path=["tiny"], settings=["od"]), "unknown --settings"),
    (dict(model_path=["tiny"], settings=["visual-ood"], task="gp-l"), "selects nothing"),
    (dict(), "nothing to evaluate"),
    (dict(run_dir=["/nonexistent/run"]), "not a directory"),
])
def test_bad_input_one_clear_message(kwargs, needle):
    with pytest.raises(SystemExit) as e:
        ev.resolve_request(ev.Args(**kwargs))
    message = str(e.value)
    assert ": error: " in message and needle in message and "\n" not in message  # "eval.py: error:" from the CLI


def test_bad_input_text_model_for_vl_task_from_a_saved_checkpoint(tmp_path):
    model, tok = ev.load_model("tiny", vl_task=False)
    model.save_pretrained(tmp_path / "text")
    tok.save_pretrained(tmp_path / "text")
    with pytest.raises(SystemExit, match="text-only model but task gp-vl needs images"):
        ev.resolve_request(ev.Args(model_path=[str(tmp_path / "text")], task="gp-vl"))


def test_cli_bad_input_exits_with_one_line():
    r = _run("--model-path", "/nonexistent/ckpt", "--task", "gp-l")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["eval.py: error: checkpoint '/nonexistent/ckpt' not found (expected a "
                                             "directory with config.json, or smollm2 | smolvlm | tiny)"]


def test_args_first_block_is_the_shared_vocabulary():
    """exp_name, task, model_path, seed, dtype first, in this order (CONTEXT: the one vocabulary of every script)."""
    names = list(ev.Args.__dataclass_fields__)
    assert names[:5] == ["exp_name", "task", "model_path", "seed", "dtype"]
    args = ev.Args()
    assert (args.exp_name, args.seed, args.dtype, args.model_path) == ("eval", 42, "float32", [])


def test_prepared_names_are_checked_without_building_them():
    assert all(ev.checkpoint_exists(name) for name in ("tiny", "smollm2", "smolvlm", "tiny-lm", "tiny-vl"))
    assert [ev.checkpoint_is_vl(name) for name in ("tiny", "smolvlm", "tiny-vl", "smollm2", "tiny-lm")] == \
        [True, True, True, False, False]


def test_kv_reuse_gives_the_greedy_answers_of_a_plain_batch_with_refills():
    """eval.py's PrefixCache (detail #13) across turns and across episodes that join the batch as others finish."""
    model, tok = ev.load_model("tiny", vl_task=False)
    setting = ev.Setting("gp-l", "id", dict(treat_face_cards_as_10=True, ood=False, language_only=True,
                                            face_cards_color="mixed", split="all", verify_iter=2), 5, 3)
    answers = {}
    for kv_reuse, chunk in ((False, 0), (True, 64), (True, 5)):  # chunk 5: answers continue over 3 calls
        policy = ev.ModelPolicy(model, tok, 12, 0.0, 1.0, 0, "cpu", kv_reuse=kv_reuse, chunk=chunk)
        episodes = ev.run_episodes(setting, policy, batch_size=2, log_every_s=1e9)
        answers[kv_reuse, chunk] = [[t["response"] for t in e["turns"]] for e in episodes]
        if kv_reuse:
            assert policy.prefix_cache.entries  # it kept the KV of the last turn's sequences
    assert answers[True, 64] == answers[False, 0] == answers[True, 5]
    assert sum(len(a) for a in answers[False, 0]) == 5 * 3


# ---- issue 15: an env error ends one episode, never the evaluation; labels that cannot collide ----
def test_env_error_is_a_failed_step_and_replays(monkeypatch, tmp_path):
    """A step that raises (e.g. RecursionError on a deeply nested formula, before the iterative verifier) is recorded
    as a failed step: lowest reward, outcome ENV_ERROR, the response kept; its episode ends, the others go on."""
    import envs
    original = envs.GeneralPointsEnv.step

    def step(self, response_text):
        if response_text == "BOOM":
            raise RecursionError("maximum recursion depth exceeded")
        return original(self, response_text)

    monkeypatch.setattr(envs.GeneralPointsEnv, "step", step)
    setting = ev.Setting("gp-l", "id", dict(verify_iter=2, language_only=True, treat_face_cards_as_10=True,
                                             ood=False), num_episodes=4, seed=0)
    calls = []

    def policy(batch):  # the first conversation of the second call gets the answer that breaks the env, once
        calls.append(len(batch))
        return ["BOOM" if len(calls) == 2 and i == 0 else "no idea" for i in range(len(batch))]

    episodes = ev.run_episodes(setting, policy, batch_size=2, log_every_s=1e9)
    broken = [e for e in episodes if any(t["outcome"] == "ENV_ERROR" for t in e["turns"])]
    assert len(broken) == 1 and broken[0]["num_steps"] == 2 and not broken[0]["success"]
    last = broken[0]["turns"][-1]
    assert (last["response"], last["reward"], last["is_correct"]) == ("BOOM", -3.0, False)
    assert last["verify_info"] == "RecursionError: maximum recursion depth exceeded" and last["truncated"]
    assert [e["num_steps"] for e in episodes if e is not broken[0]] == [3, 3, 3]  # 2 verified + the forced call
    m = ev.metrics_of(setting, episodes)
    assert m["env errors"] == (1, 4) and m["success"] == (0, 4)
    assert "env errors" not in ev.metrics_of(setting, [e for e in episodes if e is not broken[0]])
    assert ev.lowest_reward("virl") == -1.5  # the PPO rollouts use the same rewards
    jsonl = tmp_path / "episodes.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    assert ev.replay(str(jsonl)) == 0  # the same answer breaks the env again: the same failed step
    monkeypatch.setattr(envs.GeneralPointsEnv, "step", original)
    assert ev.replay(str(jsonl)) == 1  # a fixed env scores the logged answer: the replay shows what moved


def test_labels_cannot_collide(tmp_path):
    model, tok = ev.load_model("tiny", vl_task=False)
    for d in ("sft/final", "ppo/final", "x/run/step_1", "y/run/step_1", "z/init"):
        model.save_pretrained(tmp_path / d)
        tok.save_pretrained(tmp_path / d)
    a, b = str(tmp_path / "sft" / "final"), str(tmp_path / "ppo" / "final")
    _, ckpts = ev.resolve_request(ev.Args(model_path=[a, b, a + "/", "tiny"]))
    assert [c["label"] for c in ckpts] == ["sft/final", "ppo/final", "sft/final#2", "tiny"]
    _, ckpts = ev.resolve_request(ev.Args(model_path=[a], run_dir=[str(tmp_path / "x/run"), str(tmp_path / "y/run")],
                                          init_path="tiny"))
    assert [(c["label"], c["arm"]) for c in ckpts] == [("final", None), ("init", None),
                                                       ("x/run/step_1", "x/run"), ("y/run/step_1", "y/run")]
    assert ev.distinct_names(["a/b/c", "d/b/c", "e/x/c"]) == ["a/b/c", "d/b/c", "x/c"]
    with pytest.raises(SystemExit, match="share the column label 'init'"):
        ev.resolve_request(ev.Args(model_path=[str(tmp_path / "z/init")], init_path="tiny"))
    with pytest.raises(SystemExit, match="--label 'same' is given twice"):
        ev.resolve_request(ev.Args(model_path=[a, b], label=["same", "same"]))


def test_default_output_dir_gets_a_free_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev.time, "time", lambda: 1700000000.0)
    args = ev.Args(task="gp-l")
    made = [ev.make_output_dir(args) for _ in range(3)]
    assert made == ["runs/eval__gp-l__1700000000", "runs/eval__gp-l__1700000000__2", "runs/eval__gp-l__1700000000__3"]
    (tmp_path / made[0] / "table.md").write_text("earlier results")
    with pytest.raises(SystemExit, match="already holds results"):
        ev.make_output_dir(ev.Args(output_dir=made[0]))
    assert ev.make_output_dir(ev.Args(output_dir=made[1])) == made[1]  # an existing empty directory is fine
    assert ev.make_output_dir(ev.Args(output_dir=made[0], overwrite=True)) == made[0]
    assert (tmp_path / made[0] / "table.md").read_text() == "earlier results"
