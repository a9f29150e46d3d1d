"""The paper's evaluation protocol (protocol.md §3, §6) on one or more checkpoints, plus the statistics it lacks.
Leaves out training, model building (make_models.py), loading (common.py) and the statistics and tables (report.py).
Details, departures from the official evaluator, measured numbers: docs/eval.md (`# detail #N` = its list).

    python eval.py --model-path runs/sft_gp-l/final --task gp-l             # GP-L: 234 episodes x ID / rule-OOD
    python eval.py --model-path smollm2 --model-path runs/ppo/final --task gp-l   # two columns + paired test
    python eval.py --model-path smolvlm --task gp-vl                        # ID / rule-OOD / visual-OOD (red suits)
    python eval.py --model-path smolvlm --task gp-vl --settings describe-id   # card recognition alone (detail #19)
    python eval.py --model-path runs/virl/final --task virl-l               # 48 routes, per-step accuracy + success
    python eval.py --run-dir runs/sft_run --run-dir runs/ppo_run --task gp-l --init-path smollm2   # Fig. 5/6 curves
    python eval.py --replay runs/eval/.../episodes.jsonl                    # re-score every logged episode

Writes <output-dir>/{table.md, results.json, results.csv, episodes.jsonl[, curves_<task>.png]}.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Annotated, Callable, Literal, Optional

import torch
import tyro

from common import (PrefixCache, checkpoint_exists, checkpoint_is_vl, checkpoint_weights_problem, distinct_names, fail,
                    find_checkpoints, is_vl, load_model, new_run_dir, tokenizer_of, weights_finite)
from report import (MEANS, Z95, curve_points, mcnemar_exact, minimum_detectable_effect, paired_bootstrap, plot_curves,
                    read_episodes, resume_episodes, rows_of, write_jsonl, write_report)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    task: str = "gp-l"
    """gp-l | gp-vl | virl-l | virl-vl | all"""
    model_path: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """checkpoint(s) to evaluate, one table column each: a save_pretrained directory, `smollm2`, `smolvlm` or `tiny`"""
    seed: int = 42
    """seed of the experiment (the official seed)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the model weights (fp32 on CPU: bf16 is slower there, offline-models.md addendum)"""

    label: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """optional column names for --model-path, in the same order (default: the directory name)"""
    settings: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """run only these settings (id, id-unseen, rule-ood, visual-ood, recog-id, recog-rule-ood, recog-visual-ood,
    describe-id, describe-visual-ood); empty = all"""
    run_dir: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """training run(s) whose saved checkpoints (every subdirectory with a config.json) are evaluated and plotted"""
    init_path: Optional[str] = None
    """with --run-dir: the shared initial checkpoint, evaluated once and drawn at FLOPs = 0 on every curve"""
    output_dir: Optional[str] = None
    """where the table, JSON/CSV, JSONL and PNGs go (default runs/<exp-name>__<task>__<time>, with a free __k suffix
    if it exists); an existing non-empty directory is refused unless --overwrite"""
    overwrite: bool = False
    """write into an existing non-empty --output-dir (its table, results and episodes files are replaced)"""
    replay: Optional[str] = None
    """re-score the episodes of an episodes.jsonl in fresh environments (no model), then exit"""

    # GeneralPoints settings (protocol.md §6.3)
    gp_num_episodes: int = 234
    """episodes per GP setting"""
    gp_seed: int = 42
    """GP evaluation seed (episode i uses the i-th seed drawn from random.Random(gp_seed))"""
    gp_verify_iter: int = 5
    """GP verification budget: verified answers per episode (plus the forced unverified extra turn)"""
    gp_target_points: int = 24
    """GP target number"""
    gp_split: str = "all"
    """GP hands: all | seen (training hands) | unseen (held-out hands); ID is always also reported by info['seen']"""
    gp_image_size: Optional[int] = None
    """GP-VL rendered image size (None = the official 1200x1200; the processor resizes anyway)"""
    describe: bool = True
    """VL tasks: also the recognition probe (describe-id, describe-visual-ood): each checkpoint describes held-out
    images (GP-VL hands; V-IRL-VL views of held-out routes that pass a landmark, per city skin), scored against what
    they show (detail #19)"""
    virl_describe_views: int = 144
    """V-IRL-VL views per describe-* setting (visual OOD: spread evenly over the 8 other city skins)"""
    separate_recognition_runs: bool = False
    """run the official single-turn recognition runs (verify_iter 1) instead of reading the first answers"""

    # V-IRL settings (protocol.md §6.3)
    virl_num_episodes: int = 48
    """routes per V-IRL ID / rule-OOD setting"""
    virl_seed: int = 12
    """V-IRL evaluation seed"""
    virl_verify_iter: int = 2
    """V-IRL verification budget per rail point"""
    virl_visual_ood_routes: int = 18
    """visual-OOD routes, run in fixed order (route_idx 0..k-1)"""
    virl_data_dir: Optional[str] = None
    """official nyc_1k_routes folder (route_infos.json, gps_pano_mapping.pkl, street_views/) for ID / rule-OOD
    (default: the env's generated offline city)"""
    virl_visual_ood_dir: Optional[str] = None
    """official VLN_mini folder (same layout) for visual-OOD (default: the env's generated `vln_mini` world, 9 skins)"""
    virl_resolution: Optional[int] = None
    """V-IRL-VL size of each of the 4 views (None = the official 1200, a 2405x2405 grid; the processor resizes)"""

    # Generation
    max_new_tokens: int = 256
    """new tokens per answer (official evaluation: 256)"""
    temperature: float = 0.0
    """0 = greedy; > 0 samples with this temperature"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off); only used when temperature > 0"""
    top_k: int = 0
    """top-k sampling (0 = off); only used when temperature > 0"""
    batch_size: int = 32
    """episodes generating together in one batched call per turn (left padding)"""
    kv_reuse: bool = True
    """text models: keep each episode's KV cache between turns and reuse the prompt prefix shared by episodes, so only
    new tokens are prefilled (detail #13); --no-kv-reuse re-encodes every conversation, as before"""
    gen_chunk: int = 64
    """with --kv-reuse: new tokens per generate() call; answers still unfinished continue in a smaller batch from
    their cache, so one long answer does not keep all the others decoding (0 = one call of max_new_tokens)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""

    # An API model (official evaluation/evaluator/api_evaluator.py, detail #15) and resuming
    api_base: Optional[str] = None
    """an OpenAI-compatible server (e.g. http://127.0.0.1:8080/v1) whose --api-model is evaluated as one more column
    `api:<model>`, next to any --model-path (paired tests included); the key comes from --api-key-env, never a flag"""
    api_model: Optional[str] = None
    """the model name the server serves (official default gpt-4o)"""
    api_key_env: str = "OPENAI_API_KEY"
    """the environment variable holding the API key (set it to any value for a server without keys)"""
    api_concurrency: int = 8
    """requests in flight at once (a thread pool over the --batch-size episodes of a turn)"""
    api_retries: int = 6
    """retries of a request after a transient error (connection error, timeout, HTTP 429, 5xx)"""
    api_backoff_s: float = 1.0
    """the first retry waits this long; each further retry twice as long (at most 60 s)"""
    api_timeout_s: float = 120.0
    """seconds before a request counts as timed out (a transient error)"""
    resume: bool = False
    """continue the interrupted run in --output-dir: episodes already in its episodes.jsonl are kept, not run again
    (a last line cut short is dropped); the rest are appended. Give the same command again"""

    # Statistics and reporting
    bootstrap_samples: int = 10000
    """paired bootstrap resamples for the difference between two checkpoints"""
    reference_column: bool = True
    """add the paper's own numbers (Init / RL / SFT, protocol.md §8) as a column"""
    log_every_s: float = 15.0
    """seconds between progress lines"""


TASKS = ("gp-l", "gp-vl", "virl-l", "virl-vl")
ALL_SETTINGS = ("id", "id-unseen", "rule-ood", "visual-ood", "recog-id", "recog-rule-ood", "recog-visual-ood",
                "describe-id", "describe-visual-ood")


# ---- Settings matrix (protocol.md §6.3) ----
@dataclass
class Setting:
    task: str  # gp-l | gp-vl | virl-l | virl-vl
    name: str  # id | rule-ood | visual-ood | recog-*
    env_kwargs: dict
    num_episodes: int
    seed: int
    max_turns: int = 300  # 300 = the gym TimeLimit; 1 = a single-turn recognition run (details #3, #4)
    route_order: bool = False  # V-IRL visual OOD: route_idx 0..n-1 instead of seeded random routes (detail #8)

    @property
    def family(self) -> str:
        return "gp" if self.task.startswith("gp") else "virl"

    @property
    def describe(self) -> bool:  # the recognition probe (detail #19)
        return self.name.startswith("describe-")

    def episode_seeds(self) -> list[int]:  # detail #2
        rng = random.Random(self.seed)
        return [rng.randrange(2 ** 31) for _ in range(self.num_episodes)]


def build_settings(args: Args, task: str) -> list[Setting]:  # detail #1
    vl = task.endswith("-vl")
    if task.startswith("gp"):
        base = dict(target_points=args.gp_target_points, verify_iter=args.gp_verify_iter, language_only=not vl,
                    face_cards_color="black" if vl else "mixed", split=args.gp_split)
        if vl and args.gp_image_size:
            base["image_size"] = args.gp_image_size
        id_rule, ood_rule = dict(treat_face_cards_as_10=True, ood=False), dict(treat_face_cards_as_10=False, ood=True)
        variants = {"id": id_rule, "rule-ood": ood_rule}
        if vl:
            variants["visual-ood"] = dict(id_rule, face_cards_color="red")
        out = [Setting(task, name, dict(base, **v), args.gp_num_episodes, args.gp_seed) for name, v in variants.items()]
        if args.separate_recognition_runs:  # detail #4
            out += [Setting(task, "recog-" + s.name, dict(s.env_kwargs, verify_iter=1), s.num_episodes, s.seed,
                            max_turns=1) for s in list(out)]
        if vl and args.describe:  # detail #19: held-out hands, black (ID) and red (visual OOD)
            image = {"image_size": args.gp_image_size} if args.gp_image_size else {}
            out += [Setting(task, f"describe-{name}", dict(face_cards_color=colour, split="unseen", **image),
                            args.gp_num_episodes, args.gp_seed, max_turns=1)
                    for name, colour in (("id", "black"), ("visual-ood", "red"))]
    else:
        base = dict(verify_iter=args.virl_verify_iter, language_only=not vl)
        if vl and args.virl_resolution:
            base.update(resolution=args.virl_resolution, crop_size=None)
        routes = virl_data_kwargs(args.virl_data_dir) if args.virl_data_dir else {}
        out = [Setting(task, "id", dict(base, **routes, absolute_action=True), args.virl_num_episodes, args.virl_seed),
               Setting(task, "rule-ood", dict(base, **routes, absolute_action=False), args.virl_num_episodes,
                       args.virl_seed)]
        if not args.virl_data_dir:  # unseen ID instances: the generated city's held-out routes (detail #7)
            out.insert(1, Setting(task, "id-unseen", dict(base, absolute_action=True, split="heldout"),
                                  args.virl_num_episodes, args.virl_seed))
        if vl:
            visual = dict(base, absolute_action=True, order=True)
            visual.update(virl_data_kwargs(args.virl_visual_ood_dir) if args.virl_visual_ood_dir
                          else dict(world="vln_mini"))
            out.append(Setting(task, "visual-ood", visual, args.virl_visual_ood_routes, args.virl_seed,
                               route_order=True))
        if vl and args.describe:  # detail #19: held-out routes of the training city and of the 8 other skins
            from envs import VIRL_VLN_MINI_SKINS
            views = {k: base[k] for k in ("resolution", "crop_size") if k in base}
            out += [Setting(task, f"describe-{name}", dict(views, worlds=worlds), args.virl_describe_views,
                            args.virl_seed, max_turns=1)
                    for name, worlds in (("id", ["nyc"]), ("visual-ood", [w for w in VIRL_VLN_MINI_SKINS
                                                                          if w != "nyc"]))]
    if args.settings:
        out = [s for s in out if s.name in args.settings]
    return out


def virl_data_kwargs(folder: str) -> dict:
    """An official V-IRL data folder -> NavigationEnv keyword arguments (detail #8)."""
    return dict(route_info_path=os.path.join(folder, "route_infos.json"),
                gps_to_pano_path=os.path.join(folder, "gps_pano_mapping.pkl"),
                panorama_dir=os.path.join(folder, "street_views"))


def make_env(setting: Setting):
    """One GeneralPoints or V-IRL environment for a setting (the recognition probe's for describe-*)."""
    from envs import DescribeEnv, GeneralPointsEnv, NavigationEnv
    if setting.describe:
        return DescribeEnv(setting.family, **setting.env_kwargs)
    return (GeneralPointsEnv if setting.family == "gp" else NavigationEnv)(**setting.env_kwargs)


# ---- Episode loop: a policy is any callable  list[(messages, image)] -> list[str] ----
Policy = Callable[[list], list]


def run_episodes(setting: Setting, policy: Policy, batch_size: int = 32, env_factory=make_env, label: str = "",
                 log_every_s: float = 15.0, on_episode=None, done: Optional[dict] = None) -> list[dict]:
    """Runs setting.num_episodes episodes, up to batch_size at a time; every turn all active episodes are answered
    by ONE policy call. A finished episode is replaced by the next one at once (continuous batching, detail #9).
    on_episode(record) is called as each episode finishes (eval.py streams them to the JSONL); done = {episode index:
    record} of episodes finished before (--resume), returned as they are and not run again."""
    seeds, done = setting.episode_seeds(), done or {}
    queue, active, free_envs = [i for i in range(setting.num_episodes) if i not in done], [], []
    records = [done.get(i) for i in range(setting.num_episodes)]
    t0 = last_log = time.time()
    num_generations = 0
    while queue or active:
        while queue and len(active) < batch_size:  # refill the batch
            i = queue.pop(0)
            env = free_envs.pop() if free_envs else env_factory(setting)
            reset_kwargs = {"seed": seeds[i]}
            if setting.route_order or setting.describe:  # describe: episode i views world i mod the worlds
                reset_kwargs["options"] = {"route_idx" if setting.route_order else "index": i}
            obs, info = env.reset(**reset_kwargs)
            record = dict(task=setting.task, setting=setting.name, episode=i, seed=seeds[i],
                          options=reset_kwargs.get("options"), env_kwargs=setting.env_kwargs,
                          instance_id=info.get("instance_id"), seen=info.get("seen"), cards=info.get("cards"),
                          route_idx=info.get("route_idx"), turns=[])
            active.append([env, obs, record])
        responses = policy([(obs["messages"], obs.get("image")) for _, obs, _ in active])
        assert len(responses) == len(active), "the policy must return one response per conversation"
        num_generations += len(active)
        still_active = []
        for (env, obs, record), response in zip(active, responses):
            try:
                next_obs, reward, terminated, truncated, info = env.step(response)
            except Exception as e:  # noqa: BLE001  it ends this episode as a failed step, not the run (detail #14)
                next_obs, reward, terminated, truncated, info = None, lowest_reward(setting.family), False, True, \
                    dict(outcome="ENV_ERROR", verify_info=f"{type(e).__name__}: {str(e)[:300]}", is_correct=False)
                print(f"[{label}{setting.task}/{setting.name}] episode {record['episode']} (seed {record['seed']}): "
                      f"env.step raised {info['verify_info'][:200]!r}; recorded as a failed step (outcome "
                      "ENV_ERROR, the response is in the JSONL for --replay)", flush=True)
                env = None  # in an unknown state: never reused
            record["turns"].append(dict(messages=obs["messages"], response=response, reward=float(reward),
                                        outcome=info.get("outcome"), verify_info=info.get("verify_info"),
                                        cards_correct=info.get("cards_correct"), is_correct=info.get("is_correct"),
                                        is_success=bool(info.get("is_success", False)),
                                        terminated=bool(terminated), truncated=bool(truncated),
                                        **{k: info[k] for k in ("card_hits", "suits_correct", "world", "landmark")
                                           if k in info}))
            if terminated or truncated or len(record["turns"]) >= setting.max_turns:
                records[record["episode"]] = finish_episode(setting, record)
                if on_episode is not None:
                    on_episode(record)
                if env is not None:
                    free_envs.append(env)
            else:
                still_active.append([env, next_obs, record])
        active = still_active
        done = setting.num_episodes - len(queue) - len(active)
        if time.time() - last_log >= log_every_s or not (queue or active):
            last_log = time.time()
            elapsed = last_log - t0
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f"{(setting.num_episodes - done) / rate:.0f}s" if rate > 0 else "? (no episode finished yet)"
            print(f"[{label}{setting.task}/{setting.name}] {done}/{setting.num_episodes} episodes, {len(active)} "
                  f"active, {rate:.3f} episodes/s, {num_generations / elapsed:.3f} answers/s, elapsed {elapsed:.0f}s, "
                  f"ETA {eta}", flush=True)
    return records


def lowest_reward(family: str) -> float:
    """The reward of a step whose env.step raised (outcome ENV_ERROR): the lowest reward the verifier gives (GP -3
    ILLEGAL_FORMULA, V-IRL -1.5 INCORRECT_OBS, as in the PPO rollouts): a broken answer never beats a wrong one."""
    from envs import REWARD_FN, REWARD_FN_VIRL
    return float(min(REWARD_FN.values()) if family == "gp" else REWARD_FN_VIRL["INCORRECT_OBS"])


def finish_episode(setting: Setting, record: dict) -> dict:
    """Per-episode numbers that every metric is built from."""
    turns = record["turns"]
    correct_reward = 5.0 if setting.family == "gp" else 1.0  # GP CORRECT_SOLUTION, V-IRL CORRECT_ACTION (detail #5)
    record["success"] = bool(turns[-1]["is_success"] or (setting.family == "gp" and turns[-1]["reward"] >= 5.0))
    # 1-based index of the answer that solved the episode (GP): success@k = success_turn <= k
    record["success_turn"] = next((t + 1 for t, x in enumerate(turns) if x["reward"] >= correct_reward), None) \
        if setting.family == "gp" and record["success"] else None
    record["num_steps"] = len(turns)  # every retry and the forced budget-exhausted call count as steps (detail #6)
    record["num_correct_steps"] = sum(x["is_correct"] if x.get("is_correct") is not None
                                      else x["reward"] >= correct_reward for x in turns)
    record["first_cards_correct"] = turns[0]["cards_correct"]
    record["reward"] = sum(x["reward"] for x in turns)  # the episode's return
    # probes (envs.py) as [numerator, denominator]: GP of the first answer (the prompt alone, no feedback yet), V-IRL
    # summed over the verified steps (detail #17)
    from envs import gp_probes, virl_probes
    kw = setting.env_kwargs
    if setting.describe:  # the recognition probe's scores (detail #19)
        t = turns[0]
        record["probes"] = ({"whole hand": [float(t["is_correct"]), 1], "per card": [float(t["card_hits"]), 4],
                             "whole hand with suits": [float(t["suits_correct"]), 1]} if setting.family == "gp" else
                            {f"landmark named ({w})": [float(t["is_correct"]), 1] if w == t["world"] else [0.0, 0]
                             for w in kw["worlds"]} | {"landmark named": [float(t["is_correct"]), 1]})
    elif setting.family == "gp":
        probes = gp_probes(turns[0]["response"], record["cards"], kw.get("target_points", 24),
                           kw.get("treat_face_cards_as_10", True))
        record["probes"] = {k: [0.0, 0] if v is None else [float(v), 1] for k, v in probes.items()}
        if setting.task == "gp-vl":  # per-card recognition: cards of the "cards" field at their position
            from envs import re_match, robust_str_to_list
            named = robust_str_to_list(re_match(turns[0]["response"], "cards"))
            record["probes"]["cards_recognized"] = [float(sum(a == b for a, b in zip(named, record["cards"]))), 4]
    else:
        probes = [virl_probes(x["response"], "", kw.get("absolute_action", True)) for x in turns
                  if x.get("outcome") != "STEP_LIMIT"]
        record["probes"] = {k: [float(sum(p[k] for p in probes)), len(probes)]
                            for k in ("action_in_stated_space", "action_in_other_space")}
    return record


# ---- Metrics: every rate is (k, n) so Wilson intervals and pooling stay exact ----
def metrics_of(setting: Setting, episodes: list[dict]) -> dict[str, tuple[int, int]]:
    n = len(episodes)
    out = {}
    if setting.family == "virl":
        out["per-step accuracy"] = (sum(e["num_correct_steps"] for e in episodes),
                                    sum(e["num_steps"] for e in episodes))
    out["success"] = (sum(e["success"] for e in episodes), n)
    if setting.name == "id" and any(e["seen"] is not None for e in episodes):
        for flag, name in ((True, "seen"), (False, "unseen")):
            sub = [e for e in episodes if e["seen"] is flag]
            if not sub:  # e.g. --gp-split seen
                continue
            out[f"success ({name} instances)"] = (sum(e["success"] for e in sub), len(sub))
            if setting.family == "virl":
                out[f"per-step accuracy ({name} instances)"] = (sum(e["num_correct_steps"] for e in sub),
                                                                sum(e["num_steps"] for e in sub))
    if setting.family == "gp":
        if setting.max_turns > 1:
            verify_iter = setting.env_kwargs["verify_iter"]
            for k in range(1, verify_iter + 1):
                out[f"success@turn-{k}"] = (sum(e["success_turn"] is not None and e["success_turn"] <= k
                                                for e in episodes), n)
        judged = [e["first_cards_correct"] for e in episodes if e["first_cards_correct"] is not None]
        if judged and setting.task.endswith("-vl") and not setting.describe:  # recognition accuracy (protocol.md
            out["recognition"] = (sum(judged), len(judged))  # §3): the first answer's "cards" field equals the hand
    env_errors = sum(any(t.get("outcome") == "ENV_ERROR" for t in e["turns"]) for e in episodes)
    if env_errors:  # episodes ended by an env.step that raised (only shown when there are any)
        out["env errors"] = (env_errors, n)
    for name, (num, den) in measures_of(episodes).items() if episodes else ():
        if ": " in name and name not in MEANS:  # the probes' rates
            out[name] = (int(sum(num)), int(sum(den)))
    from envs import GP_OUTCOMES, VIRL_OUTCOMES
    answers = [t.get("outcome") for e in episodes for t in e["turns"]]
    # the verifier's outcome distribution (none for the recognition probe)
    for outcome in () if setting.describe else GP_OUTCOMES if setting.family == "gp" else VIRL_OUTCOMES:
        out[f"answers: {outcome}"] = (answers.count(outcome), len(answers))
    return out


def measures_of(episodes: list[dict]) -> dict[str, tuple[list, list]]:
    """Per-episode (numerators, denominators) of every measure the paired comparisons test; a measure's value is
    sum(num) / sum(den) (den 0: not measurable in that episode). Rates, and the MEANS."""
    gp, ones = episodes[0]["task"].startswith("gp"), [1] * len(episodes)
    out = {"success": ([float(e["success"]) for e in episodes], ones)}
    if not gp:
        out["per-step accuracy"] = ([e["num_correct_steps"] for e in episodes], [e["num_steps"] for e in episodes])
    rewards = [e["reward"] for e in episodes]
    out |= {"reward / episode": (rewards, ones), "reward / answer": (rewards, [e["num_steps"] for e in episodes])}
    describe = episodes[0].get("setting", "").startswith("describe-")
    prefix = "recognition: " if describe else "first answer: " if gp else "steps: "
    for key in episodes[0]["probes"]:
        out[prefix + key.replace("_", " ")] = \
            tuple([e["probes"][key][i] for e in episodes] for i in (0, 1))
    return out


def means_of(episodes: list[dict], samples: int = 10000, seed: int = 0) -> dict[str, list]:
    """name -> [mean, bootstrap 95 % interval (episodes resampled), episodes measured] of each of the MEANS."""
    return {name: [*(paired_bootstrap(None, None, num, den, samples, seed) if sum(den) else [math.nan] * 3),
                   sum(d > 0 for d in den)]
            for name, (num, den) in measures_of(episodes).items() if name in MEANS}


def chat_inputs(processor, conversations: list, images: Optional[list] = None, add_generation_prompt: bool = True,
                padding_side: str = "left"):
    """Chat messages (+ one PIL image for the first user message) -> padded model inputs via the chat template.

    conversations: list of message lists with string contents; images: one PIL image per conversation (VL) or None.
    Returns a BatchEncoding with input_ids (B, T), attention_mask (B, T) [+ pixel_values (B, 1, 3, H, W) and
    pixel_attention_mask for VL]. Left padding for generate(); the template already holds every special token.
    """
    if images is not None and not is_vl(processor):
        raise ValueError("this task has images but the model is text-only; use an image-text-to-text model")
    texts = []
    for i, messages in enumerate(conversations):
        messages = [dict(m) for m in messages]
        if images is not None:  # the image goes before the text of the first user message
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = [{"type": "image"}, {"type": "text", "text": first["content"]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt))
    tok = tokenizer_of(processor)
    tok.padding_side = padding_side
    if images is not None:
        return processor(text=texts, images=[[im] for im in images], padding=True, add_special_tokens=False,
                         return_tensors="pt")
    return tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")


class ModelPolicy:
    """The model-backed policy: chat template -> batched generate() -> decoded answers. Text models reuse the KV cache
    of the conversation so far and of the prompt prefix shared by all episodes, and generate `chunk` tokens at a time
    so that one long answer does not hold the whole batch (detail #13)."""

    def __init__(self, model, processor, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 device: str, kv_reuse: bool = True, chunk: int = 64):
        self.model, self.processor, self.device = model.eval(), processor, device
        self.gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, return_dict_in_generate=True)
        if temperature > 0:
            self.gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # explicit, so the checkpoint's generation_config cannot switch sampling on (detail #10)
            self.gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        self.prefix_cache = PrefixCache(model, chunk) if kv_reuse and not is_vl(processor) else None

    @torch.no_grad()
    def __call__(self, batch: list) -> list:
        images = [image for _, image in batch]
        tok = tokenizer_of(self.processor)
        if self.prefix_cache is not None and images[0] is None:
            texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m, _ in batch]
            prompts = tok(texts, add_special_tokens=False)["input_ids"]
            out, width = self.prefix_cache.generate(prompts, tok.pad_token_id, tok.eos_token_id, self.device,
                                                    **self.gen_kwargs)  # in chunks (detail #13)
            answers = []
            for ids in out.sequences[:, width:].tolist():
                answers.append(ids[:ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids)
            return tok.batch_decode(answers, skip_special_tokens=True)
        inputs = chat_inputs(self.processor, [messages for messages, _ in batch],
                             images if images[0] is not None else None).to(self.device)
        out = self.model.generate(**inputs, **self.gen_kwargs)
        return tok.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class ApiPolicy:
    """An OpenAI-compatible server as the policy (official api_evaluator.py, detail #15): one chat.completions request
    per conversation, at most --api-concurrency at a time; for VL the image goes as a base64 JPEG `image_url` part
    before the text of the first user message. Connection errors, timeouts, 429 and 5xx are retried with exponential
    back-off; a rejected key (401/403), any other error or a transient one that outlasts the retries ends the run in
    one line (what finished is in episodes.jsonl: the same command with --resume goes on from there)."""

    def __init__(self, args: Args):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import openai
        self.openai, self.args, self.key = openai, args, os.environ[args.api_key_env]
        self.client = openai.OpenAI(base_url=args.api_base, api_key=self.key, max_retries=0, timeout=args.api_timeout_s)
        self.sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature)  # detail #15
        if args.temperature > 0:
            self.sampling["top_p"] = args.top_p
        self.pool, self.stopped = ThreadPoolExecutor(args.api_concurrency), threading.Event()

    @staticmethod
    def payload(messages: list, image) -> list:
        messages = [dict(m) for m in messages]
        if image is not None:
            import base64
            import io
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG")
            first = next(m for m in messages if m["role"] == "user")
            url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            first["content"] = [{"type": "image_url", "image_url": {"url": url}},
                                {"type": "text", "text": first["content"]}]
        return messages

    def ask(self, messages: list, image) -> str:
        o, where = self.openai, f"--api-base {self.args.api_base} --api-model {self.args.api_model}"
        for attempt in range(self.args.api_retries + 1):
            try:
                out = self.client.chat.completions.create(model=self.args.api_model,
                                                          messages=self.payload(messages, image), **self.sampling)
                return out.choices[0].message.content or ""
            except (o.AuthenticationError, o.PermissionDeniedError) as e:
                fail(f"{where}: HTTP {e.status_code}, the server rejects the API key in ${self.args.api_key_env}")
            except (o.APIConnectionError, o.RateLimitError, o.InternalServerError) as e:
                error = f"{type(e).__name__}: {e}".replace(self.key, "***")[:300]
                if attempt == self.args.api_retries:
                    fail(f"{where}: {error} (gave up after {attempt + 1} tries); the finished episodes are in "
                         "episodes.jsonl: run the same command with --resume (and --output-dir) to go on")
                if self.stopped.wait(min(60.0, self.args.api_backoff_s * 2 ** attempt)):
                    return ""  # another request already ended the run
            except o.APIError as e:
                fail(f"{where}: {type(e).__name__}: {e}".replace(self.key, "***")[:400])

    def __call__(self, batch: list) -> list:
        futures = [self.pool.submit(self.ask, messages, image) for messages, image in batch]
        try:
            return [f.result() for f in futures]
        except BaseException:  # the first error (or Ctrl-C) ends every request still waiting
            self.stopped.set()
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise


