"""No module reads another object's private attributes: an object's underscore names are its own to
change. A layer, proxy or plan that another part needs says so with a public property or method.

The guard walks src/hire with ``ast`` and flags ``x._name`` (and ``getattr``/``setattr``/``hasattr``
with a literal ``"_name"``) unless ``x`` is ``self``, ``cls`` or ``super()``; dunders are public.
It also flags ``from pkg import _name`` from outside ``pkg``'s own package.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "hire"

# (file under src/hire, expression) -> why it cannot be avoided
ALLOWED = {
    ("proxies/kernels.py", "torch._weight_int8pack_mm"):
        "PyTorch's fused CPU int8 GEMV has no public name (torch.ops.aten's is the same private op); "
        "the quantized proxy's decode speed rests on it",
    ("proxies/kernels.py", "torch._convert_weight_to_int4pack_for_cpu"):
        "the packing that PyTorch's fused CPU int4 GEMV reads; no public name",
    ("proxies/kernels.py", "torch._weight_int4pack_mm_for_cpu"):
        "PyTorch's fused CPU int4 GEMV; no public name",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own(node: ast.expr) -> bool:
    """``self``, ``cls`` or ``super()``: the object's own attributes."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def private_reads(source: str, package: str = "hire") -> list[tuple[int, str]]:
    """(line, expression) of every read of another object's private attribute in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr) and not _own(node.value):
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value) and not _own(node.args[0])):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if _private(alias.name) and node.module != package:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    return found


def _offenders() -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        package = ".".join(["hire", *path.relative_to(SRC).parent.parts])
        for line, expr in private_reads(path.read_text(), package):
            out.setdefault((rel, expr), []).append(line)
    return out


def test_no_module_reads_another_objects_privates():
    bad = [f"src/hire/{rel}:{lines[0]}: {expr}" for (rel, expr), lines in _offenders().items()
           if (rel, expr) not in ALLOWED]
    assert not bad, ("private attributes read from outside their object (give the owner a public "
                     "property or method instead):\n" + "\n".join(bad))


def test_every_allowed_read_is_still_there_and_says_why():
    found = _offenders()
    stale = [key for key in ALLOWED if key not in found]
    assert not stale, f"allowlist entries no longer needed, remove them: {stale}"
    assert all(len(reason) > 20 for reason in ALLOWED.values())


def test_the_guard_sees_what_it_should_and_nothing_else():
    source = '''
from hire.layers.ffn import _helper
from hire import _ok_here
class A:
    def f(self, other, x):
        self._mine, cls._also, super()._parent(), x.__len__()
        other._theirs
        self.part._theirs_too
        getattr(x, "_by_name")
        getattr(self, "_mine_by_name")
        return x.public
'''
    got = sorted(expr for _, expr in private_reads(source, package="hire"))
    assert got == sorted(["from hire.layers.ffn import _helper", "other._theirs", "self.part._theirs_too",
                          "getattr(x, '_by_name')"])
