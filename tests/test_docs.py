"""The docs cannot go stale: every equation and section the code cites exists in docs/theory.md, nothing points
outside the repository, and the docs the README links exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
SOURCES = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
           *sorted((ROOT / "tests").rglob("*.py"))]


def _theory_anchors() -> tuple[set[str], set[str]]:
    text = THEORY.read_text()
    equations = set(re.findall(r"\\tag\{(\d+)\}", text))
    sections = set()
    for line in text.splitlines():
        m = re.match(r"#+\s+((?:\d+\.)*\d+|E\d+)\.?\s", line)
        if m:
            sections.add(m.group(1).rstrip("."))
    return equations, sections


def test_no_reference_leaves_the_repository() -> None:
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"PAPER\.md|PEERS\.md|ARCHITECTURE\.md|\.\./shared|issue[- ]\d+|[Ff]loor \d", line)]
    assert not bad, "references outside the repository, issue numbers or 'floor N' lines: " + ", ".join(bad)


def test_every_cited_equation_and_section_exists_in_theory_md() -> None:
    equations, sections = _theory_anchors()
    assert {str(n) for n in range(1, 15)} <= equations, sorted(equations)
    missing = []
    cite = re.compile(r"docs/theory\.md((?:[ ,;]+(?:\((\d+)\)|§((?:\d+\.)*\d+)|(E\d+)))+)")
    for p in SOURCES:
        for m in cite.finditer(p.read_text()):
            for eq, sec, exp in re.findall(r"\((\d+)\)|§((?:\d+\.)*\d+)|(E\d+)", m.group(1)):
                ok = eq in equations if eq else (sec or exp) in sections
                if not ok:
                    missing.append(f"{p.relative_to(ROOT)}: {m.group(0)!r}")
    assert not missing, "citations of docs/theory.md that find nothing there: " + "; ".join(missing)


def test_the_docs_the_readme_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)]+)\)", readme):
        assert (ROOT / link).is_file(), link


def test_the_before_after_speed_tables_are_the_committed_measurements() -> None:
    """docs/speed.md quotes benchmarks/results/compare-*.json: each table row's medians are the file's."""
    import json

    text = (ROOT / "docs" / "speed.md").read_text()
    names = {"ours vs lucidrains": "ours_vs_lucidrains", "RP-Mixer vs our Mixer": "rp_vs_ours"}
    files = re.findall(r"`(benchmarks/results/compare-[\w-]+\.json)`", text)
    assert files, "docs/speed.md quotes no compare-*.json"
    checked = 0
    for name in dict.fromkeys(files):
        data = json.loads((ROOT / name).read_text())
        section = text.split(name, 1)[1].split("|---", 1)[1].split("\n\n", 1)[0]
        for prec, label, before, after in re.findall(r"^\| (fp32|bf16) \| ([^|]+?) \| ([\d.]+)x [^|]*\| ([\d.]+)x",
                                                     section, re.M):
            key = names[label]
            assert round(data["medians"]["before"][prec][key]["median"], 3) == float(before), (name, prec, label)
            assert round(data["medians"]["after"][prec][key]["median"], 3) == float(after), (name, prec, label)
            checked += 1
    assert checked >= 6
