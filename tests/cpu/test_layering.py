"""The package import stays cheap, each third-party dependency stays in its layer, control
flows down the floors, and vLLM's internals are reached through the seam only."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "vllm_flexprefill"

# each part of the package imports only from its own floor and the floors below it:
# data and plans, then the math, the kernels, the estimation, the public calls, the integrations
FLOORS = {
    "config": 0, "costs": 0, "stats": 0, "layout": 0,
    "patterns": 1,
    "kernels": 2,
    "estimation": 3,
    "attention": 4,
    "backend": 5, "hf": 5,
    "__init__": 6,
}
# the public vLLM modules that backend/ subclasses and registers with; anything else of vLLM
# goes through backend/compat.py (the seam and its ledger)
PUBLIC_VLLM = {"vllm.v1.attention.backend", "vllm.v1.attention.backends.flash_attn",
               "vllm.v1.attention.backends.cpu_attn", "vllm.v1.attention.backends.registry"}
# names of vLLM internals that only the seam may use
INTERNALS = ("current_platform", "_custom_ops", "seq_lens_cpu_upper_bound", "get_path(", "use_mla",
             "model_executor", "get_layers_from_vllm_config")


def test_import_loads_neither_vllm_nor_transformers_nor_kernels():
    code = ("import sys, vllm_flexprefill; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'transformers', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def imports_of(path: pathlib.Path) -> set[str]:
    """Absolute module names a file imports (``from a.b import c`` gives ``a.b``)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def part_of(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_only_backend_imports_vllm_only_hf_imports_transformers_only_kernels_use_triton():
    files = list(PACKAGE.rglob("*.py"))
    assert files
    for path in files:
        part = part_of(path)
        tops = {name.split(".")[0] for name in imports_of(path)}
        if path == PACKAGE / "kernels" / "fa4.py":
            # vLLM's own FlashAttention-4, the one kernel the kernels take from vLLM
            assert all(n.startswith("vllm.vllm_flash_attn.") for n in imports_of(path) if n.split(".")[0] == "vllm")
        elif part != "backend":
            assert "vllm" not in tops, f"{path} imports vllm; only backend/ may (and kernels/fa4.py FA4)"
        if part != "hf":
            assert "transformers" not in tops, f"{path} imports transformers; only hf/ may"
        # the kernels, and the Triton readers of the plans' tables beside their writers
        if part != "kernels" and path != PACKAGE / "layout" / "readers.py":
            assert "triton" not in tops, f"{path} imports triton; only kernels/ and layout/readers.py may"


def test_control_flows_down_the_floors():
    for path in PACKAGE.rglob("*.py"):
        part = part_of(path)
        assert part in FLOORS, f"{path}: give {part} a floor in FLOORS"
        for name in imports_of(path):
            if not name.startswith("vllm_flexprefill."):
                continue
            other = name.split(".")[1]
            assert FLOORS[other] <= FLOORS[part], f"{path} imports {name}: {part} may not call up into {other}"
            if FLOORS[other] == FLOORS[part]:
                assert other == part or FLOORS[part] == 0, f"{path} imports {name}: {part} and {other} are siblings"


def test_vllm_internals_go_through_the_seam():
    seam = PACKAGE / "backend" / "compat.py"
    for path in (PACKAGE / "backend").glob("*.py"):
        if path == seam:
            continue
        for name in imports_of(path):
            if name.split(".")[0] == "vllm":
                assert name in PUBLIC_VLLM, f"{path} imports {name}: reach it through backend/compat.py"
        text = path.read_text()
        for internal in INTERNALS:
            assert internal not in text, f"{path} uses {internal!r}: reach it through backend/compat.py"


def test_triton_and_torch_internals_stay_in_the_launcher():
    """kernels/launch.py holds the one ledger of Triton's internals and torch's raw stream."""
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "kernels" / "launch.py":
            continue
        text = path.read_text()
        for internal in ("torch._C", "packed_metadata", "knobs"):
            assert internal not in text, f"{path} uses {internal}: only kernels/launch.py may (its ledger)"


def test_every_twin_takes_its_kernels_arguments():
    import inspect

    from vllm_flexprefill.kernels import block_lists, block_sparse_attn, fa4, gather, head_select, naive, probe

    pairs = [(block_sparse_attn.block_sparse_attention, naive.naive_block_sparse_attention),
             (probe.probe_stats, naive.naive_probe_stats), (head_select.select_heads, naive.naive_select_heads),
             (block_lists.pooled_map, naive.naive_pooled_map),
             (block_lists.write_block_lists, naive.naive_write_block_lists),
             (fa4.flash_attn_block_sparse, naive.naive_flash_attn_block_sparse),
             (gather.gather_rows, naive.naive_gather_rows)]
    for kernel, twin in pairs:
        assert list(inspect.signature(kernel).parameters) == list(inspect.signature(twin).parameters), kernel.__name__
