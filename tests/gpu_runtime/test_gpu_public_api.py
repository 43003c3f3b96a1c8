"""The pinned public surface of gpu_runtime and its dependency rule."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from shardwise import gpu_runtime

PACKAGE_DIR = Path(gpu_runtime.__file__).parent
ALLOWED_THIRD_PARTY = {"torch", "transformers", "accelerate", "sentence_transformers", "numpy", "pyarrow"}
# Optional packages, each confined to its own module and imported there only when chosen.
OPTIONAL_ENGINE_IMPORTS = {"vllm_engine.py": {"vllm"}, "structured.py": {"xgrammar"}, "endpoint_client.py": {"httpx"}}


def test_exported_names_are_exactly_the_intended_ones():
    assert set(gpu_runtime.__all__) == {
        "ResolvedModel",
        "resolve_model_spec",
        "load_generation_engine",
        "load_embedding_engine",
        "model_load_counts",
        "model_cache_dir",
        "GenerationParams",
        "Generation",
        "GenerationEngine",
        "EmbeddingEngine",
        "EmbeddingOutput",
        "plan_batches",
        "template_fields",
        "render_prompt",
        "select_device",
        "default_dtype",
        "device_lock",
        "pin_worker",
        "visible_gpu_count",
        "on_compute_thread",
        "choose_engine",
        "VllmOptions",
        "EndpointOptions",
        "ModelNotFoundError",
        "EngineError",
    }
    assert len(gpu_runtime.__all__) == len(set(gpu_runtime.__all__))
    for name in gpu_runtime.__all__:
        assert getattr(gpu_runtime, name) is not None


def test_imports_only_the_allowed_packages():
    for source in PACKAGE_DIR.glob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            allowed = ALLOWED_THIRD_PARTY | OPTIONAL_ENGINE_IMPORTS.get(source.name, set())
            for root in roots:
                assert root in sys.stdlib_module_names or root in allowed, f"{source.name} imports {root}"


def test_vllm_is_imported_only_inside_functions():
    source = PACKAGE_DIR / "vllm_engine.py"
    for node in ast.parse(source.read_text()).body:  # module level only
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        assert not any(n.split(".")[0] == "vllm" for n in names), "vllm imported at module level"


def test_choosing_and_loading_the_hf_engine_never_imports_vllm():
    code = (
        "import sys; from shardwise.gpu_runtime import choose_engine, VllmOptions, load_generation_engine;"
        "from shardwise.gpu_runtime.vllm_engine import vllm_build; vllm_build();"
        "assert choose_engine('hf') == 'hf' and choose_engine('auto', 'cpu') == 'hf';"
        # with the CPU build of vLLM installed (make setup), auto still keeps the HF engine on a
        # CPU: no faster there, and 17 s to start in every process (README, "The vLLM engine")
        "assert vllm_build() is None or vllm_build()[2] != 'cpu' or choose_engine('auto') == 'hf';"
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)


def test_pure_helpers_do_not_import_torch():
    code = (
        "import sys; from shardwise.gpu_runtime import plan_batches, template_fields, render_prompt, ModelNotFoundError;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)


def _internal_imports(source: Path) -> list[tuple[str, list[str]]]:
    """(imported sibling module, names taken from it) for every relative import, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [alias.name for alias in node.names]
            if node.module:
                found.append((node.module.split(".")[0], names))
            else:  # ``from . import kv_cache``: each name is a module
                found.extend((name, []) for name in names)
    return found


def test_modules_import_each_other_without_a_circle():
    # Function-level imports count too: a circle held together by them is still a circle.
    graph = {
        source.stem: {module for module, _ in _internal_imports(source)}
        for source in PACKAGE_DIR.glob("*.py")
        if source.stem != "__init__"
    }
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, "import circle: " + " -> ".join([*visiting[visiting.index(module) :], module])
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_module_imports_another_modules_private_names():
    for source in PACKAGE_DIR.glob("*.py"):
        for module, names in _internal_imports(source):
            private = [name for name in names if name.startswith("_")]
            assert not private, f"{source.name} imports private {private} from {module}"


def test_each_public_name_comes_from_the_module_that_defines_it():
    # ``_LOCATION`` is the one list of public names: ``__all__`` is derived from it.
    assert gpu_runtime.__all__ == list(gpu_runtime._LOCATION)
    for name, module in gpu_runtime._LOCATION.items():
        assert getattr(gpu_runtime, name).__module__ == f"shardwise.gpu_runtime.{module}", name
