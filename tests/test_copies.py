"""Copies stay copies: the blocks meant to be identical across the scripts (CleanRL-style duplication) and the shared
first block of Args (one vocabulary) must not drift apart."""
import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("sft.py", "ppo_generalpoints.py", "ppo_virl.py", "eval.py")
TRAINERS = ("sft.py", "ppo_generalpoints.py", "ppo_virl.py")
BLOCK = re.compile(r'^# ---- copied block "(?P<name>[\w-]+)": identical in (?P<files>[^(]+?) \(tests/test_copies\.py\) ----\n'
                   r'(?P<body>.*?)^# ---- end copied block "(?P=name)" ----$', re.S | re.M)


def source(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def blocks() -> dict:
    """{block name: {file: body}} over every script and make_models.py."""
    found = {}
    for name in (*SCRIPTS, "make_models.py"):
        for m in BLOCK.finditer(source(name)):
            files = tuple(f.strip() for f in re.split(r",| and ", m["files"]) if f.strip())
            found.setdefault(m["name"], {})[name] = (files, m["body"])
    return found


def test_every_copied_block_is_identical_in_the_files_it_names():
    found = blocks()
    assert {"ppo"} <= set(found)
    for block, where in found.items():
        (declared,) = {files for files, _ in where.values()}  # every copy names the same files
        assert set(where) == set(declared), f"block {block!r} should be in {declared}, found in {sorted(where)}"
        bodies = {body for _, body in where.values()}
        assert len(bodies) == 1, f"the copies of block {block!r} differ between {sorted(where)}"


def test_a_drifted_copy_is_detected(monkeypatch):
    """The check above can fail: change one character in one copy and it must see it."""
    original = source("ppo_virl.py")
    drifted = original.replace("lastgaelam = 0", "lastgaelam = 0.0", 1)
    assert drifted != original
    real = source
    monkeypatch.setattr(sys.modules[__name__], "source", lambda n: drifted if n == "ppo_virl.py" else real(n))
    with pytest.raises(AssertionError, match="block 'ppo'"):
        test_every_copied_block_is_identical_in_the_files_it_names()


def args_fields(name: str) -> dict:
    """{field: (annotation and default as written, docstring)} of `class Args` in a script."""
    tree = ast.parse(source(name))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args"]
    fields, body = {}, cls.body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign):
            doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
            written = ast.unparse(node.annotation) + " = " + (ast.unparse(node.value) if node.value else "")
            fields[node.target.id] = (written, doc)
    return fields


SAME_EVERYWHERE = ("exp_name", "seed", "dtype", "mixed_precision", "dist", "track", "wandb_project_name",
                   "wandb_entity", "cuda")
SAME_NAME = ("task", "model_path", "micro_batch_size", "lr")
FIRST_BLOCK = ("exp_name", "task", "model_path", "seed", "dtype", "mixed_precision", "dist", "micro_batch_size", "lr",
               "track", "wandb_project_name", "wandb_entity", "cuda")


def test_one_vocabulary_across_the_scripts():
    trainers = {name: args_fields(name) for name in TRAINERS}
    for field in SAME_EVERYWHERE:
        assert len({f[field] for f in trainers.values()}) == 1, f"{field}: default or docstring differs"
    for name, fields in trainers.items():
        assert all(f in fields for f in SAME_NAME), name
        assert list(fields)[:len(FIRST_BLOCK)] == list(FIRST_BLOCK), f"{name}: the first block of Args is out of order"
    evaluation = args_fields("eval.py")
    assert list(evaluation)[:5] == ["exp_name", "task", "model_path", "seed", "dtype"]
    for field in ("exp_name", "seed", "dtype"):
        assert evaluation[field] == trainers["sft.py"][field], field
    for old in ("learning_rate", "model_name", "dist_strategy", "bf16", "local_micro_batch_size"):
        assert all(old not in args_fields(n) for n in SCRIPTS), old


def test_what_nobody_forks_is_not_copied():
    """Model loading, the prefix cache and a run's bookkeeping live once, in common.py: no script defines them again."""
    shared = {n.name for n in ast.parse(source("common.py")).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for name in SCRIPTS:
        defined = {n.name for n in ast.parse(source(name)).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & shared, f"{name} redefines {sorted(defined & shared)}"


def test_training_scripts_do_not_import_the_build_once_tools():
    for name in (*SCRIPTS, "envs.py", "common.py"):
        tree = ast.parse(source(name))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"make_models", "make_virl_world"}, name


def test_script_docstrings_say_what_they_hold_leave_out_and_where_details_are():
    for name in SCRIPTS:
        doc = ast.get_docstring(ast.parse(source(name)))
        head = " ".join(doc.splitlines()[:3])
        assert "leave" in head.lower() and "docs/" in head, f"{name}: {head}"
