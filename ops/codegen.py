"""`megacity gen`: regenerate everything derived from the contracts and the catalog, or prove it fresh.

Generated trees, each written by one generator into an output root that mirrors the repository:

- third_party/googleapis/  google/api and google/rpc protos, copied from the googleapis-common-protos wheel
- gen/python/              messages, grpc.aio stubs and .pyi types (`buf generate` with buf.gen.yaml)
- gen/descriptor/          the contracts' FileDescriptorSet with imports and comments (edge, policy, docs)
- mesh/linkerd/generated/  Linkerd policy and Kubernetes manifests from mesh/catalog.yaml
- gen/openapi/             the edge's OpenAPI 3 document (gateway/openapi.py), served at /openapi.json

`--check` generates into a scratch directory and compares with the working tree, so CI fails on stale output.
"""

from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DESCRIPTOR_SET = Path("gen/descriptor/megacity.binpb")
OPENAPI_DOCUMENT = Path("gen/openapi/megacity.json")

# The googleapis files our contracts may import (and what those import).
GOOGLEAPIS_FILES = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/field_behavior.proto",
    "google/api/httpbody.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
)


class GenerationError(RuntimeError):
    pass


def _googleapis_root() -> Path:
    spec = importlib.util.find_spec("google.api")
    if spec is None or not spec.submodule_search_locations:
        raise GenerationError("googleapis-common-protos is not installed")
    return Path(next(iter(spec.submodule_search_locations))).parent.parent


def _run(command: list[str], cwd: Path) -> None:
    env = dict(os.environ)
    # buf runs plugins (`python -m ...`) from PATH: make it this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise GenerationError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")


def vendor_googleapis(out: Path) -> None:
    source = _googleapis_root()
    for name in GOOGLEAPIS_FILES:
        target = out / "third_party/googleapis" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)


def python_stubs(out: Path) -> None:
    _run(["buf", "generate", "--output", str(out)], cwd=REPO)
    root = out / "gen/python"
    # Regular packages (not namespace packages) keep imports, packaging and mypy simple.
    for directory in sorted(p for p in root.rglob("*") if p.is_dir()):
        (directory / "__init__.py").touch()
    (root / "megacity/py.typed").touch()


def descriptor_set(out: Path) -> None:
    target = out / DESCRIPTOR_SET
    target.parent.mkdir(parents=True, exist_ok=True)
    _run(["buf", "build", "--output", str(target)], cwd=REPO)


def linkerd_manifests(out: Path) -> None:
    from ops import linkerd

    linkerd.write_manifests(out, descriptor_set=out / DESCRIPTOR_SET)


def openapi_document(out: Path) -> None:
    from gateway import openapi
    from services.runtime.catalog import load_catalog
    from services.runtime.contracts import load_pool

    target = out / OPENAPI_DOCUMENT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(openapi.render(load_catalog(), load_pool(out / DESCRIPTOR_SET)))


# Order matters: the vendored googleapis feed buf; the descriptor set feeds the manifests and the OpenAPI document.
GENERATORS: tuple[tuple[str, Path, Callable[[Path], None]], ...] = (
    ("googleapis", Path("third_party/googleapis"), vendor_googleapis),
    ("python", Path("gen/python"), python_stubs),
    ("descriptor", DESCRIPTOR_SET.parent, descriptor_set),
    ("linkerd", Path("mesh/linkerd/generated"), linkerd_manifests),
    ("openapi", OPENAPI_DOCUMENT.parent, openapi_document),
)


def _tree_differences(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ between two trees (missing, extra or changed files)."""
    if not expected.exists() and not actual.exists():
        return []
    if not expected.exists() or not actual.exists():
        return [str(actual)]
    differences: list[str] = []
    comparison = filecmp.dircmp(expected, actual, ignore=["__pycache__"])
    stack = [(comparison, Path())]
    while stack:
        node, prefix = stack.pop()
        differences += [str(prefix / name) for name in node.left_only + node.right_only]
        _, mismatch, errors = filecmp.cmpfiles(node.left, node.right, node.common_files, shallow=False)
        differences += [str(prefix / name) for name in mismatch + errors]
        stack += [(sub, prefix / name) for name, sub in node.subdirs.items()]
    return sorted(differences)


def _generate_all(scratch: Path) -> None:
    for _, _, generator in GENERATORS:
        generator(scratch)


def generate() -> None:
    """Regenerate every generated tree in place."""
    with tempfile.TemporaryDirectory() as scratch:
        _generate_all(Path(scratch))
        for _, path, _ in GENERATORS:
            target = REPO / path
            if target.exists():
                shutil.rmtree(target)
            source = Path(scratch) / path
            if source.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(source, target)


def stale() -> list[str]:
    """Generated paths whose committed content differs from what the generators produce now."""
    with tempfile.TemporaryDirectory() as scratch:
        _generate_all(Path(scratch))
        return [
            f"{path}/{name}"
            for _, path, _ in GENERATORS
            for name in _tree_differences(Path(scratch) / path, REPO / path)
        ]
