"""Sum a pytest JUnit XML report by test file: ``python .ci/durations.py report.xml [before.xml]``.

Prints a Markdown table (file, tests, seconds, share of the total), slowest first; with a second
report, a "before" column beside it. A test's time is its setup, call and teardown together, so a
fixture's cost lands on the first test that uses it. Make a report with
``pytest -q --junitxml=report.xml``.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def by_file(path: str) -> dict[str, tuple[int, float]]:
    """{test file: (tests, seconds)} of one JUnit XML report."""
    count: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split("::")[0]
        parts = module.split(".")
        while parts and not parts[-1].startswith("test_"):  # a test class: tests.cli.test_x.TestY
            parts.pop()
        name = "/".join(parts or module.split(".")) + ".py"
        count[name] += 1
        seconds[name] += float(case.get("time") or 0)
    return {name: (count[name], seconds[name]) for name in count}


def main(argv: list[str]) -> None:
    after = by_file(argv[0])
    before = by_file(argv[1]) if len(argv) > 1 else {}
    total = sum(s for _, s in after.values()) or 1.0
    head = "| file | tests | seconds | share |" + (" before (tests, seconds) |" if before else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, (n, s) in sorted(after.items(), key=lambda item: -item[1][1]):
        row = f"| {name} | {n} | {s:.1f} | {100 * s / total:.1f} % |"
        if before:
            b = before.get(name)
            row += f" {b[0]}, {b[1]:.1f} |" if b else " - |"
        print(row)
    row = f"| total | {sum(n for n, _ in after.values())} | {total:.1f} | |"
    if before:
        row += f" {sum(n for n, _ in before.values())}, {sum(s for _, s in before.values()):.1f} |"
    print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
