"""The package as a whole: its floors, its size, its install, and docs that match the code."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dnq_jax.train import config

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dnq_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The dnq_jax modules `path` imports anywhere in it (function bodies included)."""
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # `from pkg import mod` imports the module pkg.mod when there is one.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n in modules and n != this}
    return found


def test_no_import_circles_and_floors_import_only_downwards():
    modules = _modules()
    graph = {m: _imports(p, modules) for m, p in modules.items()}
    # Depth-first search for a cycle, reporting it.
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = trail[trail.index(n) :] + [n]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # The application: the trainer, and above it the grid and the report (neither imports
    # the other); the command lines (dnq_jax.cli) on top of everything.
    app = ("dnq_jax.train", "dnq_jax.grid", "dnq_jax.report", "dnq_jax.cli")
    base = ("dnq_jax.dnq", "dnq_jax.ptq", "dnq_jax.diagnostics", *app)
    floors = {  # floor -> what it must not import
        "dnq_jax.errors": ("dnq_jax.",),
        "dnq_jax.prng": ("dnq_jax.",),
        "dnq_jax.choices": ("dnq_jax.",),
        "dnq_jax.progress": ("dnq_jax.",),
        "dnq_jax.backend": base,
        "dnq_jax.quant": base,
        "dnq_jax.taps": base,
        "dnq_jax.taps_trace": base,
        "dnq_jax.taps_flow": base,
        "dnq_jax.taps_nnx": base,
        "dnq_jax.models": base,
        "dnq_jax.data": base,
        "dnq_jax.dnq": ("dnq_jax.diagnostics", *app),
        "dnq_jax.ptq": ("dnq_jax.dnq", "dnq_jax.diagnostics", *app),
        "dnq_jax.diagnostics": app,
        "dnq_jax.train": ("dnq_jax.grid", "dnq_jax.report", "dnq_jax.cli"),
        "dnq_jax.grid": ("dnq_jax.report", "dnq_jax.cli"),
        "dnq_jax.report": ("dnq_jax.grid", "dnq_jax.cli"),
    }
    allowed: set[tuple[str, str]] = set()
    for m, deps in graph.items():
        for floor, banned in floors.items():
            if m == floor or m.startswith(floor + "."):
                bad = [
                    d
                    for d in deps
                    if d != "dnq_jax.errors" and d.startswith(banned) and (m, d) not in allowed
                ]
                assert not bad, f"{m} imports {bad}, a floor above it"


def test_no_file_over_500_lines():
    files = [
        *ROOT.glob("*.py"),
        *PACKAGE.rglob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        *(ROOT / "configs").glob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    long = {
        str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, long


# At most this many modules, and lines in all, in one package (a folder of dnq_jax, its
# subpackages apart). The largest today: dnq_jax/train with 15 modules, dnq_jax/ptq with
# about 2,700 lines (PTQ and its export); past either bound a package holds more than one
# job: split it by job.
MAX_PACKAGE_MODULES = 16
MAX_PACKAGE_LINES = 3000


def test_no_package_over_16_modules_or_3000_lines():
    """Every package (dnq_jax and each folder of it) holds at most MAX_PACKAGE_MODULES
    modules (16) and MAX_PACKAGE_LINES lines (3,000), counting its own .py files only."""
    big = {}
    for folder in sorted({PACKAGE, *(p.parent for p in PACKAGE.rglob("__init__.py"))}):
        files = sorted(folder.glob("*.py"))
        lines = sum(len(f.read_text().splitlines()) for f in files)
        if len(files) > MAX_PACKAGE_MODULES or lines > MAX_PACKAGE_LINES:
            big[str(folder.relative_to(ROOT))] = (len(files), lines)
    assert not big, (
        f"packages over {MAX_PACKAGE_MODULES} modules or {MAX_PACKAGE_LINES} lines: {big}"
    )


def test_requirements_pin_what_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    declared = {
        canonicalize_name(r.name): r
        for r in map(
            Requirement,
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"],
        )
    }
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pinned = {
        canonicalize_name(r.name): r
        for r in (Requirement(ln) for ln in lines if ln.strip() and not ln.startswith("#"))
    }
    assert set(pinned) == set(declared)
    for name, pin in pinned.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name}: requirements.txt pins versions ({pin})"
        assert declared[name].specifier.contains(spec.version), (str(pin), str(declared[name]))
        assert str(pin.marker) == str(declared[name].marker), name


def test_the_cuda_install_line_names_the_pinned_jax():
    (pin,) = re.findall(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert f'"jax[cuda12]=={pin}"' in (ROOT / "docs" / "running.md").read_text()


def test_config_reference_page_is_the_code_s():
    page = (ROOT / "docs" / "config.md").read_text()
    assert config.reference_table() in page, (
        "regenerate docs/config.md's table with config.reference_table()"
    )
    assert {k for k, _, _ in config.KEYS} == set(config.flat(config.base_config()))


def test_readme_is_a_front_door():
    """README.md stays short and leads to every page of docs/."""
    readme = (ROOT / "README.md").read_text()
    n = len(readme.splitlines())
    assert n <= 220, f"README.md has {n} lines (at most 220): move the detail to a docs/ page"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", readme))
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert not pages - linked, f"docs pages not linked from README.md: {sorted(pages - linked)}"


def _anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives `page`'s headings (code blocks left out)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    titles = re.findall(r"^#{1,6} +(.+?) *$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles}


def test_every_relative_link_resolves():
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for page in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in link.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} (no such heading)")
    assert not broken, broken


def test_every_file_cited_exists():
    cited = re.compile(
        r"\b((?:docs|benchmarks|configs|tests|dnq_jax|experiments)/[\w/]+\.(?:md|py|sh))\b"
    )
    texts = [*ROOT.glob("*.md"), *ROOT.glob("*.py"), *(ROOT / "docs").glob("*.md")]
    for folder in ("dnq_jax", "tests", "configs", "benchmarks"):
        texts += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh")]
    missing = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in texts
        for name in cited.findall(p.read_text())
        if not (ROOT / name).exists()
    }
    assert not missing, sorted(missing)


def test_installed_package_imports_from_any_directory(tmp_path):
    """After `pip install -e .` (what make does) dnq_jax and its CLIs work from anywhere."""
    # Build metadata left in the checkout (dnq_jax.egg-info) is not an installation.
    installed = [
        d
        for d in importlib.metadata.distributions(name="dnq_jax")
        if Path(d.locate_file("")).resolve() != ROOT
    ]
    if not installed:
        pytest.skip("dnq_jax is not installed in this environment (make installs it)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import dnq_jax.train, dnq_jax.ptq; print(dnq_jax.train.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(ROOT)
    bin_dir = Path(sys.executable).parent
    for script in ("dnq-train", "dnq-evaluate", "dnq-grid", "dnq-demo"):
        r = subprocess.run(
            [str(bin_dir / script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert "--workdir" in r.stdout, (script, r.stdout, r.stderr)  # absl's --help exits 1


def test_each_list_of_allowed_values_is_written_once():
    """No tuple of two or more string literals (a list of allowed values: methods, masks,
    ramps, calibrators, ...) is written in two places of the package; dnq_jax/choices.py
    holds the shared ones."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Tuple):
                continue
            items = node.value.elts
            if len(items) < 2 or not all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in items
            ):
                continue
            values = tuple(sorted(e.value for e in items))
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            seen.setdefault(values, []).append(where)
    twice = {v: w for v, w in seen.items() if len(w) > 1}
    assert not twice, twice
