"""Kernel-level profile of one pre-amble call per backend: ``python -m megapre profile``.

How a call is profiled: a bench.Case for the shape and M (8 weight sets), each backend warmed up on a side
stream and captured into one CUDA graph of bench.CALLS_PER_GRAPH consecutive calls over those weight sets
(exactly the graph that ``python -m megapre bench`` times, so weights come from HBM, not L2); the graph is
replayed ``replays`` times under the profiler. Each replay is bracketed by two marker kernels
(``torch.cuda._sleep``, kernel ``spin_kernel``) so its kernels can be told from the warm-up's. A replay's
kernels split into CALLS_PER_GRAPH equal groups, one per call (7 kernels per call unfused, 1 fused). Per call:
sum of kernel durations, and wall = first kernel start to last kernel end. The call reported is the median
by wall time over all replayed calls.

Tools: Nsight Systems where it is found (MEGAPRE_NSYS, ``nsys`` on PATH, or the GPU machine's known path):
a child process (``--child``) runs the workload under ``nsys profile --cuda-graph-trace=node`` and the
kernels are read back with ``nsys stats -r cuda_gpu_trace -f csv``; otherwise the torch profiler (CUPTI)
in this process. Outputs per (shape, M): ``profile-<shape>-m<M>.md`` (tables), ``.png`` (timeline),
``.json`` (every kernel row), and ``.nsys-rep`` when nsys was used.

Everything above the "GPU side" line is plain Python (parsing, grouping, rendering) and is tested on the CPU.
No cutlass import here.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

MARKER = "spin_kernel"          # torch.cuda._sleep's kernel: brackets each profiled replay
MARKER_CYCLES = 2000            # about a microsecond of spinning
REPLAYS = 5
BACKENDS = ("unfused", "fused")
KNOWN_NSYS = "/opt/nvidia/nsight-compute/2025.3.1/host/target-linux-x64/nsys"
NSYS_PROFILE_FLAGS = ["-t", "cuda", "--sample=none", "--cpuctxsw=none", "--cuda-graph-trace=node",
                      "--force-overwrite=true"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# libdw.so.1 / libelf.so.1 for nsys's report importer, unpacked from Debian packages (profiles/README.md)
NSYS_LIB_DIRS = [os.path.join(REPO, ".nsys-libs", d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")]


# ----------------------------------------------------------------------------------------------------------
# Trace rows: {"name": str, "start_ns": float, "dur_ns": float}
# ----------------------------------------------------------------------------------------------------------

def is_kernel(name: str) -> bool:
    """Kernels only: memory copies and sets are left out (as bench.count_kernels does)."""
    n = name.lower()
    return not ("memcpy" in n or "memset" in n)


_UNIT_NS = {"ns": 1.0, "us": 1e3, "\u00b5s": 1e3, "ms": 1e6, "s": 1e9}


def _unit_factor(header: str) -> float:
    m = re.search(r"\(([^)]*)\)", header)
    return _UNIT_NS.get(m.group(1).strip().lower(), 1.0) if m else 1.0


def _number(text: str) -> float:
    return float(text.strip().replace(",", "").replace("_", ""))


def parse_nsys_csv(text: str) -> list[dict]:
    """Kernel rows of ``nsys stats -r cuda_gpu_trace -f csv`` output (file or stdout with notices around it).

    The header is the first line with a "Start ..." and a "Duration ..." and a "Name" column; units are read
    from the headers ("Start (ns)", "Duration (us)", ...). Memcpy/memset rows are dropped."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        try:
            fields = next(csv.reader([line]))
        except (csv.Error, StopIteration):
            continue
        keys = [f.strip() for f in fields]
        start = next((k for k in keys if k.lower().startswith("start")), None)
        dur = next((k for k in keys if k.lower().startswith("duration")), None)
        name = next((k for k in keys if k.lower() == "name"), None)
        if start and dur and name:
            break
    else:
        raise ValueError("no cuda_gpu_trace header (Start, Duration, Name columns) in the nsys stats output")
    fs, fd = _unit_factor(start), _unit_factor(dur)
    idx = {k: keys.index(k) for k in (start, dur, name)}
    rows = []
    for fields in csv.reader(lines[i + 1:]):
        if not fields or not "".join(fields).strip():
            break  # a blank line ends the table
        if len(fields) < len(keys):
            continue
        try:
            s, d = _number(fields[idx[start]]) * fs, _number(fields[idx[dur]]) * fd
        except ValueError:
            continue
        nm = fields[idx[name]].strip()
        if is_kernel(nm):
            rows.append({"name": nm, "start_ns": s, "dur_ns": d})
    return rows


