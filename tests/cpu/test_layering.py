"""The package import stays cheap, and each third-party dependency stays in its layer."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "vllm_flexprefill"


def test_import_loads_neither_vllm_nor_transformers_nor_kernels():
    code = ("import sys, vllm_flexprefill; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'transformers', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def imports_of(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_backend_imports_vllm_only_hf_imports_transformers_only_kernels_use_triton():
    files = list(PACKAGE.rglob("*.py"))
    assert files
    for path in files:
        part = path.relative_to(PACKAGE).parts[0]
        names = imports_of(path)
        if part != "backend":
            assert "vllm" not in names, f"{path} imports vllm; only backend/ may"
        if part != "hf":
            assert "transformers" not in names, f"{path} imports transformers; only hf/ may"
        if part != "kernels":
            assert "triton" not in names, f"{path} imports triton; only kernels/ may"
        if part == "patterns":
            text = path.read_text()
            assert "vllm_flexprefill.kernels" not in text, f"{path} imports kernels/; attention.py chooses them"
