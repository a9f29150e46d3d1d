"""V-IRL navigation env: instructions/labels, relocation, rail, verifier, budget, prompts, VL grid, world, errors.
The generated world is built by make_virl_world.py (tested here too); envs.py runs it but never imports it."""
import ast
import json
import math
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageDraw

import envs as virl
import make_virl_world as mvw

MILESTONES = """{
    intersection_id: 1
    landmarks: "Hotel 32One is on your right behind",
    to_next_intersection_heading: 177 (south)
}
{
    to_next_intersection_heading: 90 (east)
}
{
    landmarks: Cafe Rio is on your left
    to_next_intersection_heading: 350 (north)
}"""


def answer(action, obs="No landmarks nearby; ", instr="x"):
    return virl.ResponseVIRL.format(current_observation=obs, current_instruction=instr, action=action)


# ---- a tiny generated world shared by the env tests ----------------------------------------------------------------
@pytest.fixture(scope="session")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("virl_world")
    return mvw.generate_virl_world(out, num_routes=8, num_heldout_routes=4, seed=3, grid_size=5,
                                   pano_size=(96, 48))


def make_env(world, **kw):
    return virl.NavigationEnv(world["route_info_path"], world["gps_to_pano_path"], world["panorama_dir"], **kw)


# ---- instructions and labels ----------------------------------------------------------------------------------------
def test_parse_milestones_strips_quotes_and_commas():
    blocks = virl.virl_parse_milestones(MILESTONES)
    assert len(blocks) == 3
    assert blocks[0]["landmarks"] == "Hotel 32One is on your right behind"
    assert blocks[0]["to_next_intersection_heading"] == "177 (south)"
    assert "landmarks" not in blocks[1]


def test_instructions_absolute_relative_no_wrap():
    ins = virl.virl_instructions(virl.virl_parse_milestones(MILESTONES), init_heading=100)
    # 177-100=77 right; 90-177=-87 left; 350-90=260 right
    assert ins["abs_actions"] == ["turn_direction(south)", "turn_direction(east)", "turn_direction(north)"]
    assert ins["rel_actions"] == ["turn_direction(right)", "turn_direction(left)", "turn_direction(right)"]
    assert ins["text"] == (
        "1. First, turn right to face south.\n"
        "2. Move forward until you reach next intersection where Hotel 32One is on your right behind.\n"
        "3. Turn left to face east.\n"
        "4. Move forward until you reach next intersection.\n"
        "5. Turn right to face north.\n"
        "6. Move forward until you reach destination where Cafe Rio is on your left.\n")
    assert ins["headings"] == [100, 177, 90, 350]


@pytest.mark.parametrize("prev,nxt,nowrap,wrap", [
    (350, 10, "left", "slightly right"),      # the official labels do not wrap: -340 -> left
    (10, 350, "right", "slightly left"),
    (0, 45, "slightly right", "slightly right"),
    (0, -45 % 360, "right", "slightly left"),
    (90, 90, "slightly left", "slightly left"),  # 0 counts as slightly left (official order of the tests)
    (90, 180, "right", "right"),
    (200, 100, "left", "left"),
    (0, 180, "right", "right"),
])
def test_relative_labels_wrap_flag(prev, nxt, nowrap, wrap):
    blocks = [{"to_next_intersection_heading": f"{nxt} ({mvw.virl_compass_word(nxt)})"}]
    assert virl.virl_instructions(blocks, prev)["rel_actions"] == [f"turn_direction({nowrap})"]
    assert virl.virl_instructions(blocks, prev, wrap=True)["rel_actions"] == [f"turn_direction({wrap})"]


def test_bad_heading_raises():
    with pytest.raises(ValueError, match="177 \\(south\\)"):
        virl.virl_instructions([{"to_next_intersection_heading": "south"}], 0)
    with pytest.raises(ValueError, match="to_next_intersection_heading"):
        virl.virl_instructions([{"landmarks": "X"}], 0)


def test_compass_and_spatial_words():
    assert [mvw.virl_compass_word(h) for h in (0, 22, 23, 90, 177, 200, 203, 359)] == [
        "north", "north", "northeast", "east", "south", "south", "southwest", "north"]
    assert mvw.virl_spatial_word(0, 135) == "right behind"
    assert mvw.virl_spatial_word(90, 45) == "left front"
    assert mvw.virl_spatial_word(0, 270) == "left"