def rows_from_torch_events(events) -> list[dict]:
    """Kernel rows from torch.profiler events (device_type CUDA; time_range in us)."""
    import torch
    rows = []
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CUDA or not is_kernel(ev.name):
            continue
        s, e = ev.time_range.start * 1e3, ev.time_range.end * 1e3
        rows.append({"name": ev.name, "start_ns": float(s), "dur_ns": float(e - s)})
    return rows


def split_replays(rows: list[dict], n_replays: int) -> list[list[dict]]:
    """The kernels of each bracketed replay (between marker 2j and marker 2j+1), in start order."""
    rows = sorted(rows, key=lambda r: (r["start_ns"], r["dur_ns"]))
    marks = [i for i, r in enumerate(rows) if MARKER in r["name"]]
    if len(marks) != 2 * n_replays:
        raise ValueError(f"expected {2 * n_replays} marker kernels ({MARKER}) bracketing {n_replays} replays, "
                         f"found {len(marks)}")
    return [rows[marks[2 * j] + 1: marks[2 * j + 1]] for j in range(n_replays)]


def split_calls(replay: list[dict], calls: int) -> list[list[dict]]:
    """A replay's kernels in ``calls`` equal consecutive groups (every call launches the same kernels)."""
    n = len(replay)
    if n == 0 or n % calls:
        raise ValueError(f"{n} kernels in a replay do not split into {calls} calls")
    k = n // calls
    groups = [replay[i * k:(i + 1) * k] for i in range(calls)]
    first = [r["name"] for r in groups[0]]
    for j, g in enumerate(groups[1:], 1):
        if [r["name"] for r in g] != first:
            raise ValueError(f"call {j} of a replay launches other kernels than call 0: "
                             f"{[r['name'] for r in g]} vs {first}")
    return groups


def call_stats(kernels: list[dict]) -> dict:
    """Sum of kernel time and wall (first start to last end) of one call, times relative to its first kernel."""
    t0 = min(r["start_ns"] for r in kernels)
    t1 = max(r["start_ns"] + r["dur_ns"] for r in kernels)
    ks = sorted(kernels, key=lambda r: r["start_ns"])
    return {
        "sum_us": sum(r["dur_ns"] for r in ks) / 1e3,
        "wall_us": (t1 - t0) / 1e3,
        "kernels": [{"name": r["name"], "start_us": (r["start_ns"] - t0) / 1e3, "dur_us": r["dur_ns"] / 1e3}
                    for r in ks],
    }


