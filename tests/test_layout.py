"""The house's shape (issue 24): import direction, the loop's size, no variant branch in the core, and a fork
without variants/ that still trains. A failure here means a change put a concept in the wrong file."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([p for p in ROOT.glob("*.py")] + list((ROOT / "kernels").glob("*.py"))
                 + list((ROOT / "variants").glob("*.py")))
CORE = ["main", "train_on_rollouts", "rollout", "compute_rewards", "load_dataset"]


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def project_imports(path, names):
    """Project modules a source file imports (any depth: lazy imports count), as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    # a package's submodule import also imports the package itself (variants.base -> variants/__init__.py)
    found |= {m.split(".")[0] for m in found if "." in m}
    return {m for m in found if m in names}


def import_graph():
    names = {module_name(p): p for p in SOURCES}
    return {name: project_imports(path, names) - {name} for name, path in names.items()}


def test_import_direction_and_no_cycles():
    graph = import_graph()
    assert graph, "no sources found"
    importers_of_grpo = sorted(m for m, deps in graph.items() if "grpo" in deps)
    assert importers_of_grpo == [], f"nothing may import grpo.py: {importers_of_grpo}"
    for m, deps in graph.items():
        if m.startswith(("kernels", "variants")):
            assert "eval" not in deps and "grpo" not in deps, f"{m} imports {deps & {'eval', 'grpo'}}"
        if m.startswith("kernels."):
            assert not deps - {"kernels"}, f"a kernel is usable alone: {m} imports {deps}"
    assert not graph["palmr"], f"palmr.py imports nothing of the project: {graph['palmr']}"
    # no cycles: a depth-first search over the graph (package -> its submodules counts as an edge both ways
    # only through real imports, so variants/__init__ -> variants.pearl -> variants.base is not a cycle)
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if d == m.split(".")[0] and "." in m:
                continue  # a submodule's `from variants.base import` loads its package first, by design
            assert state.get(d) != "open", f"import cycle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def _function(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def variant_flags():
    """Every flag the variants add (their argparse dests) and every reward scheme name they register."""
    import argparse

    import rewards
    import variants
    ap = argparse.ArgumentParser()
    before = set(rewards.SCHEMES)
    variants.add_args(ap)
    dests = {a.dest for a in ap._actions} - {"help"}
    return dests - {"mix_data", "mix_ratio"}, {"vision_sr1", "pearl", "vicrit"} | (set(rewards.SCHEMES) - before)


def test_loop_sizes_and_no_variant_branches():
    src = (ROOT / "grpo.py").read_text()
    tree = ast.parse(src)
    assert len(src.splitlines()) <= 900, f"grpo.py has {len(src.splitlines())} lines (target <= 900)"
    main, train = _function(tree, "main"), _function(tree, "train_on_rollouts")
    assert main.end_lineno - main.lineno + 1 <= 120, "main() over 120 lines"
    assert train.end_lineno - train.lineno + 1 <= 70, "train_on_rollouts over 70 lines"
    loop = next(n for n in ast.walk(main) if isinstance(n, ast.For) and "step" in ast.unparse(n.target))
    assert loop.end_lineno - loop.lineno + 1 <= 45, f"the step body has {loop.end_lineno - loop.lineno + 1} lines"
    # the six phases, in order, each announced by a numbered comment
    body = src.splitlines()[loop.lineno - 1:loop.end_lineno]
    phases = [int(m.group(1)) for line in body if (m := re.match(r"\s*# (\d)\. ", line))]
    assert phases == [1, 2, 3, 4, 5, 6], phases
    dests, schemes = variant_flags()
    assert {"vppo", "credit", "pearl_gate"} <= dests, "the variant flag list is what this test thinks it is"
    for name in CORE:
        fn = _function(tree, name)
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and node.attr in dests:
                pytest.fail(f"grpo.{name} reads a variant's flag args.{node.attr} (line {node.lineno})")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in schemes:
                pytest.fail(f"grpo.{name} names a variant's scheme {node.value!r} (line {node.lineno})")
        text = ast.unparse(fn).lower()
        for word in ("vppo", "pearl", "vicrit", "sr1", "token_credit"):
            assert word not in text, f"grpo.{name} mentions {word}"


@pytest.mark.slow
def test_fork_without_variants_trains(tmp_path, tiny_ckpt, shapes_file):
    # README "Fork just PaLMR": delete variants/ and the lines of grpo.py marked `# variants:`; the default job
    # must still run, and the core math tests must still pass, in that copy
    fork = tmp_path / "fork"
    fork.mkdir()
    for p in ROOT.glob("*.py"):
        shutil.copy(p, fork / p.name)
    shutil.copytree(ROOT / "kernels", fork / "kernels")
    (fork / "tests").mkdir()
    for p in (ROOT / "tests").glob("*.py"):  # the core tests and their helpers (conftest, test servers)
        if not p.name.startswith("test_") or p.name in ("test_grpo.py", "test_rewards.py"):
            shutil.copy(p, fork / "tests" / p.name)
    lines = (fork / "grpo.py").read_text().splitlines(keepends=True)
    kept = [line for line in lines if "# variants:" not in line]
    assert len(lines) - len(kept) == 4, "the fork instructions name four lines"
    (fork / "grpo.py").write_text("".join(kept))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "grpo.py", "--model", tiny_ckpt, "--data", shapes_file, "--out", str(out),
                        "--max-steps", "2", "--rollout-batch", "2", "--update-batch", "2", "--group-size", "2",
                        "--max-new-tokens", "8", "--log-rollouts-every", "0"], cwd=fork, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 2/2 | reward" in p.stdout, p.stdout[-2000:]
    assert not (fork / "variants").exists()
    p = subprocess.run([sys.executable, "grpo.py", "--vppo"], cwd=fork, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "unrecognized arguments: --vppo" in p.stderr, "a variant's flag is gone with it"
    tests = ["tests/test_grpo.py", "tests/test_rewards.py"]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                        *tests], cwd=fork, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:]
