"""The public Python API: the README's example runs, `gpt2_jax` exports its names without importing JAX, and the
package's imports form layers with no cycle (model never imports sampling, sampling never the CLI, ...)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpt2_jax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpt2_jax"
PUBLIC = [
    "GPT2Config", "get_config", "GPT2", "init_params", "load_model", "Sampler", "generate_text", "load_tokenizer",
    "UserError",
]  # fmt: skip
# Lower layers first: a module may import from its own layer and the ones before it, never from a later one.
LAYERS = [
    {"dependencies", "errors", "console", "io", "hints", "unicode"},
    {"config", "precision"},
    {"model"},
    {"tokenizers"},
    {"weights"},
    {"sampling", "data"},
    {"serving"},  # the server's engine and web app, over sampling
    {"cli", "compile_cache", "xla_cpu", "training"},  # what the commands share; training's flags
    {"convert", "download", "evaluate", "prepare", "sample", "serve", "train"},  # the commands
    {"__init__"},  # the public API re-exports
    {"commands", "__main__"},  # gpt2-jax: every command by name
]


def readme_example() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### Use it from Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_prints_what_generate_text_gives(capsys):
    code = readme_example()
    assert 'load_model("models/124M")' in code
    exec(compile(code.replace('"models/124M"', '"scratch:tiny"'), "README.md", "exec"), {})  # tiny: random weights
    printed = capsys.readouterr().out
    model = gpt2_jax.load_model("scratch:tiny")
    # The README's prompt and settings, through the one-call function.
    texts = gpt2_jax.generate_text(
        model.params, model.config, model.tokenizer, ["The meaning of life is"], nsamples_per_prompt=2, length=40
    )[0]
    assert printed == "".join(f"{text}\n" for text in texts)


def test_a_lone_string_is_one_prompt():
    sampler = gpt2_jax.Sampler.from_model(gpt2_jax.load_model("scratch:tiny"))
    texts = sampler.generate(["Hi"], nsamples=2, length=5, seed=3)
    assert len(texts) == 1 and len(texts[0]) == 2
    assert sampler.generate("Hi", nsamples=2, length=5, seed=3) == texts


def test_public_names_import_lazily():
    assert sorted(gpt2_jax.__all__) == sorted([*PUBLIC, "__version__"])
    for name in PUBLIC:
        assert getattr(gpt2_jax, name).__module__.startswith("gpt2_jax.")
        assert name in dir(gpt2_jax)
    with pytest.raises(AttributeError):
        gpt2_jax.no_such_name  # noqa: B018
    # The commands import the package first: it must not pull in JAX before their flags are parsed.
    script = "import sys, gpt2_jax; print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the import map ----------------------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported(tree: ast.AST, modules: set[str], type_only: bool = False) -> Iterator[tuple[str, bool]]:
    """(module imported from the package, whether only for type checking) for every import in `tree`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and is_type_checking(node):
            yield from imported(ast.Module(body=node.body, type_ignores=[]), modules, True)
            yield from imported(ast.Module(body=node.orelse, type_ignores=[]), modules, type_only)
        elif isinstance(node, ast.Import):
            yield from ((a.name, type_only) for a in node.names if a.name.split(".")[0] == "gpt2_jax")
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: a relative import; the package imports by absolute names"
            if node.module.split(".")[0] == "gpt2_jax":
                for a in node.names:
                    name = f"{node.module}.{a.name}"
                    yield (name if name in modules else node.module), type_only
        else:
            yield from imported(node, modules, type_only)


def import_graph() -> dict[str, set[tuple[str, bool]]]:
    """Each module's imports within the package: (module, whether only for type checking)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        edges = imported(ast.parse(path.read_text(encoding="utf-8")), set(paths))
        graph[name] = {(m, type_only) for m, type_only in edges if m != name}
    return graph


def layer(module: str) -> int:
    group = module.split(".")[1] if "." in module else "__init__"
    found = [i for i, names in enumerate(LAYERS) if group in names]
    assert found, f"{module}: add gpt2_jax/{group} to LAYERS in {Path(__file__).name}"
    return found[0]


# Imported by gpt2_jax/__init__.py itself, before anything else: the package is in sys.modules by then, so the edge
# back to the package is no cycle, as long as the module imports nothing of the package.
EAGER = {"gpt2_jax.dependencies"}


def test_no_import_cycles():
    runtime = {m: {t for t, type_only in edges if not type_only} for m, edges in import_graph().items()}
    for module in EAGER:
        assert runtime[module] == set(), f"{module} runs inside gpt2_jax/__init__.py: it may import no package module"
    for module in set(runtime) - EAGER:  # importing a module first runs its packages' __init__
        parts = module.split(".")
        runtime[module] |= {".".join(parts[:i]) for i in range(1, len(parts))}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(runtime.get(module, ())):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(runtime):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_from_a_later_layer():
    upward = [
        f"{module} imports {target}"
        for module, edges in import_graph().items()
        for target, _ in edges
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_prompts_that_are_not_valid_unicode_are_repaired_not_raised():
    """Lone surrogates handed to the Python API (no encoder takes them) sample like U+FFFD would."""
    sampler = gpt2_jax.Sampler.from_model(gpt2_jax.load_model("scratch:tiny"))
    bad = sampler.generate(["a\ud800b\udcff"], length=3, temperature=0)[0][0]
    assert bad == sampler.generate(["a\ufffdb\ufffd"], length=3, temperature=0)[0][0]