def summarize_backend(replays: list[list[dict]], calls_per_graph: int) -> dict:
    """Per-call figures over all replays; the median call (by wall time) with its kernels."""
    calls, raw = [], []
    for ri, rep in enumerate(replays):
        for ci, group in enumerate(split_calls(rep, calls_per_graph)):
            st = call_stats(group)
            calls.append({"replay": ri, "call": ci, "sum_us": st["sum_us"], "wall_us": st["wall_us"]})
            raw += [{"replay": ri, "call": ci, **r} for r in group]
    order = sorted(range(len(calls)), key=lambda i: calls[i]["wall_us"])
    med = calls[order[(len(order) - 1) // 2]]
    group = [r for r in raw if r["replay"] == med["replay"] and r["call"] == med["call"]]
    walls = [c["wall_us"] for c in calls]
    # A call's own wall counts, with PDL, the time its kernel was already resident waiting for the previous
    # call; the replay's span / calls is the time per call in the graph (what bench measures, less its
    # graph-launch share), whether or not calls overlap.
    spans = [(max(r["start_ns"] + r["dur_ns"] for r in rep) - min(r["start_ns"] for r in rep)) / 1e3 / calls_per_graph
             for rep in replays]
    return {
        "error": None,
        "kernels_per_call": len(replays[0]) // calls_per_graph,
        "n_calls": len(calls),
        "median_call": {"replay": med["replay"], "call": med["call"], **call_stats(group)},
        "wall_us_median": statistics.median(walls),
        "wall_us_min": min(walls),
        "wall_us_max": max(walls),
        "sum_us_median": statistics.median(c["sum_us"] for c in calls),
        "span_us_per_call_median": statistics.median(spans),
        "calls": calls,
        "rows": raw,
    }


def analyze(rows: list[dict], order: list[str], replays: int, calls_per_graph: int,
            errors: dict | None = None) -> dict:
    """Per backend summary from all trace rows; ``order`` = backends whose replays ran, in order."""
    segs = split_replays(rows, len(order) * replays)
    out = {}
    for bi, b in enumerate(order):
        out[b] = summarize_backend(segs[bi * replays:(bi + 1) * replays], calls_per_graph)
    for b, err in (errors or {}).items():
        out[b] = {"error": err}
    return out


# ----------------------------------------------------------------------------------------------------------
# Text, markdown
# ----------------------------------------------------------------------------------------------------------

def short_name(name: str, width: int = 64) -> str:
    """A kernel name without 'void ', argument list and template arguments, cut to ``width``."""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:]
    depth, cut = 0, len(n)
    for i, ch in enumerate(n):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "(" and depth == 0 and i > 0:
            cut = i
            break
    n = n[:cut]
    n = re.sub(r"<.*>", "<...>", n) if len(n) > width else n
    return n if len(n) <= width else n[:width - 3] + "..."


def _ok(backends: dict) -> list[str]:
    return [b for b in BACKENDS if b in backends and not backends[b].get("error")] + \
        [b for b in backends if b not in BACKENDS and not backends[b].get("error")]


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def comparison_rows(result: dict) -> list[tuple]:
    """(label, unfused value, fused value, ratio unfused/fused) for the side-by-side table."""
    bs = result["backends"]
    u, f = bs.get("unfused", {}), bs.get("fused", {})

    def get(d, fn):
        return None if not d or d.get("error") else fn(d)

    spec = [
        ("kernels per call", lambda d: d["kernels_per_call"], "{:d}"),
        ("sum of kernel time, median call (us)", lambda d: d["median_call"]["sum_us"], "{:.2f}"),
        ("wall, median call (us)", lambda d: d["median_call"]["wall_us"], "{:.2f}"),
        ("gaps in the median call: wall - sum (us)",
         lambda d: d["median_call"]["wall_us"] - d["median_call"]["sum_us"], "{:.2f}"),
        ("replay span / calls, median replay (us)", lambda d: d["span_us_per_call_median"], "{:.2f}"),
        ("wall over all calls: min (us)", lambda d: d["wall_us_min"], "{:.2f}"),
        ("wall over all calls: max (us)", lambda d: d["wall_us_max"], "{:.2f}"),
    ]
    out = []
    for label, fn, fmt in spec:
        a, b = get(u, fn), get(f, fn)
        ratio = _ratio(a, b) if "gaps" not in label else "-"
        out.append((label, fmt.format(a) if a is not None else "n/a", fmt.format(b) if b is not None else "n/a",
                    ratio))
    return out


def _header_lines(result: dict) -> list[str]:
    return [
        f"card: {result['device']}   date: {result['date']}   commit: {result['commit']}   torch: {result['torch']}",
        f"tool: {result['tool']}",
        f"method: {result['method']}",
    ]


def render_text(result: dict) -> str:
    """The tables for the terminal: per backend the median call's kernels, then the two side by side."""
    lines = [f"== profile {result['shape']} M={result['m']}"] + _header_lines(result)
    for b, d in result["backends"].items():
        if d.get("error"):
            lines += ["", f"{b}: n/a ({d['error']})"]
            continue
        mc = d["median_call"]
        lines += ["", f"{b}: median call (replay {mc['replay']}, call {mc['call']} of {d['n_calls']} calls)",
                  f"  {'#':>2}  {'kernel':<64} {'start us':>9} {'dur us':>9}"]
        for i, k in enumerate(mc["kernels"], 1):
            lines.append(f"  {i:>2}  {short_name(k['name']):<64} {k['start_us']:9.2f} {k['dur_us']:9.2f}")
        lines.append(f"  {'':>2}  {'sum of kernel time':<64} {'':>9} {mc['sum_us']:9.2f}")
        lines.append(f"  {'':>2}  {'wall (first kernel start to last kernel end)':<64} {'':>9} {mc['wall_us']:9.2f}")
    lines += ["", f"  {'':<44}{'unfused':>10}{'fused':>10}{'unfused/fused':>15}"]
    for label, a, b, r in comparison_rows(result):
        lines.append(f"  {label:<44}{a:>10}{b:>10}{r:>15}")
    return "\n".join(lines)


def _md(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(result: dict, png_name: str | None = None) -> str:
    out = [f"# Profile: {result['shape']}, M = {result['m']}", ""]
    out += [f"- {_md(x)}" for x in _header_lines(result)]
    out += [f"- picture: {result.get('png_writer', 'built-in PNG writer')}", ""]
    if png_name:
        out += [f"![timeline of the median call of each backend]({png_name})", ""]
    for b, d in result["backends"].items():
        if d.get("error"):
            out += [f"## {b}", "", f"not available: {_md(d['error'])}", ""]
            continue
        mc = d["median_call"]
        out += [f"## {b}: median call (replay {mc['replay']}, call {mc['call']}; {d['n_calls']} calls profiled)", "",
                "| # | kernel | start (us) | duration (us) |", "|---:|---|---:|---:|"]
        for i, k in enumerate(mc["kernels"], 1):
            out.append(f"| {i} | `{_md(short_name(k['name']))}` | {k['start_us']:.2f} | {k['dur_us']:.2f} |")
        out.append(f"| | **sum of kernel time** | | **{mc['sum_us']:.2f}** |")
        out.append(f"| | **wall (first kernel start to last kernel end)** | | **{mc['wall_us']:.2f}** |")
        out.append("")
    out += ["## Side by side", "", "| | unfused | fused | unfused / fused |", "|---|---:|---:|---:|"]
    for label, a, b, r in comparison_rows(result):
        out.append(f"| {label} | {a} | {b} | {r} |")
    out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# PNG: a minimal encoder (zlib + struct) and a tiny 5x7 bitmap font; matplotlib is used where importable
# ----------------------------------------------------------------------------------------------------------

def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """RGB, 8 bits per channel, filter 0 on every row."""
    if len(rgb) != width * height * 3:
        raise ValueError("pixel buffer size does not match width*height*3")
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


# 5x7 glyphs: 7 rows of 5 bits (MSB = leftmost column), as 14 hex digits. Lower case draws as upper case.
_FONT = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F",
    "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E",
    "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F",
    "H": "1111111F111111", "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211",
    "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E",
    "P": "1E11111E101010", "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E",
    "T": "1F040404040404", "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A",
    "X": "11110A040A1111", "Y": "11110A04040404", "Z": "1F01020408101F", " ": "00000000000000",
    ".": "00000000000C0C", ",": "000000000C0408",
    ":": "000C0C000C0C00", ";": "000C0C000C0408", "-": "0000001F000000", "_": "0000000000001F", "=": "00001F001F0000",
    "/": "00010204081000", "(": "02040808080402", ")": "08040202020408", "%": "18190204081303",
    "+": "0004041F040400", "<": "02040810080402", ">": "08040201020408", "?": "0E110102040004",
    "#": "0A0A1F0A1F0A0A", "*": "0004150E150400", "[": "0E08080808080E", "]": "0E02020202020E",
    "'": "04040800000000", "|": "04040404040404", "!": "04040404040004",
}
_GLYPHS = {c: [int(h[i:i + 2], 16) for i in range(0, 14, 2)] for c, h in _FONT.items()}

PALETTE = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (171, 71, 188), (255, 112, 67),
           (0, 172, 193), (158, 157, 36), (121, 85, 72), (233, 30, 99)]


