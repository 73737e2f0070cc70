"""The layer modules form a star: a mixer layer module never imports another one, and no class
borrows another class's methods (behaviour is shared through base classes and mixins)."""
import ast
import pathlib

import hybrid_jax.nn

NN_DIR = pathlib.Path(hybrid_jax.nn.__file__).parent


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(NN_DIR.glob("*.py"))}


def _registers_a_mixer(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "register_mixer"
               for node in ast.walk(tree))


def _imported_nn_modules(tree: ast.Module) -> set[str]:
    """Names of the hybrid_jax.nn modules a module imports (absolute or relative imports)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y / from . import x
                base = "hybrid_jax.nn" + (f".{base}" if base else "")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name.split(".")[2] for name in names if name.startswith("hybrid_jax.nn.")}


def test_mixer_layer_modules_do_not_import_each_other():
    modules = _modules()
    mixer_modules = {name for name, tree in modules.items() if _registers_a_mixer(tree)}
    # The registered kinds live in the modules hybrid_jax.nn imports: the walk sees all of them.
    assert mixer_modules == set(hybrid_jax.nn.MIXER_MODULES)
    assert {cls.__module__.rsplit(".", 1)[1] for cls in hybrid_jax.nn.MIXERS.values()} == mixer_modules
    sideways = {name: sorted(_imported_nn_modules(modules[name]) & (mixer_modules - {name}))
                for name in mixer_modules}
    assert not any(sideways.values()), f"mixer layer modules importing other mixer layer modules: {sideways}"


def _borrowed_methods(tree: ast.Module) -> list[str]:
    """`Other.method(self, ...)` calls and class-body `name = Other.method` assignments."""
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.args
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"):
            found.append(f"{node.func.value.id}.{node.func.attr}(self, ...)")
        if isinstance(node, ast.ClassDef):
            for statement in node.body:
                values = [statement.value] if isinstance(statement, ast.Assign) else []
                for value in values:
                    parts = value.elts if isinstance(value, ast.Tuple) else [value]
                    found += [f"{node.name}: {part.value.id}.{part.attr}" for part in parts
                              if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name)
                              and part.value.id in classes]
    return found


def test_no_class_borrows_another_class_methods():
    borrowed = {name: _borrowed_methods(tree) for name, tree in _modules().items()}
    assert not any(borrowed.values()), borrowed