# ---- relocation and the rail ----------------------------------------------------------------------------------------
LAT0, LNG0 = 40.0, -73.0
M_LAT = 1 / 111195.0  # degrees of latitude per metre (R = 6371 km)


def north(m):
    return (round(LAT0 + m * M_LAT, 9), LNG0)


def line_route(milestones="{\n landmarks: Shop A is on your left\n to_next_intersection_heading: 0 (north)\n}"):
    return {"start_place": {"relocated_geocode": list(north(0))},
            "route_results": {"geocode_list": [list(north(100))]}, "milestone_info": milestones}


def test_relocation_snap_drop():
    reloc = virl.VirlRelocator({north(0): "p0", north(100): "p100"})
    assert reloc(north(0)) == (north(0), "p0")            # exact key
    assert reloc(north(15))[1] == "p0"                     # within 20 m
    assert reloc(north(85))[1] == "p100"
    assert reloc(north(50)) is None                        # 50 m from both: not relocated
    assert abs(virl.virl_haversine(north(0), north(100)) - 100) < 0.05


def test_rail_drop_rate_and_8m_rule():
    mapping = {north(m): f"p{m}" for m in range(0, 101, 10)}
    reloc = virl.VirlRelocator(mapping)
    _, rail = virl.virl_build_rail(line_route(), reloc, random.Random(0), 10, drop_rate=1.0)
    assert [p["gt_action"] for p in rail] == ["turn_direction(north)", "stop()"]
    _, rail = virl.virl_build_rail(line_route(), reloc, random.Random(0), 10, drop_rate=0.0)
    # fractions 1/5..5/5 -> 20, 40, 60, 80, 100 m; the last is within 8 m of the end and dropped
    assert [p["pano_id"] for p in rail] == ["p0", "p20", "p40", "p60", "p80", "p100"]
    assert [p["gt_action"] for p in rail] == ["turn_direction(north)"] + ["forward()"] * 4 + ["stop()"]
    assert rail[0]["oracle"] == "No landmarks nearby; " and rail[0]["heading"] == 10
    assert rail[1]["oracle"] == "No landmarks nearby; " and rail[1]["heading"] == 0
    assert rail[-1]["oracle"] == "Shop A is on your left; "  # the stop point has no intersection text
    assert rail[1]["instruction"] == "Move forward until you reach destination where Shop A is on your left."
    assert rail[-1]["instruction"] == rail[1]["instruction"]
    assert rail[0]["instruction"] == "Turn slightly left to face north."  # one block: final-block wording
    # points that cannot be relocated are dropped
    sparse = virl.VirlRelocator({north(0): "a", north(100): "b", north(40): "c"})
    _, rail = virl.virl_build_rail(line_route(), sparse, random.Random(0), 10, drop_rate=0.0)
    assert [p["pano_id"] for p in rail] == ["a", "c", "c", "b"]


def test_rail_intersection_text_and_relative_actions():
    ms = ("{\n to_next_intersection_heading: 0 (north)\n}\n"
          "{\n landmarks: Shop B is on your right\n to_next_intersection_heading: 90 (east)\n}")
    route = line_route(ms)
    east = (LAT0 + 100 * M_LAT, LNG0 + 100 * M_LAT / math.cos(math.radians(LAT0)))
    route["route_results"]["geocode_list"].append(list(east))
    reloc = virl.VirlRelocator({north(0): "s", north(100): "i", east: "d"})
    _, rail = virl.virl_build_rail(route, reloc, random.Random(0), 300, absolute_action=False, drop_rate=0.0)
    # 0 - 300 = -300: `left` without wrapping (a 60 degree right turn in reality); 90 - 0 = 90: `right`
    assert [p["gt_action"] for p in rail] == ["turn_direction(left)", "turn_direction(right)", "stop()"]
    assert rail[1]["oracle"] == "No landmark nearby; You observe an intersection"
    assert rail[2]["oracle"] == "Shop B is on your right; "


def test_anchor_relocation_failure_names_route_and_point():
    reloc = virl.VirlRelocator({north(0): "p0"})
    with pytest.raises(ValueError, match=r"my route 7: destination .* no panorama within 20 m"):
        virl.virl_build_rail(line_route(), reloc, random.Random(0), 10, route_name="my route 7")


