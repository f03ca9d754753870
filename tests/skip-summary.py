#!/usr/bin/env python3
"""Lists every test that printed `SKIPPED: <why>` in a nextest JUnit report.

    tests/skip-summary.py [target/nextest/default/junit.xml]

A test that cannot run here (no /dev/kvm, nested PVM, no Chromium) passes and says why on its
output; this prints those lines together so a CI log shows what was not tested. Exit status is 0
whether or not anything was skipped; 2 when the report is missing or unreadable.
"""
import sys
import xml.etree.ElementTree as ET


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "target/nextest/default/junit.xml"
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"skip summary: cannot read {path}: {e}")
        return 2
    skipped = []
    total = 0
    for case in root.iter("testcase"):
        total += 1
        name = f"{case.get('classname', '?')} {case.get('name', '?')}"
        texts = [e.text or "" for tag in ("system-out", "system-err") for e in case.iter(tag)]
        for child in case:
            # nextest puts a failed or flaky run's output under its own elements too
            texts += [e.text or "" for tag in ("system-out", "system-err") for e in child.iter(tag)]
        reasons = []
        for text in texts:
            for line in text.splitlines():
                at = line.find("SKIPPED:")
                if at >= 0:
                    reason = line[at + len("SKIPPED:"):].strip()
                    if reason not in reasons:
                        reasons.append(reason)
        if reasons:
            skipped.append((name, reasons))
    print(f"skip summary: {len(skipped)} of {total} tests skipped something")
    for name, reasons in skipped:
        for r in reasons:
            print(f"  SKIPPED {name}: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
