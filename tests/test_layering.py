"""The module layering, read from the source with ast: no entry point (a top-level script with
`if __name__ == "__main__"`) imports another, save a _ddp twin its own script; no library module
(top-level or under quality/) imports an entry point; the lowest modules import only the project's
modules below them (dataset/: utils and config; report.py: utils and dataset). The checker is also run
on a tiny tree that breaks each rule, so it is known to catch them."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = ("quality",)
# The project's modules that the lowest ones may import: dataset/ and report.py.
LOW_LEVEL = {"dataset": {"dataset", "utils", "config"}, "report.py": {"utils", "dataset"}}


def imported_modules(path):
    """Top-level names of every module `path` imports, at any depth of its code (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def is_entry_point(path):
    """Whether the module runs as a script: a top-level `if __name__ == "__main__":`."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            sides = [node.test.left, *node.test.comparators]
            if any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
                    any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides):
                return True
    return False


def layering_violations(root):
    """One line per import that breaks the layering of the repository at `root`."""
    top = {p.stem: p for p in root.glob("*.py")}
    entry_points = {name for name, path in top.items() if is_entry_point(path)}
    library = [path for name, path in top.items() if name not in entry_points]
    library += [p for package in LIBRARY_PACKAGES for p in (root / package).rglob("*.py")]
    found = []
    for name in sorted(entry_points):
        twin = name.removesuffix("_ddp") if name.endswith("_ddp") else None
        found += [f"entry point {name}.py imports entry point {other}"
                  for other in sorted(imported_modules(top[name]) & entry_points - {name, twin})]
    for path in library:
        found += [f"library module {path.relative_to(root)} imports entry point {other}"
                  for other in sorted(imported_modules(path) & entry_points)]
    project = top.keys() | set(LIBRARY_PACKAGES) | {"dataset"}
    for where, allowed in LOW_LEVEL.items():
        paths = sorted((root / where).rglob("*.py")) if (root / where).is_dir() else [root / where]
        found += [f"{path.relative_to(root)} imports project module {other}" for path in paths if path.is_file()
                  for other in sorted(imported_modules(path) & project - allowed)]
    return found


def test_the_repository_keeps_its_layering():
    assert layering_violations(REPO) == []


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    main = 'if __name__ == "__main__":\n    main()\n'
    files = {
        "train_a.py": "import utils\n" + main,
        "train_a_ddp.py": "import train_a\n" + main,            # a twin may import its script
        "train_b.py": "def run():\n    from train_a import main\n" + main,  # even inside a function
        "compare.py": "import train_b as tb\n" + main,
        "helpers.py": "from train_a import main\n",               # a library module importing a script
        "utils.py": "import numpy\n",
        "report.py": "import numpy\nfrom dataset.masks import PANNUKE\nimport metrics\n",
        "metrics.py": "import report\n",
        "config.py": "import utils\n",
        "dataset/__init__.py": "",
        "dataset/tiles.py": "import config\nfrom dataset import masks\nfrom helpers import x\nimport quality.stages\n",
        "quality/__init__.py": "",
        "quality/stages.py": "import compare\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(layering_violations(tmp_path)) == sorted([
        "entry point compare.py imports entry point train_b",
        "entry point train_b.py imports entry point train_a",
        "library module helpers.py imports entry point train_a",
        "library module quality/stages.py imports entry point compare",
        "dataset/tiles.py imports project module helpers",
        "dataset/tiles.py imports project module quality",
        "report.py imports project module metrics",
    ])
