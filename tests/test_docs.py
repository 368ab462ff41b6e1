"""The README and the pages under docs/ stay true: links resolve, cited tests exist, every param of the
pipeline is documented, and the README's first screen says where results land."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = (
    "running", "params", "cost", "faults", "security", "inbox", "scaling", "local-server", "cli",
    "benchmarks", "tests", "dependencies",
)  # fmt: skip

LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
IMAGE = re.compile(r"!\[[^\]\n]*\]\(([^)\s]+)\)")
#: ``test_x.py::test_name`` or ``::test_name`` (continuing the file cited before it on the same line);
#: a name may start or end with ``…`` (an elided part)
CITED = re.compile(r"`(?:(?:tests/)?(test_\w+\.py))?::(…?\w+…?)`")
CITED_FILE = re.compile(r"`(?:tests/)?(test_\w+\.py)")


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path`` (lower case, punctuation dropped, spaces to ``-``,
    ``-1``, ``-2`` … for repeats). Headings inside fenced code blocks are not headings."""
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6} +(.+?) *#* *$", line)
        if fenced or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def test_the_docs_pages_exist_and_the_readme_links_every_one():
    readme = README.read_text(encoding="utf-8")
    for name in PAGES:
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    for page in sorted(DOCS.glob("*.md")):
        assert f"](docs/{page.name}" in readme, f"README.md does not link {page.relative_to(REPO)}"


def test_every_relative_link_points_to_an_existing_file_and_anchor():
    broken = []
    for doc in documents():
        text = doc.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists() or not file.is_relative_to(REPO):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                where = path or doc.name
                broken.append(f"{doc.relative_to(REPO)}: {target} (no heading #{anchor} in {where})")
        for target in IMAGE.findall(text):  # no external assets: pages read the same offline
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)}: image {target} is not a file in the repo")
    assert not broken, "\n".join(broken)


def defined_tests() -> dict[str, set[str]]:
    """Every test file's test function names (top level and in classes)."""
    found = {}
    for file in (REPO / "tests").glob("test_*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        found[file.name] = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
        }
    return found


def exists(name: str, names: set[str]) -> bool:
    """``name`` among ``names``; ``…`` at either end elides a part (``test_6_…``, ``…stops_after…``)."""
    core = name.strip("…")
    if name.startswith("…") and name.endswith("…"):
        return any(core in n for n in names)
    if name.endswith("…"):
        return any(n.startswith(core) for n in names)
    if name.startswith("…"):
        return any(n.endswith(core) for n in names)
    return name in names


def test_every_cited_test_exists():
    tests = defined_tests()
    missing = []
    cited = 0
    for doc in documents():
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{doc.relative_to(REPO)}:{number}"
            for file in CITED_FILE.findall(line):
                if file not in tests:
                    missing.append(f"{where}: tests/{file} does not exist")
            current = None
            for file, name in CITED.findall(line):
                current = file or current
                if current is None:
                    missing.append(f"{where}: ::{name} follows no test file on its line")
                elif current in tests and not exists(name, tests[current]):
                    missing.append(f"{where}: {current}::{name} is no test")
                cited += 1
    assert cited >= 60, f"only {cited} tests cited: the fault table should prove every row"
    assert not missing, "\n".join(missing)


def test_the_matching_of_cited_names_is_strict():
    names = {"test_6_a_bad_sidecar", "test_expired_batch_stops_after_max_resubmits_rounds"}
    assert exists("test_6_…", names) and exists("…stops_after_max_resubmits…", names)
    assert not exists("test_6", names) and not exists("test_7_…", names) and not exists("…nothing…", names)
    assert CITED.findall("`test_a.py::test_b`, `::test_c`") == [("test_a.py", "test_b"), ("", "test_c")]


def test_the_fault_table_proves_every_row_with_a_test():
    text = (DOCS / "faults.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| fault ")]
    assert len(rows) >= 40, f"the fault table has {len(rows)} rows"
    for row in rows:
        proved_by = row.rstrip(" |").rsplit(" | ", 1)[-1]
        assert CITED.search(proved_by) or CITED_FILE.search(proved_by), f"no test proves: {row[:100]}"


@pytest.fixture(scope="module")
def dag_params() -> set[str]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "openai_batch_pipeline.py"))
    assert bag.import_errors == {}
    return set(bag.dags["openai_batch_pipeline"].params)


def test_every_param_of_the_pipeline_is_in_the_params_table(dag_params):
    text = (DOCS / "params.md").read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {name for line in table for name in re.findall(r"`(\w+)`", line.split(" | ", 1)[0])}
    assert dag_params - documented == set(), "params missing from docs/params.md's table"
    assert documented - dag_params == set(), "docs/params.md documents params the DAG does not have"


def test_the_readme_first_screen_says_where_results_land():
    first = "\n".join(README.read_text(encoding="utf-8").splitlines()[:80])
    for phrase in (
        "make demo",
        "make test",
        "airflow dags trigger openai_batch_pipeline",
        "$AIRFLOW_HOME/openai_batch_results",  # the default folder when the conf names no output_dir
        "openai_batch_output_dir",  # ... unless the Variable
        "OPENAI_BATCH_OUTPUT_DIR",  # ... or the environment say otherwise
        "output/questions/",  # make demo's own output_dir
        "UI",
        "inbox",
        "results.csv: <path>",  # the merge log's last line
    ):
        assert phrase in first, f"the README's first 80 lines do not say {phrase!r}"


def test_every_make_target_and_repo_path_the_docs_name_exists():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    missing = []
    for doc in documents():
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\bmake ([a-z][\w-]*)", text):
            if f"`make {target}" in text and target not in targets:
                missing.append(f"{doc.relative_to(REPO)}: make {target} is no Makefile target")
        paths = re.findall(r"`((?:dags|include|plugins|scripts|tests|data|docs)/[^`\s*<]*)`", text)
        paths += re.findall(r"`(Dockerfile|docker-compose\.yaml|\.env\.example|Makefile)`", text)
        missing += [f"{doc.relative_to(REPO)}: {p} does not exist" for p in paths if not (REPO / p).exists()]
    assert not missing, "\n".join(missing)