def paired_comparisons(results: list[dict], episodes: dict, pairs: list[tuple], args: Args) -> list[dict]:
    """Checkpoint B against checkpoint A for each (A, B) in pairs, per setting, on identical instances (same seeds),
    for every measure of measures_of: paired bootstrap interval of B - A; exact McNemar where the measure is yes/no
    per episode (on the episodes measured for both); for success the exact-power MDE, paired (background = the
    observed discordance against the effect, min(b, c) / n) and unpaired (base = the lower observed rate); for the
    mean reward per episode a normal-approximation MDE from the bootstrap spread, (z_0.975 + z_0.8) * SD."""
    out = []
    for (label_a, label_b), (task, setting) in ((p, ts) for p in pairs
                                                for ts in dict.fromkeys((r["task"], r["setting"]) for r in results)):
        if (label_a, task, setting) not in episodes or (label_b, task, setting) not in episodes:
            continue
        ep_a, ep_b = episodes[(label_a, task, setting)], episodes[(label_b, task, setting)]
        assert [e["seed"] for e in ep_a] == [e["seed"] for e in ep_b], "paired episodes must share their seeds"
        n, measures_a, measures_b = len(ep_a), measures_of(ep_a), measures_of(ep_b)
        for metric, ((num_a, den_a), (num_b, den_b)) in ((m, (measures_a[m], measures_b[m])) for m in measures_a):
            if not (sum(den_a) and sum(den_b)):  # not measured for one of the two (e.g. no parsable answer)
                continue
            diff, lo, hi = paired_bootstrap(num_a, den_a, num_b, den_b, args.bootstrap_samples, seed=args.seed)
            row = dict(task=task, setting=setting, a=label_a, b=label_b, n=n, metric=metric, difference=diff,
                       bootstrap_lo=lo, bootstrap_hi=hi)
            if metric not in MEANS and set(den_a) | set(den_b) <= {0, 1}:  # yes/no per episode
                both = [(x, y) for x, y, da, db in zip(num_a, num_b, den_a, den_b) if da and db]
                b, c = sum(x > y for x, y in both), sum(y > x for x, y in both)  # discordant pairs
                row.update(a_only=b, b_only=c, mcnemar_p=mcnemar_exact(b, c))
            if metric == "success":
                row.update(mde_paired=minimum_detectable_effect(n, min(b, c) / n),
                           mde_unpaired=minimum_detectable_effect(n, min(sum(num_a), sum(num_b)) / n, paired=False))
            if metric == "reward / episode":
                row["mde_normal"] = (Z95 + NormalDist().inv_cdf(0.8)) * (hi - lo) / (2 * Z95)
            out.append(row)
    return out