class Canvas:
    def __init__(self, width: int, height: int, bg=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Fill [x0, x1) x [y0, y1), clipped."""
        x0, x1 = max(0, int(x0)), min(self.w, int(x1))
        y0, y1 = max(0, int(y0)), min(self.h, int(y1))
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            o = (y * self.w + x0) * 3
            self.px[o:o + len(row)] = row

    def frame(self, x0, y0, x1, y1, color) -> None:
        self.rect(x0, y0, x1, y0 + 1, color)
        self.rect(x0, y1 - 1, x1, y1, color)
        self.rect(x0, y0, x0 + 1, y1, color)
        self.rect(x1 - 1, y0, x1, y1, color)

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 1) -> int:
        """Draw ``s`` with its top-left at (x, y); returns the x after it."""
        for ch in s:
            g = _GLYPHS.get(ch.upper(), _GLYPHS["?"])
            for r, bits in enumerate(g):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, color)
            x += 6 * scale
        return x

    def png(self) -> bytes:
        return encode_png(self.w, self.h, bytes(self.px))


def text_width(s: str, scale: int = 1) -> int:
    return 6 * scale * len(s)


def nice_step(span: float, target: int = 10) -> float:
    raw = max(span, 1e-9) / target
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _timeline_data(result: dict) -> list[tuple]:
    """(backend, kernels of its median call, wall us, sum us) for each backend that ran."""
    out = []
    for b in _ok(result["backends"]):
        mc = result["backends"][b]["median_call"]
        out.append((b, mc["kernels"], mc["wall_us"], mc["sum_us"]))
    return out


def render_png_builtin(result: dict, width: int = 1400) -> bytes:
    rows = _timeline_data(result)
    left, right, top = 190, 40, 16
    row_h, row_gap = 44, 14
    legend_lines = sum(1 + len(k) for _, k, _, _ in rows)
    height = top + 2 * 22 + 10 + max(1, len(rows)) * (row_h + row_gap) + 40 + 14 * legend_lines + 20
    cv = Canvas(width, height)
    ink, grey, band = (0, 0, 0), (120, 120, 120), (236, 236, 236)
    cv.text(12, top, f"megapre profile: {result['shape']} M={result['m']} - one pre-amble call per backend", ink, 2)
    cv.text(12, top + 22, f"{result['device']}  commit {result['commit']}  {result['date']}  "
                          f"{result['tool_short']}; median call of {result['calls_per_graph']}-call CUDA graph "
                          f"replays; x = us from the call's first kernel", grey, 1)
    y = top + 2 * 22 + 10
    plot_w = width - left - right
    span = max([w for _, _, w, _ in rows] + [1e-3])
    step = nice_step(span)
    t_max = step * -(-span // step)  # round up to a tick
    xs = lambda t: left + int(round(t / t_max * plot_w))  # noqa: E731
    n_ticks = int(round(t_max / step))
    y_axis = y + len(rows) * (row_h + row_gap)
    for b_i in range(len(rows)):
        cv.rect(left, y + b_i * (row_h + row_gap), left + plot_w, y + b_i * (row_h + row_gap) + row_h, band)
    for i in range(n_ticks + 1):  # faint grid lines under the kernels
        cv.rect(xs(i * step), y, xs(i * step) + 1, y_axis, (210, 210, 210))
    for b, ks, wall, sm in rows:
        cv.text(12, y + 8, b, ink, 2)
        cv.text(12, y + 28, f"wall {wall:.2f} us, sum {sm:.2f}", grey, 1)
        for i, k in enumerate(ks):
            x0, x1 = xs(k["start_us"]), xs(k["start_us"] + k["dur_us"])
            x1 = max(x1, x0 + 1)
            cv.rect(x0, y + 4, x1, y + row_h - 4, PALETTE[i % len(PALETTE)])
            if x1 - x0 >= 3:
                cv.frame(x0, y + 4, x1, y + row_h - 4, (40, 40, 40))
            label = str(i + 1)
            if x1 - x0 >= text_width(label) + 4:
                cv.text((x0 + x1 - text_width(label)) // 2, y + row_h // 2 - 3, label, (255, 255, 255))
        y += row_h + row_gap
    # time axis with ticks
    cv.rect(left, y, left + plot_w + 1, y + 1, ink)
    for i in range(n_ticks + 1):
        t = i * step
        x = xs(t)
        cv.rect(x, y, x + 1, y + 6, ink)
        lab = f"{t:g}"
        cv.text(x - text_width(lab) // 2, y + 9, lab, ink, 1)
    cv.text(left + plot_w - text_width("us"), y + 20, "us", ink, 1)
    y += 40
    # legend: every kernel of each median call
    for b, ks, _, _ in rows:
        cv.text(12, y, f"{b}:", ink, 1)
        y += 14
        for i, k in enumerate(ks):
            cv.rect(24, y, 34, y + 8, PALETTE[i % len(PALETTE)])
            cv.text(40, y, f"{i + 1}  {short_name(k['name'], 100)}  start {k['start_us']:.2f} us  "
                           f"dur {k['dur_us']:.2f} us", ink, 1)
            y += 14
    return cv.png()


def _render_png_matplotlib(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _timeline_data(result)
    fig, ax = plt.subplots(figsize=(14, 1.6 + 0.9 * len(rows)))
    for r, (b, ks, wall, sm) in enumerate(rows):
        ax.broken_barh([(k["start_us"], k["dur_us"]) for k in ks], (r - 0.35, 0.7),
                       facecolors=[tuple(c / 255 for c in PALETTE[i % len(PALETTE)]) for i in range(len(ks))],
                       edgecolor="black", linewidth=0.5)
        for i, k in enumerate(ks):
            ax.text(k["start_us"] + k["dur_us"] / 2, r, str(i + 1), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{b}\nwall {w:.2f} us, sum {s:.2f}" for b, _, w, s in rows])
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel("us from the call's first kernel")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"megapre profile {result['shape']} M={result['m']}: {result['device']}, commit {result['commit']}, "
                 f"{result['date']} ({result['tool_short']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_png(result: dict, path: str) -> str:
    """Writes the timeline; returns which writer drew it (matplotlib where importable, else the built-in)."""
    try:
        import matplotlib  # noqa: F401
        try:
            _render_png_matplotlib(result, path)
            return "matplotlib"
        except Exception as e:  # fall back to the built-in writer, never lose the picture
            print(f"  matplotlib failed ({type(e).__name__}: {e}); using the built-in PNG writer")
    except ImportError:
        pass
    with open(path, "wb") as f:
        f.write(render_png_builtin(result))
    return "built-in PNG writer (zlib + struct, 5x7 font)"


def write_outputs(result: dict, out_dir: str) -> dict:
    """``profile-<shape>-m<M>.{png,md,json}`` in out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"profile-{result['shape']}-m{result['m']}")
    paths = {"png": base + ".png", "md": base + ".md", "json": base + ".json"}
    result["png_writer"] = write_png(result, paths["png"])
    with open(paths["md"], "w") as f:
        f.write(render_markdown(result, os.path.basename(paths["png"])))
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    return paths


