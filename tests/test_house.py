"""The package's shape: imports point one way, no cycles, a plain package face, and the abstract model is the one
`nnx.eval_shape` gives."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import jax
from flax import nnx

from retribert_jax import RetriBertConfig, RetriBertModel
from retribert_jax.modeling import abstract_model
from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "retribert_jax")
CORE = {"config", "modeling", "params"}
FORMATS = {"hf_files", "flax_files", "torch_zip", "embedding_dir"}
VERBS = {"checkpoint"}


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), PACKAGE)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "__init__" else "__init__"] = os.path.join(root, f)
    return out


def _imports(path: str, top_level_only: bool) -> set[str]:
    """The package modules `path` imports (module level only, or anywhere in the file)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("retribert_jax"):
            base = node.module.removeprefix("retribert_jax").lstrip(".")
            for alias in node.names:  # `from retribert_jax import flax_files` imports a module
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in _modules() else base or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("retribert_jax."):
                    found.add(alias.name.removeprefix("retribert_jax."))
    return found


def test_no_import_cycle_among_module_level_imports():
    mods = _modules()
    graph = {m: _imports(p, top_level_only=True) & set(mods) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_imports_point_one_way():
    mods = _modules()
    for m in sorted(CORE):
        anywhere = _imports(mods[m], top_level_only=False)
        lazy = anywhere - _imports(mods[m], top_level_only=True)
        assert not (_imports(mods[m], top_level_only=True) & (FORMATS | VERBS)), f"{m} imports file formats or verbs"
        # Only from_pretrained / save_pretrained reach back, lazily, to the verbs.
        assert lazy <= VERBS, f"{m} reaches lazily into {lazy - VERBS}"
    for m in sorted(FORMATS):
        bad = _imports(mods[m], top_level_only=False) & ({"modeling"} | VERBS)
        assert not bad, f"file-format module {m} imports {bad}"
    assert "checkpoint" not in _imports(mods["tokenizer"], top_level_only=False), "the tokenizer imports model loading"


# Edges between modules of one layer, each once made for a helper that now has a home of its own.
SIDEWAYS = {
    ("hf_files", "tokenizer"): "the tokenizer's file names are HF's: hf_files.TOKENIZER_FILES",
    ("flax_files", "hf_files"): "the checkpoint verbs put the tokenizer into a Flax directory",
    ("mining", "training"): "the pairs file format lives in pairs.py",
    ("mining", "evaluation"): "id_string lives with the index, in embedding_dir.py",
}


def _reads_sys_modules(path: str) -> bool:
    tree = ast.parse(open(path, encoding="utf-8").read())
    return any(
        (isinstance(n, ast.Attribute) and n.attr == "modules" and isinstance(n.value, ast.Name) and n.value.id == "sys")
        or (isinstance(n, ast.ImportFrom) and n.module == "sys" and any(a.name == "modules" for a in n.names))
        for n in ast.walk(tree)
    )


def _imports_package_face(path: str) -> bool:
    """Whether `path` imports from `retribert_jax` itself (its lazy face) rather than from one of its modules."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return any(
        (isinstance(n, ast.ImportFrom) and n.level == 0 and n.module == "retribert_jax")
        or (isinstance(n, ast.Import) and any(a.name == "retribert_jax" for a in n.names))
        for n in ast.walk(tree)
    )


def test_no_sideways_imports():
    """Formats do not import each other, commands import the library's modules and commands/common only (never
    another command, never the package face), and no module reads sys.modules (an import no tool sees)."""
    mods = _modules()
    for (a, b), home in SIDEWAYS.items():
        assert b not in _imports(mods[a], top_level_only=False), f"{a} imports {b}, sideways ({home})"
    commands = sorted(m for m in mods if m.startswith("commands."))
    assert len(commands) >= 10, f"found only {commands}"
    for m in commands:
        other = {
            n
            for n in _imports(mods[m], top_level_only=False)
            if n.startswith("commands.") and n not in (m, "commands.common")
        }
        assert not other, f"{m} imports {sorted(other)}; what commands share belongs in commands/common.py"
        assert not _imports_package_face(mods[m]), f"{m} imports from the package face; import the module"
    readers = sorted(m for m, path in mods.items() if _reads_sys_modules(path))
    assert not readers, f"{readers} read sys.modules; import the module instead"


def test_package_face_only_re_exports():
    """Every public name comes from the module that defines it; __init__ defines nothing of its own."""
    import retribert_jax

    for name in retribert_jax.__all__:
        obj = getattr(retribert_jax, name)
        assert obj.__module__.startswith("retribert_jax.") and obj.__module__ != "retribert_jax", (
            f"{name} is defined in __init__, not re-exported"
        )
    tree = ast.parse(open(os.path.join(PACKAGE, "__init__.py"), encoding="utf-8").read())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defined <= {"__getattr__", "__dir__"}, f"__init__ defines {defined - {'__getattr__', '__dir__'}}"


def test_abstract_model_equals_nnx_eval_shape():
    cfg = RetriBertConfig.tiny(share_encoders=False)
    ours = nnx.split(abstract_model(cfg))
    theirs = nnx.split(nnx.eval_shape(lambda: RetriBertModel(cfg, rngs=nnx.Rngs(0))))
    assert ours[0] == theirs[0], "the graph (module structure and static attributes) differs"
    a, b = dict(nnx.to_flat_state(ours[1])), dict(nnx.to_flat_state(theirs[1]))
    assert a.keys() == b.keys(), f"parameters differ: {sorted(set(a) ^ set(b))[:3]}"
    for path in a:
        x, y = a[path].get_value(), b[path].get_value()
        assert (x.shape, x.dtype) == (y.shape, y.dtype), f"{path}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
        assert type(a[path]) is type(b[path]), f"{path}: {type(a[path]).__name__} vs {type(b[path]).__name__}"
    assert isinstance(jax.tree.leaves(ours[1])[0], jax.ShapeDtypeStruct), "abstract_model allocated arrays"


def test_command_line_start_does_not_import_ipython(tmp_path):
    """flax.nnx probes for IPython at import; a command hides it (0.5 s a start) and leaves sys.modules clean."""
    code = (
        "import sys; from retribert_jax import cli; "
        f"sys.argv = ['retribert-jax', 'search', {str(tmp_path)!r}, 'model', 'q']; code = cli.main(); "
        "import flax.nnx; print(code, 'flax.nnx' in sys.modules, 'IPython' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "True", "False"], f"exit code, flax loaded, IPython loaded: {out.stdout}"


def test_one_format_and_lint_clean():
    """The tree is `ruff format`ted (120 columns, pyproject.toml) and `ruff check` finds nothing: CI checks both."""
    for args in (["format", "--check", "--diff"], ["check"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "."], cwd=REPO, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