def replay(path: str) -> int:
    """Re-score logged episodes: fresh env, same reset arguments, the logged responses; counts reward mismatches.
    A step that raises is an ENV_ERROR step with the lowest reward, as in run_episodes (detail #14)."""
    mismatches = total = 0
    for n, rec in read_episodes(path, TASKS):
        setting = Setting(rec["task"], rec.get("setting", ""), rec["env_kwargs"], 1, 0)
        try:
            env = make_env(setting)
            reset_kwargs = {"seed": rec["seed"]}
            if rec.get("options"):
                reset_kwargs["options"] = rec["options"]
            _, info = env.reset(**reset_kwargs)
        except Exception as e:  # noqa: BLE001
            fail(f"--replay {path}: line {n}: cannot rebuild the environment ({type(e).__name__}: {str(e)[:200]})")
        same = info.get("instance_id") == rec.get("instance_id")
        for turn in rec["turns"]:
            try:
                _, reward, *_ = env.step(turn["response"])
                same &= float(reward) == turn["reward"] and turn.get("outcome") != "ENV_ERROR"
            except Exception:  # noqa: BLE001
                same &= turn.get("outcome") == "ENV_ERROR" and turn["reward"] == lowest_reward(setting.family)
                break
        mismatches += not same
        total += 1
    print(f"replayed {total} episodes from {path}: {mismatches} differ from the log")
    return mismatches