def test_obs_act_seq_l_and_vl():
    oracles = ["No landmarks nearby; ", "Shop; You observe an intersection"]
    assert virl.virl_obs_act_seq(oracles, ["turn_direction(north)"]) == (
        "O_1: No landmarks nearby; \nA_1: turn_direction(north)\nO_2: Shop; You observe an intersection\nA_2: \n")
    assert virl.virl_obs_act_seq(oracles, ["forward()"], language_only=False).endswith(
        "O_2: You observe an image of 4 views; You observe an intersection\nA_2: \n")
    assert virl.virl_obs_act_seq(oracles[:1], [], language_only=False) == (
        "O_1: You observe an image of 4 views; \nA_1: \n")


# ---- verifier -------------------------------------------------------------------------------------------------------
def test_verifier_branches_exact_messages():
    fmt = ('\n[Output]\n{{\n  "current observation": latest observation from the streetview grid,\n'
           '  "current instruction": analyze the full instruction and identify the sentence to be executed,\n'
           '  "action": the action to be taken chosen from the action space,\n}}')
    gt = "turn_direction(north)"
    assert virl.virl_verify(answer(gt), gt, "No landmarks nearby") == (1, "Correct action.", "CORRECT_ACTION")
    r = virl.virl_verify(answer("forward()", obs="X; You observe an intersection"), gt, "Shop is on your left")
    assert r == (-1.5, "you are not at any intersection. Please avoid this observation and try again in the same "
                       "format:" + fmt + ".", "INCORRECT_OBS")
    r = virl.virl_verify(answer("forward()", obs="nothing"), gt, "an intersection landmark")
    assert r == (-1.5, "you are at an intersection. Please avoid this observation and try again in the same format:"
                 + fmt + ".", "INCORRECT_OBS")
    r = virl.virl_verify(answer("forward()"), gt, "No landmarks nearby")
    assert r == (-1, "you make incorrect action. Please avoid this action and try again in the same format:"
                 + fmt + ".", "INCORRECT_ACTION")
    assert virl.virl_verify("garbage", gt, "No landmarks nearby")[0] == -1
    # JSON first, then the regex
    assert virl.virl_verify(json.dumps({"action": gt}), gt, "x")[0] == 1
    assert virl.virl_verify('{"action": 3, "current observation": ["intersection"]}', gt, "x")[0] == -1.5
    assert virl.virl_re_match('"action": "stop()" and "action": "forward()"', "action") == "stop()"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300) | st.builds(lambda a, o: answer(a, o), st.text(max_size=40), st.text(max_size=40)))
def test_fuzz_verifier_never_raises(text):
    r, msg, outcome = virl.virl_verify(text, "turn_direction(north)", "No landmarks nearby")
    assert r in (1, -1, -1.5) and isinstance(msg, str) and outcome in virl.REWARD_FN_VIRL
    assert outcome in virl.VIRL_OUTCOMES


# ---- episode dynamics -----------------------------------------------------------------------------------------------
def test_budget_two_attempts_then_forced_minus_one(world):
    env = make_env(world, verify_iter=2)
    obs, info = env.reset(seed=0)
    assert info["verify_info"] is None and info["remaining_step"] == 2 and len(obs["messages"]) == 1
    wrong = answer("stop()") if info["gt_action"] != "stop()" else answer("forward()")
    obs, r, term, trunc, info = env.step(wrong)
    assert (r, term, trunc, info["outcome"]) == (-1, False, False, "INCORRECT_ACTION")
    assert [m["role"] for m in obs["messages"]] == ["user", "assistant", "user"]
    assert obs["messages"][1]["content"] == wrong
    assert obs["messages"][2]["content"] == "You failed this trial because " + info["verify_info"]
    obs, r, term, trunc, info = env.step(wrong)
    assert r == -1 and not (term or trunc) and len(obs["messages"]) == 5
    obs, r, term, trunc, info = env.step(env.oracle_response())  # third call: not checked
    assert (r, term, trunc, info["outcome"], info["is_success"]) == (-1, False, True, "STEP_LIMIT", False)
    assert info["verify_info"] == "Exceed maximum verify steps"
    with pytest.raises(RuntimeError, match="reset"):
        env.step(wrong)


