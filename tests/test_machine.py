"""The machine record kept with every strategy run, and the report's word on runs from several machines."""

from __future__ import annotations

import os

from test_strategy_seeds import _bench_row

from ila.machine import describe_machine, machine_label
from ila.strategy_report import render_markdown

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 sha_ni
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 sha_ni
"""


def test_the_record_names_the_cpu_and_only_the_flags_that_decide_bf16(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    m = describe_machine("cpu", info)
    assert m["cpu"] == "AMD EPYC 9R14" and m["cpu_count"] == os.cpu_count() and m["gpu"] is None
    assert m["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16"]  # in the fixed order, sha_ni left out
    assert isinstance(m["bf16_native"], bool) and m["torch"]
    assert "AMD EPYC 9R14 (avx2, avx512f, avx512_bf16)" in machine_label(m)
    avx2 = info.with_name("avx2")
    avx2.write_text(CPUINFO.replace(" avx512f avx512_bf16", ""))
    assert describe_machine("cpu", avx2)["cpu_flags"] == ["avx2"]
    unknown = describe_machine("cpu", tmp_path / "absent")  # not Linux: the flags are not known, not none
    assert unknown["cpu_flags"] is None and "flags not known" in machine_label(unknown)
    assert machine_label(None) == "not recorded"


def _row(name, seed, cpu):
    row = _bench_row(name, seed, [1, 0], {})
    row.pop("benchmarks"), row.pop("benchmark_examples"), row.pop("benchmark_settings")
    if cpu:
        row["machine"] = {"cpu": cpu, "cpu_flags": ["avx2"], "cpu_count": 2, "gpu": None,
                          "bf16_native": False, "torch": "2.13.0"}  # fmt: skip
    return row


def _machines(rows):
    return [x for x in render_markdown({"results": rows}, "x").splitlines() if x.startswith("Machines:")]


def _steps(rows):
    """Each strategy's step cell, and the line that explains the table's marks."""
    lines = render_markdown({"results": rows}, "x").splitlines()
    cells = {x.split(" | ")[0][2:]: x.split(" | ")[9] for x in lines if x.startswith("| ") and "---" not in x}
    return cells, next(x for x in lines if x.startswith("step: "))


def test_a_step_time_averaged_over_machines_is_marked_as_such():
    one = [_row(n, s, "A") for n in ("all", "ila-top-30") for s in (0, 1)]
    cells, note = _steps(one)
    assert "‡" not in cells["all"] + cells["ila-top-30"] + note
    spread = [
        _row("all", 0, "A"),
        _row("all", 1, "B"),
        _row("ila-top-30", 0, "A"),
        _row("ila-top-30", 1, "A"),
    ]
    cells, note = _steps(spread)
    assert cells["all"].endswith("‡") and "‡" not in cells["ila-top-30"]
    assert "more than one machine" in note
    cells, _ = _steps([_row("all", 0, None), _row("all", 1, "A")])  # an unrecorded run may be another machine
    assert cells["all"].endswith("‡")


def test_the_report_names_the_machines_only_where_the_runs_span_several():
    one = [_row(n, s, "A") for n in ("all", "ila-top-30") for s in (0, 1)]
    assert _machines(one) == []
    by_seed = [_row(n, s, "A" if s == 0 else "B") for n in ("all", "ila-top-30") for s in (0, 1)]
    (line,) = _machines(by_seed)
    assert "A (avx2), 2 cores (torch 2.13.0): all-seed0, ila-top-30-seed0" in line
    assert "B (avx2)" in line and "each seed's runs share one" in line.lower()
    crossed = [_row("all", 0, "A"), _row("ila-top-30", 0, "B")]
    crossed += [_row("all", 1, "A"), _row("ila-top-30", 1, "A")]
    (line,) = _machines(crossed)
    assert "Seed 0 spans machines" in line and "Seed 1" not in line
    # runs that predate the record are named as such and checked against nothing
    older = [_row("all", 0, None), _row("ila-top-30", 0, None)]
    older += [_row("all", 3, "A"), _row("ila-top-30", 3, "A")]
    (line,) = _machines(older)
    assert "Not recorded: all-seed0, ila-top-30-seed0" in line and "Where the machine is recorded" in line
    assert "spans" not in line