# ----------------------------------------------------------------------------------------------------------
# GPU side
# ----------------------------------------------------------------------------------------------------------

def find_nsys() -> str | None:
    env = os.environ.get("MEGAPRE_NSYS")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    return shutil.which("nsys") or (KNOWN_NSYS if os.access(KNOWN_NSYS, os.X_OK) else None)


def nsys_env() -> dict:
    env = dict(os.environ)
    extra = [d for d in NSYS_LIB_DIRS if os.path.isdir(d)]
    if extra:
        old = [env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []
        env["LD_LIBRARY_PATH"] = os.pathsep.join(extra + old)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _capture(case, backend: str):
    """The graph bench times (bench.capture_graph), with 3 warm replays."""
    from . import bench
    return bench.capture_graph(case, backend, warm_replays=3)


def prepare(shape: str, m: int, device, backends=BACKENDS):
    """Case + one captured graph per backend; backends that cannot run here go to ``errors``."""
    import torch
    from ..config import SHAPE_PRESETS
    from . import bench
    case = bench.Case.make(SHAPE_PRESETS[shape](), m, device)
    graphs, errors = {}, {}
    for b in backends:
        try:
            graphs[b] = _capture(case, b)
        except Exception as e:
            errors[b] = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize()
    return case, graphs, errors


def replay_bracketed(graphs: dict, replays: int) -> list[str]:
    """For each backend, ``replays`` replays each between two marker kernels; returns the order."""
    import torch
    torch.cuda.synchronize()
    for g in graphs.values():
        for _ in range(replays):
            torch.cuda._sleep(MARKER_CYCLES)
            g.replay()
            torch.cuda._sleep(MARKER_CYCLES)
        torch.cuda.synchronize()
    return list(graphs)


def child_main(args) -> int:
    """Runs under nsys: warm-up + capture, then the bracketed replays; writes a side JSON for the parent."""
    import torch
    from . import bench
    dev = torch.device(args.device or "cuda")
    shape, m = args.shapes[0], args.m[0]
    case, graphs, errors = prepare(shape, m, dev)
    order = replay_bracketed(graphs, args.replays)
    side = {"device": bench.device_name(dev), "torch": torch.__version__, "order": order, "errors": errors,
            "replays": args.replays, "calls_per_graph": bench.CALLS_PER_GRAPH}
    with open(args.child, "w") as f:
        json.dump(side, f)
    return 0


def _method(tool_desc: str, replays: int, calls_per_graph: int, weight_sets: int) -> str:
    return (f"one CUDA graph of {calls_per_graph} consecutive calls over {weight_sets} weight sets (the graph "
            f"python -m megapre bench times), replayed {replays} times under {tool_desc}; the calls of a replay "
            f"are its kernels split into {calls_per_graph} equal groups; wall = first kernel start to last kernel "
            f"end; the call shown is the median by wall over all {replays * calls_per_graph} calls; memcpy/memset "
            f"left out")


def _run(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + "\n" + p.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {p.returncode}:\n{tail}")
    return p


def nsys_version(nsys: str) -> str:
    try:
        out = subprocess.run([nsys, "--version"], capture_output=True, text=True, timeout=60, env=nsys_env())
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "nsys"
    except Exception:
        return "nsys"


def profile_nsys(nsys: str, shape: str, m: int, out_dir: str, replays: int, device: str | None) -> dict:
    from . import bench
    env = nsys_env()
    name = f"profile-{shape}-m{m}"
    with tempfile.TemporaryDirectory(prefix="megapre-nsys-") as tmp:
        base, side_path = os.path.join(tmp, name), os.path.join(tmp, "side.json")
        child = [sys.executable, "-m", "megapre", "profile", "--child", side_path, "--shapes", shape,
                 "--m", str(m), "--replays", str(replays)] + (["--device", device] if device else [])
        cmd = [nsys, "profile"] + NSYS_PROFILE_FLAGS + ["-o", base] + child
        print("  $ " + " ".join(cmd), flush=True)
        _run(cmd, env, timeout=540)
        rep = base + ".nsys-rep"
        if not os.path.exists(side_path) or not os.path.exists(rep):
            raise RuntimeError(f"nsys run left no {'side JSON' if not os.path.exists(side_path) else rep}")
        with open(side_path) as f:
            side = json.load(f)
        stats = [nsys, "stats", "-r", "cuda_gpu_trace", "-f", "csv", "-o", base, rep]
        print("  $ " + " ".join(stats), flush=True)
        p = _run(stats, env, timeout=300)
        csvs = sorted(glob.glob(glob.escape(base) + "*cuda_gpu_trace*.csv"))  # <base>_cuda_gpu_trace.csv
        text = open(csvs[0]).read() if csvs else p.stdout
        rows = parse_nsys_csv(text)
        os.makedirs(out_dir, exist_ok=True)
        shutil.copy(rep, os.path.join(out_dir, name + ".nsys-rep"))
    version = nsys_version(nsys)
    desc = (f"Nsight Systems ({version}): nsys profile {' '.join(NSYS_PROFILE_FLAGS[:-1])}, "
            f"kernels from nsys stats -r cuda_gpu_trace")
    return {
        "device": side["device"], "torch": side["torch"],
        "tool": desc, "tool_short": "nsys",
        "method": _method("nsys", replays, side["calls_per_graph"], bench.WEIGHT_SETS),
        "calls_per_graph": side["calls_per_graph"], "replays": replays,
        "nsys_rep": name + ".nsys-rep",
        "backends": analyze(rows, side["order"], replays, side["calls_per_graph"], side["errors"]),
    }


def profile_torch(shape: str, m: int, replays: int, device: str | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from . import bench
    dev = torch.device(device or "cuda")
    case, graphs, errors = prepare(shape, m, dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        order = replay_bracketed(graphs, replays)
    rows = rows_from_torch_events(prof.events())
    del graphs, case
    torch.cuda.empty_cache()
    return {
        "device": bench.device_name(dev), "torch": torch.__version__,
        "tool": "torch.profiler (CUPTI), ProfilerActivity.CUDA", "tool_short": "torch profiler",
        "method": _method("the torch profiler", replays, bench.CALLS_PER_GRAPH, bench.WEIGHT_SETS),
        "calls_per_graph": bench.CALLS_PER_GRAPH, "replays": replays,
        "backends": analyze(rows, order, replays, bench.CALLS_PER_GRAPH, errors),
    }


def main(args) -> int:
    if args.child:
        return child_main(args)
    import torch
    from . import bench
    dev = args.device or "cuda"
    if not dev.startswith("cuda") or not torch.cuda.is_available():
        print("megapre profile: no CUDA device here (torch.cuda.is_available() is False or --device is not "
              "cuda); there is nothing to profile. Run it on the GPU machine (profiles/profile.sh).",
              file=sys.stderr)
        return 2
    nsys = find_nsys() if args.tool in ("auto", "nsys") else None
    if args.tool == "nsys" and not nsys:
        print("megapre profile: --tool nsys but no nsys found (MEGAPRE_NSYS, PATH, " + KNOWN_NSYS + ")",
              file=sys.stderr)
        return 2
    print(f"megapre profile: tool {'nsys at ' + nsys if nsys else 'torch profiler'}; "
          f"nsys libraries: {[d for d in NSYS_LIB_DIRS if os.path.isdir(d)] or 'none added'}", flush=True)
    rc = 0
    for shape in args.shapes:
        for m in args.m:
            result = None
            if nsys:
                try:
                    result = profile_nsys(nsys, shape, m, args.out, args.replays, args.device)
                except Exception as e:
                    print(f"megapre profile {shape} M={m}: nsys failed: {type(e).__name__}: {e}", flush=True)
                    if args.tool == "nsys":
                        rc = 1
                        continue
                    print("  falling back to the torch profiler from here on", flush=True)
                    nsys = None
            if result is None:
                try:
                    result = profile_torch(shape, m, args.replays, args.device)
                except Exception as e:
                    print(f"megapre profile {shape} M={m}: failed: {type(e).__name__}: {e}", flush=True)
                    rc = 1
                    continue
            result.update(shape=shape, m=m, commit=bench.git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
            paths = write_outputs(result, args.out)
            print(render_text(result))
            print(f"wrote {', '.join(paths.values())}" +
                  (f", {os.path.join(args.out, result['nsys_rep'])}" if result.get("nsys_rep") else ""), flush=True)
    return rc
