"""Names imported under ``if TYPE_CHECKING:`` exist only for annotations: using one at run time (an
``isinstance``, a call) is a NameError on a path the type checker cannot see. Every fleet run once failed so."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "tasks", "flows", "scripts", "bench")


def _type_only_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names.update((alias.asname or alias.name).split(".")[0] for alias in sub.names)
    return names


def _imported_in(node: ast.AST) -> set[str]:
    return {(alias.asname or alias.name).split(".")[0]
            for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)) for alias in sub.names}


class _RunTimeUses(ast.NodeVisitor):
    """Names of ``names`` read outside annotations and not imported again in the enclosing function."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.scopes, self.found = names, [set()], []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expr in [*node.decorator_list, *node.args.defaults, *(d for d in node.args.kw_defaults if d)]:
            self.visit(expr)
        self.scopes.append(_imported_in(node))
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" not in ast.unparse(node.test):
            self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.names and not any(node.id in scope for scope in self.scopes):
            self.found.append(f"{node.lineno}: {node.id}")


def _run_time_uses(source: str) -> list[str]:
    tree = ast.parse(source)
    names = _type_only_names(tree)
    if not names or "from __future__ import annotations" not in source:
        return []
    visitor = _RunTimeUses(names)
    visitor.visit(tree)
    return visitor.found


def test_type_only_imports__the_check_sees_a_run_time_use():
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from pipeline.planning.plan import BuildPlan\n"
              "def f(x: BuildPlan) -> BuildPlan:\n    return isinstance(x, BuildPlan)\n")
    assert _run_time_uses(source) == ["6: BuildPlan"]
    assert _run_time_uses(source.replace("    return", "    from pipeline.planning.plan import BuildPlan\n    return")) == []


def test_type_only_imports__none_is_used_at_run_time():
    found = {str(path.relative_to(ROOT)): uses
             for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             if (uses := _run_time_uses(path.read_text()))}
    assert found == {}