def test_budget_resets_on_move_and_fresh_prompt(world):
    env = make_env(world)
    obs, info = env.reset(seed=1)
    first_prompt = obs["messages"][0]["content"]
    env.step(answer("nonsense"))
    obs, r, term, trunc, info = env.step(env.oracle_response())
    assert r == 1 and info["outcome"] == "CORRECT_ACTION" and not (term or trunc)
    assert info["remaining_step"] == 2 and info["current_pos"] == 1
    assert len(obs["messages"]) == 1 and obs["messages"][0]["role"] == "user"
    new_prompt = obs["messages"][0]["content"]
    assert new_prompt != first_prompt and new_prompt == env.prompt_at(1)
    assert f"A_1: {env.rail[0]['gt_action']}\nO_2: {env.rail[1]['oracle']}\nA_2: \n" in new_prompt
    env.step(answer("nonsense"))
    obs, r, *_ = env.step(answer("nonsense"))  # two wrong at the new point are allowed again
    assert r in (-1, -1.5) and not env.done


def test_oracle_plays_to_success_and_stop_point_limit(world):
    env = make_env(world)
    obs, info = env.reset(seed=2)
    n, total = 0, 0
    while True:
        obs, r, term, trunc, info = env.step(env.oracle_response())
        n, total = n + 1, total + r
        if term or trunc:
            break
    assert term and not trunc and info["is_success"] and n == len(env.rail) == total
    # failing at the stop() point: terminated and truncated (official _terminate_step)
    env.reset(seed=2)
    for _ in range(len(env.rail) - 1):
        env.step(env.oracle_response())
    env.step(answer("forward()"))
    env.step(answer("forward()"))
    _, r, term, trunc, info = env.step(env.oracle_response())
    assert (r, term, trunc, info["is_success"]) == (-1, True, True, False)


def test_determinism_and_options(world):
    a, b = make_env(world), make_env(world)
    oa, ia = a.reset(seed=5)
    ob, ib = b.reset(seed=5)
    assert oa == ob and ia == ib and [p["pano_id"] for p in a.rail] == [p["pano_id"] for p in b.rail]
    _, i3 = a.reset(options={"route_idx": 3})
    assert i3["route_idx"] == 3
    with pytest.raises(IndexError):
        a.reset(options={"route_idx": 99})
    c = make_env(world, order=True)
    assert [c.reset()[1]["route_idx"] for _ in range(3)] == [0, 1, 2]


def test_relative_env_uses_relative_labels_and_action_space(world):
    env = make_env(world, absolute_action=False)
    obs, info = env.reset(seed=0)
    assert virl.VIRL_ACTION_SPACE_RELATIVE in obs["messages"][0]["content"]
    turns = [p["gt_action"] for p in env.rail if p["gt_action"].startswith("turn")]
    assert turns and all(t[len("turn_direction("):-1] in virl.VIRL_DIRECTIONS_REL for t in turns)


def test_revision_trajectory_real_feedback(world):
    env = make_env(world)
    env.reset(seed=4)
    rng = random.Random(0)
    msgs = env.revision_trajectory(rng, max_errors=1)
    roles = [m["role"] for m in msgs]
    assert roles[0] == "user" and roles[-1] == "assistant" and len(msgs) in (2, 4)
    if len(msgs) == 4:
        assert msgs[2]["content"].startswith("You failed this trial because you ")
    assert virl.virl_re_match(msgs[-1]["content"], "action") == env.rail[0]["gt_action"]
    assert env.pos == 1  # stepped to the next point


def test_exact_prompt_strings(world):
    env = make_env(world)
    obs, _ = env.reset(seed=0)
    p = obs["messages"][0]["content"]
    assert p.startswith("\n[Task Description]\nYou are an expert in navigation. You will receive a sequence of "
                        "instructions to follow. You\nare also provided")
    assert "executed. \nThen" in p and p.endswith('chosen from the action space,\n}\n')
    assert virl.VIRL_ACTION_SPACE_ABSOLUTE in p
    assert "stree tviews" in virl.Q_VIRL_VL and "[front, right\n back, left]" in virl.Q_VIRL_VL
    assert env.oracle_response().startswith('\n{\n  "current observation": "No landmarks nearby; ",')