def resumed(done: dict, label: str, setting: Setting) -> dict:
    """{episode index: record} of the episodes of this checkpoint and setting already done (--resume), checked to be
    the episodes this command would run (same seed, same env kwargs)."""
    seeds, out = setting.episode_seeds(), {}
    for (lab, task, name, i), rec in done.items():
        if (lab, task, name) == (label, setting.task, setting.name):
            if not (isinstance(i, int) and 0 <= i < setting.num_episodes and rec.get("seed") == seeds[i]
                    and json.dumps(rec.get("env_kwargs"), sort_keys=True) == json.dumps(setting.env_kwargs,
                                                                                        sort_keys=True)):
                fail(f"--resume: episode {i} of {label} {task} {name} in episodes.jsonl was run with other settings "
                     "(episodes, seeds or env flags); give the original command, or choose a new --output-dir")
            try:  # the per-episode numbers are derived again from the logged turns (older files lack some)
                out[i] = finish_episode(setting, rec)
            except (KeyError, TypeError, IndexError, AttributeError) as e:
                fail(f"--resume: episode {i} of {label} {task} {name} in episodes.jsonl lacks a logged field "
                     f"({type(e).__name__}: {e}); choose a new --output-dir")
    return out


def check_args(args: Args):
    """The numeric flags, before anything is loaded or written."""
    for names, ok, rule in [
        (("gp_num_episodes", "virl_num_episodes", "virl_visual_ood_routes", "gp_verify_iter", "virl_verify_iter",
          "gp_target_points", "batch_size", "max_new_tokens", "bootstrap_samples", "gp_image_size", "virl_resolution",
          "api_concurrency"), lambda v: v >= 1, ">= 1"),
        (("top_k", "seed", "gen_chunk", "api_retries"), lambda v: v >= 0, ">= 0"),
        (("temperature",), lambda v: 0 <= v < math.inf, ">= 0 (0 = greedy)"),
        (("log_every_s", "api_backoff_s"), lambda v: 0 <= v < math.inf, ">= 0"),
        (("api_timeout_s",), lambda v: 0 < v < math.inf, "> 0"),
        (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
    ]:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                fail(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"unknown --device {args.device!r} (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here; use --device cpu")
    for flag, folder in (("--virl-data-dir", args.virl_data_dir), ("--virl-visual-ood-dir", args.virl_visual_ood_dir)):
        if folder:
            missing = [p for p in virl_data_kwargs(folder).values() if not os.path.exists(p)]
            if missing:
                fail(f"{flag} {folder}: {missing[0]} does not exist (expected the official layout: route_infos.json, "
                     "gps_pano_mapping.pkl, street_views/)")


def resolve_request(args: Args) -> tuple[list, list]:
    """Checks the command line before anything heavy is loaded (one clear error line, exit code 1) and returns
    (tasks, checkpoints); a checkpoint is dict(label, path, arm, step, flops), arm = the --run-dir it comes from."""
    if args.task not in TASKS + ("all",):
        fail(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}, all")
    tasks = list(TASKS) if args.task == "all" else [args.task]
    bad = [s for s in args.settings if s not in ALL_SETTINGS]
    if bad:
        fail(f"unknown --settings {bad}; choose from {', '.join(ALL_SETTINGS)}")
    if not any(build_settings(args, task) for task in tasks):
        fail(f"--settings {args.settings} selects nothing for --task {args.task}")
    if args.gp_split not in ("all", "seen", "unseen"):
        fail(f"unknown --gp-split {args.gp_split!r}; choose all, seen or unseen")
    if not args.model_path and not args.run_dir and not args.api_base:
        fail("nothing to evaluate: give --model-path CKPT (repeatable), --run-dir RUN and/or --api-base URL")
    if bool(args.api_base) != bool(args.api_model):
        fail("--api-base URL and --api-model NAME go together (the server and the model name it serves)")
    if args.api_base and not os.environ.get(args.api_key_env):
        fail(f"--api-base: no API key in the environment variable {args.api_key_env} (export it, any value for a "
             "server without keys, or name another variable with --api-key-env)")
    if args.resume and (not args.output_dir or args.overwrite):
        fail("--resume continues the run in --output-dir DIR (give the same command again); it excludes --overwrite")
    if args.label and len(args.label) != len(args.model_path):
        fail(f"{len(args.label)} --label for {len(args.model_path)} --model-path")
    twice = [x for i, x in enumerate(args.label) if x in args.label[:i]]
    if twice:
        fail(f"--label {twice[0]!r} is given twice; every column needs its own label")
    checkpoints = []  # dict(label, path, arm, step, flops)
    labels = args.label or distinct_names(args.model_path)
    for label, path in zip(labels, args.model_path):
        checkpoints.append(dict(label=label, path=path, arm=None, step=None, flops=None))
    if args.init_path:
        checkpoints.append(dict(label="init", path=args.init_path, arm=None, step=0.0, flops=0.0))
    for run, arm in zip(args.run_dir, distinct_names(args.run_dir)):
        for c in find_checkpoints(run):
            checkpoints.append(dict(label=f"{arm}/{c['name']}", path=c["path"], arm=arm, step=c["step"],
                                    flops=c["flops"]))
    if args.api_base:  # no local checks: the server is first asked during the first episode
        checkpoints.append(dict(label=f"api:{args.api_model}", path=args.api_base, arm=None, step=None, flops=None,
                                api_model=args.api_model))
    labels = [c["label"] for c in checkpoints]
    twice = [x for i, x in enumerate(labels) if x in labels[:i]]
    if twice:
        fail(f"two checkpoints would share the column label {twice[0]!r}; give each --model-path its own --label")
    local = [c for c in checkpoints if "api_model" not in c]
    for c in local:
        if not checkpoint_exists(c["path"]):
            fail(f"checkpoint {c['path']!r} not found (expected a directory with config.json, "
                 "or smollm2 | smolvlm | tiny)")
        vl_tasks = [t for t in tasks if t.endswith("-vl")]
        if vl_tasks and not checkpoint_is_vl(c["path"]):
            fail(f"checkpoint {c['path']!r} is a text-only model but task {vl_tasks[0]} needs images; "
                 "use an image-text-to-text checkpoint (e.g. smolvlm, tiny, or a VL sft.py/ppo run)")
    for c in local:  # reads every weight file once (about 2 s for 135M parameters): nothing is written yet
        problem = checkpoint_weights_problem(c["path"])
        if problem:
            fail(f"checkpoint {c['path']!r}: {problem}; refusing to evaluate it")
    return tasks, checkpoints


def make_output_dir(args: Args) -> str:
    """The last check and the first write: --output-dir must be new or empty (or --overwrite); the default name gets
    a free __k suffix (created atomically, so two evaluations started in the same second never share it)."""
    if args.output_dir:
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            fail(f"--output-dir {args.output_dir} is a file")
        if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not (args.overwrite or args.resume):
            fail(f"--output-dir {args.output_dir} already holds results; choose a new directory, or pass --overwrite "
                 "to replace them")
        os.makedirs(args.output_dir, exist_ok=True)
        return args.output_dir
    return new_run_dir(f"{args.exp_name}__{args.task}__{int(time.time())}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.replay:
        sys.exit(1 if replay(args.replay) else 0)

    # TRY NOT TO MODIFY: validate the request before loading anything or writing a file
    tasks, checkpoints = resolve_request(args)
    labels = list(dict.fromkeys(c["label"] for c in checkpoints))
    output_dir = make_output_dir(args)
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens)
    print(f"eval: tasks {tasks}, {len(checkpoints)} checkpoint(s), sampling {sampling}, output {output_dir}",
          flush=True)

    # ALGO LOGIC: every checkpoint x task x setting, episodes logged as they finish
    t_start = time.time()
    results, episodes = [], {}
    done = resume_episodes(os.path.join(output_dir, "episodes.jsonl")) if args.resume else {}  # detail #16
    with open(os.path.join(output_dir, "episodes.jsonl"), "a" if args.resume else "w") as jsonl:
        for c in checkpoints:
            for task in tasks:
                settings = build_settings(args, task)
                finished = {s.name: resumed(done, c["label"], s) for s in settings}
                if all(len(finished[s.name]) == s.num_episodes for s in settings):
                    policy = None  # nothing left to run (or no settings): no model loaded
                elif "api_model" in c:
                    policy = ApiPolicy(args)
                else:
                    try:
                        model, processor = load_model(c["path"], vl_task=task.endswith("-vl"),
                                                      dtype=getattr(torch, args.dtype))
                    except ValueError as e:
                        fail(f"{c['path']} for task {task}: {e}")
                    except Exception as e:  # noqa: BLE001  (e.g. a truncated model.safetensors of a prepared name)
                        fail(f"cannot load {c['path']} for task {task}: {type(e).__name__}: {str(e)[:300]}")
                    if not weights_finite(model):
                        fail(f"checkpoint {c['path']!r}: its weights are not finite (NaN or inf); refusing to "
                             "evaluate it")
                    policy = ModelPolicy(model.to(args.device), processor, args.max_new_tokens, args.temperature,
                                         args.top_p, args.top_k, args.device, args.kv_reuse, args.gen_chunk)
                    del model
                for setting in settings:
                    torch.manual_seed(args.seed)
                    t0 = time.time()
                    if finished[setting.name]:
                        print(f"[{c['label']} {task}/{setting.name}] --resume: {len(finished[setting.name])} of "
                              f"{setting.num_episodes} episodes already in episodes.jsonl", flush=True)
                    eps = run_episodes(setting, policy, args.batch_size, label=f"{c['label']} ",
                                       log_every_s=args.log_every_s, done=finished[setting.name],
                                       on_episode=lambda e, c=c: write_jsonl(jsonl, dict(e, checkpoint=c["label"],
                                                                                         checkpoint_path=c["path"])))
                    episodes[(c["label"], task, setting.name)] = eps
                    results.append(dict(c, task=task, setting=setting.name, metrics=metrics_of(setting, eps),
                                        means=means_of(eps, args.bootstrap_samples, args.seed),
                                        wall_time_s=time.time() - t0, num_episodes=len(eps)))
                del policy

    # TRY NOT TO MODIFY: tables, paired tests, files, curves
    rows = rows_of(results)
    # pairs (detail #12): every --model-path against the first one; with --run-dir, each arm's last checkpoint against
    # the first label (the init) and the arms' last checkpoints against each other (e.g. SFT vs RL at the end)
    arm_last = {c["arm"]: c["label"] for c in checkpoints if c["arm"]}
    plain = [c["label"] for c in checkpoints if not c["arm"]]
    pairs = [(labels[0], b) for b in plain[1:] + list(arm_last.values()) if b != labels[0]]
    finals = list(arm_last.values())
    pairs += [(finals[i], finals[j]) for i in range(len(finals)) for j in range(i + 1, len(finals))]
    comparisons = paired_comparisons(results, episodes, list(dict.fromkeys(pairs)), args)
    write_report(output_dir, rows, results, comparisons, labels, args.reference_column,
                 dict(args=asdict(args), sampling=sampling, checkpoints=checkpoints, wall_time_s=time.time() - t_start))
    if args.run_dir:
        for task in tasks:
            png = os.path.join(output_dir, f"curves_{task}.png")
            plot_curves(curve_points(rows, results, checkpoints), png, task)
            print(f"wrote {png}")
    print(f"wrote {output_dir}/table.md, results.json, results.csv, episodes.jsonl "
          f"(total wall time {time.time() - t_start:.0f}s)")