# ---- VL grid geometry -----------------------------------------------------------------------------------------------
def marker_pano(world_heading, rotation, W=360, H=180):
    pano = np.full((H, W, 3), 128, np.uint8)
    theta = ((world_heading - 180) % 360 + rotation) % 360  # the official camera-heading convention
    cx = int(theta / 360 * W)
    for dx in range(-4, 5):
        pano[H // 2 - 5:H // 2 + 5, (cx + dx) % W] = (255, 0, 0)
    return pano


@pytest.mark.parametrize("rotation", [0, 77])
@pytest.mark.parametrize("tile,offset", [(0, -135), (1, -45), (2, 45), (3, 135)])
def test_vl_grid_marker_lands_in_expected_tile(rotation, tile, offset):
    cur, res = 30, 48
    grid = np.asarray(virl.virl_view_grid(marker_pano(cur + offset, rotation), cur, rotation, resolution=res,
                                          crop_size=None))
    assert grid.shape == (2 * res + 5, 2 * res + 5, 3)
    assert (grid[res:res + 5] == 0).all() and (grid[:, res:res + 5] == 0).all()  # 5 px black separators
    red = (grid[..., 0] > 200) & (grid[..., 1] < 60)
    for t in range(4):
        x0, y0 = (t % 2) * (res + 5), (t // 2) * (res + 5)
        hit = red[y0:y0 + res, x0:x0 + res]
        if t == tile:
            ys, xs = np.nonzero(hit)
            assert hit.sum() > 5 and abs(xs.mean() - res / 2) < 3 and abs(ys.mean() - res / 2) < 3
        else:
            assert hit.sum() == 0


def test_env_vl_image_and_resize(world):
    env = make_env(world, language_only=False, resolution=40, crop_size=64)
    obs, info = env.reset(seed=0)
    assert isinstance(obs["image"], Image.Image) and obs["image"].size == (85, 85)
    assert "O_1: You observe an image of 4 views; \nA_1: \n" in obs["messages"][0]["content"]
    assert virl.Q_VIRL_VL.split("{instruction}")[0] in obs["messages"][0]["content"]


# ---- generated world ------------------------------------------------------------------------------------------------
def test_sign_logos_are_unique_and_names_split_back():
    """World v2 signs: a 2-letter monogram per stem, unique over all skins, and 16 distinct category pictograms."""
    mono = mvw.VIRL_MONOGRAMS
    stems = [stem for s in mvw.VIRL_SKINS.values() for stem in s["stems"]]
    assert sorted(mono) == sorted(stems) and len(set(mono.values())) == len(stems)
    assert all(len(m) == 2 and m.isupper() and m[0] == stem[0].upper() for stem, m in mono.items())
    for skin, s in mvw.VIRL_SKINS.items():
        for stem in s["stems"]:
            for cat in mvw.VIRL_CATEGORIES:
                assert mvw.virl_name_parts(f"{stem} {cat}" if s["order"] == "stem" else f"{cat} {stem}") == (stem, cat)
    icons = []
    for k in range(len(mvw.VIRL_CATEGORIES)):
        im = Image.new("RGB", (24, 24))
        mvw.draw_pictogram(ImageDraw.Draw(im), k, (2, 2, 20), (255, 255, 255))
        icons.append(np.asarray(im).tobytes())
    assert len(set(icons)) == len(mvw.VIRL_CATEGORIES) and Image.new("RGB", (24, 24)).tobytes() not in icons


def test_signs_are_drawn_within_the_reading_distance_only():
    city = mvw._VirlCity("nyc", random.Random(0), 3, 70.0, 1, 0.0)
    lm = city.add_landmark((1, 1), 0, random.Random(0))
    colour = np.array(lm["colour"])
    for r, drawn in ((12.0, True), (mvw.VIRL_READ_M + 5, False)):
        xy = (lm["xy"][0] - r * math.sin(math.radians(10)), lm["xy"][1] - r * math.cos(math.radians(10)))
        pano = np.asarray(city.render(xy, "edge", ((0, 0), (1, 0)), (512, 256), 0)).astype(int)
        assert ((np.abs(pano - colour).sum(-1) < 10).sum() > 100) == drawn


def test_readable_signs_say_where_the_view_shows_the_pictogram_and_monogram():
    city = mvw._VirlCity("nyc", random.Random(0), 3, 70.0, 1, 0.0)
    lm = city.add_landmark((1, 1), 0, random.Random(0))
    colour = np.array(lm["colour"])
    node = city.nodes[(1, 1)]
    bearing = math.degrees(math.atan2(lm["xy"][0] - node[0], lm["xy"][1] - node[1]))
    for heading in (bearing + 35, bearing + 45, bearing + 57):  # near the centre of the view at heading - 45
        (sign,) = mvw.virl_readable_signs(city, node, heading)
        pano = city.render(node, "node", (1, 1), (512, 256), 0)
        view = np.asarray(virl.virl_view_grid(pano, heading, 0, 128, 128, line_width=0)).astype(int)
        tile = view[sign["tile"] // 2 * 128:][:128, sign["tile"] % 2 * 128:][:, :128]
        cols = np.flatnonzero((np.abs(tile - colour).sum(-1) < 10).sum(0) > 2)  # the sign's columns
        to_px = lambda x: (x + 1) / 2 * 128
        # the drawn extent is not symmetric about the projected centre (perspective), more so for world v3's wider
        # signs (4.2 px at 77 px wide): within 6 % of the tile
        assert abs((cols.min() + cols.max() + 1) / 2 - to_px(sign["x"])) < 0.06 * 128
        assert cols.min() < to_px(sign["pictogram_x"]) < to_px(sign["x"]) < to_px(sign["monogram_x"]) < cols.max()


def test_world_files_official_format_and_heldout_disjoint(world, tmp_path):
    routes, num = json.load(open(world["route_info_path"]))
    held, _ = json.load(open(world["heldout_route_info_path"]))
    assert num == len(routes) == 8 and len(held) == 4
    pair = lambda r: (tuple(r["start_place"]["relocated_geocode"]), tuple(r["route_results"]["geocode_list"][-1]))
    assert not {pair(r) for r in routes} & {pair(r) for r in held}
    mapping = pickle.load(open(world["gps_to_pano_path"], "rb"))
    pid = next(iter(mapping.values()))
    meta = json.load(open(f"{world['panorama_dir']}/{pid}.metadata.json"))
    assert 0 <= meta["rotation"] < 360 and Image.open(f"{world['panorama_dir']}/{pid}.jpg").size == (96, 48)
    assert virl.virl_parse_milestones(routes[0]["milestone_info"])  # parses through the official path
    again = mvw.generate_virl_world(tmp_path, num_routes=8, num_heldout_routes=4, seed=3, grid_size=5,
                                    pano_size=(96, 48))
    assert open(again["route_info_path"]).read() == open(world["route_info_path"]).read()
    assert pickle.load(open(again["gps_to_pano_path"], "rb")) == mapping


def cached_world(world, cache_dir, name="nyc"):
    """Put the tiny session world where virl_world_paths(name) looks, as if make_virl_world.py had built it."""
    folder = virl.virl_world_dir(name, 0, cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(Path(world["route_info_path"]).parent, target_is_directory=True)
    return folder


def test_heldout_split_via_world_cache(world, tmp_path, monkeypatch):
    cached_world(world, tmp_path, "london")
    monkeypatch.setattr(virl.subprocess, "run", None)  # a cached world never runs make_virl_world.py
    env = virl.NavigationEnv(world="london", split="heldout", cache_dir=tmp_path)
    assert len(env.route_list) == 4 and env.reset(seed=0)[1]["route_id"].startswith("nyc_heldout")
    assert len(virl.NavigationEnv(world="london", cache_dir=tmp_path).route_list) == 8
    assert env.source == "london/heldout"


def test_virl_world_paths_runs_the_tool_once(tmp_path, monkeypatch):
    paths = virl.virl_world_paths("london", seed=1, cache_dir=tmp_path)
    folder = f"london_seed1_v{virl.VIRL_WORLD_VERSION}"
    assert paths == virl.virl_world_files(tmp_path / "virl" / folder)
    assert os.listdir(tmp_path / "virl") == [folder]  # the temporary folder was renamed
    routes, num = json.load(open(paths["route_info_path"]))
    assert num == len(routes) == 300 and len(json.load(open(paths["heldout_route_info_path"]))[0]) == 60
    monkeypatch.setattr(virl.subprocess, "run", None)
    assert virl.virl_world_paths("london", seed=1, cache_dir=tmp_path) == paths  # cached: no second run
    monkeypatch.undo()
    with pytest.raises(ValueError, match="(?s)could not generate the V-IRL world 'atlantis'.*invalid choice"):
        virl.virl_world_paths("atlantis", cache_dir=tmp_path)


def test_make_world_atomic_rename(tmp_path, monkeypatch):
    out = tmp_path / "w"

    def generate_while_another_rank_finishes(folder, **kw):
        (Path(folder) / "mine").write_text("x")
        out.mkdir()
        (out / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({}))  # the other rank renamed its copy first

    monkeypatch.setattr(mvw, "generate_virl_world", generate_while_another_rank_finishes)
    assert mvw.make_world("nyc", 0, out) == virl.virl_world_files(out)
    assert sorted(os.listdir(tmp_path)) == ["w"] and os.listdir(out) == ["gps_pano_mapping.pkl"]  # tmp removed
    monkeypatch.setattr(mvw, "generate_virl_world", None)
    assert mvw.make_world("nyc", 0, out) == virl.virl_world_files(out)  # complete: nothing to do


def test_envs_does_not_import_make_virl_world(world, tmp_path):
    tree = ast.parse(Path(virl.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "make_virl_world" not in imported
    cached_world(world, tmp_path)
    code = ("import sys, envs; envs.NavigationEnv(cache_dir=sys.argv[1]).reset(seed=0); "
            "assert 'make_virl_world' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=Path(virl.__file__).parent)


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_clear_errors(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="route file not found"):
        virl.NavigationEnv(str(tmp_path / "nope.json"), world["gps_to_pano_path"])
    with pytest.raises(FileNotFoundError, match="mapping not found"):
        virl.NavigationEnv(world["route_info_path"], str(tmp_path / "nope.pkl"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"routes": []}))
    with pytest.raises(ValueError, match=r"wrong format: expected a JSON list \[route_list, route_num\]"):
        virl.NavigationEnv(str(bad), world["gps_to_pano_path"])
    bad.write_text(json.dumps([[{"start_place": {}}], 1]))
    with pytest.raises(ValueError, match="route 0 lacks 'start_place.relocated_geocode'"):
        virl.NavigationEnv(str(bad), world["gps_to_pano_path"])
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        virl.NavigationEnv(str(bad), world["gps_to_pano_path"])
    pkl = tmp_path / "bad.pkl"
    pkl.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="wrong format"):
        virl.NavigationEnv(world["route_info_path"], str(pkl))
    with pytest.raises(FileNotFoundError, match="panorama directory not found"):
        virl.NavigationEnv(world["route_info_path"], world["gps_to_pano_path"], str(tmp_path / "x"),
                           language_only=False)
    env = virl.NavigationEnv(world["route_info_path"], world["gps_to_pano_path"], str(tmp_path), language_only=False)
    with pytest.raises(FileNotFoundError, match="panorama .* not found"):
        env.reset(seed=0)
    with pytest.raises(ValueError, match="split"):
        virl.NavigationEnv(split="test")


def test_terminal_demo(world, tmp_path):
    cached_world(world, tmp_path)  # the demo plays the default "nyc" world: the tiny one stands in for it
    run = dict(cwd=Path(virl.__file__).parent, env={**os.environ, "SFTVSRL_CACHE": str(tmp_path)}, text=True,
               capture_output=True, check=True)
    out = subprocess.run([sys.executable, "envs.py", "virl-l", "--auto", "--seed", "0"], **run).stdout
    assert "stop(): reward +1, Correct action.\nepisode over: success\n" in out
    typed = "forward()\nstop()\n\n"  # two wrong actions, then an empty line quits
    out = subprocess.run([sys.executable, "envs.py", "virl-l", "--seed", "0"], input=typed, **run).stdout
    assert "you make incorrect action" in out or "at an intersection" in out
    png = tmp_path / "grid.png"
    subprocess.run([sys.executable, "envs.py", "virl-vl", "--save-image", str(png), "--seed", "0"], **run)
    assert Image.open(png).size == (517, 517)
