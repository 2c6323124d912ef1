"""CPU tests of `python -m megapre profile`'s trace parsing, per-call grouping, tables and PNG writer
(megapre/host/profile.py); the profiling itself needs a GPU and runs on the GPU machine (profiles/profile.sh)."""
from __future__ import annotations

import json
import struct
import zlib

import pytest

from megapre.host import profile as P

UNFUSED = ["_add_rmsnorm_kernel", "_router_gemm_kernel", "_topk_kernel", "_quant_kernel",
           "_gate_up_kernel", "_act_quant_kernel", "_down_kernel"]
FUSED = ["kernel_cutlass_megapre_MegaKernel_object_at_0x7f(CUtensorMap, int)"]
MARK = "void at::cuda::(anonymous namespace)::spin_kernel(long)"


def synthetic_trace(calls=4, replays=2, gap_ns=1000, seed_dur=2000):
    """Rows as nsys/torch give them: warm-up kernels, then per backend `replays` bracketed replays."""
    rows, t = [], 1_000_000
    rows.append({"name": "warmup_kernel", "start_ns": 10.0, "dur_ns": 5.0})
    for names in (UNFUSED, FUSED):
        for r in range(replays):
            rows.append({"name": MARK, "start_ns": t, "dur_ns": 900.0})
            t += 1500
            for c in range(calls):
                for i, n in enumerate(names):
                    dur = seed_dur + 100 * i + 10 * c + r  # distinct per call so the median is well defined
                    rows.append({"name": n, "start_ns": float(t), "dur_ns": float(dur)})
                    t += dur + gap_ns
            rows.append({"name": MARK, "start_ns": t, "dur_ns": 900.0})
            t += 50_000
    return rows


def test_parse_nsys_csv_with_notices_quotes_and_memcpy():
    text = (
        "Generating SQLite file rep.sqlite from rep.nsys-rep\n"
        "Processing [rep.sqlite] with [/opt/nsys/reports/cuda_gpu_trace.py]... \n"
        "\n"
        "Start (ns),Duration (ns),CorrId,GrdX,GrdY,GrdZ,BlkX,BlkY,BlkZ,Reg/Trd,StcSMem (MB),DymSMem (MB),"
        "Bytes (MB),Throughput (MB/s),SrcMemKd,DstMemKd,Device,Ctx,GreenCtx,Strm,Name\n"
        "1000,2500,11,132,1,1,256,1,1,40,0.000,0.000,,,,,NVIDIA H200 (0),1,,7,_add_rmsnorm_kernel\n"
        "4000,640,12,,,,,,,,,,0.001,1.5,Device,Device,NVIDIA H200 (0),1,,7,[CUDA memcpy Device-to-Device]\n"
        "5000,300,13,,,,,,,,,,0.001,,,Device,NVIDIA H200 (0),1,,7,[CUDA memset]\n"
        "6000,1200,14,64,1,1,128,1,1,32,0.000,0.000,,,,,NVIDIA H200 (0),1,,7,"
        "\"void foo<int, (int)4>(float *, int)\"\n"
        "\n"
        "trailing notice\n"
    )
    rows = P.parse_nsys_csv(text)
    assert rows == [
        {"name": "_add_rmsnorm_kernel", "start_ns": 1000.0, "dur_ns": 2500.0},
        {"name": "void foo<int, (int)4>(float *, int)", "start_ns": 6000.0, "dur_ns": 1200.0},
    ]


def test_parse_nsys_csv_units_and_missing_header():
    rows = P.parse_nsys_csv("Start (us),Duration (us),Name\n1.5,0.25,k\n")
    assert rows == [{"name": "k", "start_ns": 1500.0, "dur_ns": 250.0}]
    with pytest.raises(ValueError):
        P.parse_nsys_csv("SKIPPED: rep.sqlite does not contain CUDA kernel data.\n")


def test_split_replays_and_calls():
    rows = synthetic_trace(calls=4, replays=2)
    segs = P.split_replays(rows, 4)
    assert [len(s) for s in segs] == [28, 28, 4, 4]
    assert all(P.MARKER not in r["name"] and r["name"] != "warmup_kernel" for s in segs for r in s)
    calls = P.split_calls(segs[0], 4)
    assert [[r["name"] for r in c] for c in calls] == [UNFUSED] * 4
    with pytest.raises(ValueError):
        P.split_replays(rows[:-1], 4)  # a marker missing
    with pytest.raises(ValueError):
        P.split_calls(segs[0][:-1], 4)  # not divisible
    with pytest.raises(ValueError):
        P.split_calls(segs[0][:7] + segs[0][8:9] + segs[0][7:8] + segs[0][9:], 4)  # call 1 in another order


def test_call_stats_wall_and_sum():
    ks = [{"name": "a", "start_ns": 1000.0, "dur_ns": 2000.0},
          {"name": "b", "start_ns": 4000.0, "dur_ns": 1000.0},
          {"name": "c", "start_ns": 4500.0, "dur_ns": 3000.0}]  # overlaps b; ends last
    st = P.call_stats(ks)
    assert st["sum_us"] == pytest.approx(6.0)
    assert st["wall_us"] == pytest.approx(6.5)
    assert [k["start_us"] for k in st["kernels"]] == pytest.approx([0.0, 3.0, 3.5])


def test_analyze_median_call():
    res = P.analyze(synthetic_trace(calls=4, replays=2), ["unfused", "fused"], replays=2, calls_per_graph=4,
                    errors={"reference": "RuntimeError: not profiled"})
    u, f = res["unfused"], res["fused"]
    assert u["kernels_per_call"] == 7 and f["kernels_per_call"] == 1
    assert u["n_calls"] == 8 and f["n_calls"] == 8
    assert res["reference"] == {"error": "RuntimeError: not profiled"}
    # unfused call c, replay r: durations 2000 + 100 i + 10 c + r (i = 0..6), six 1 us gaps
    mc = u["median_call"]
    walls = sorted((sum(2000 + 100 * i + 10 * c + r for i in range(7)) + 6000) / 1e3
                   for c in range(4) for r in range(2))
    assert mc["wall_us"] == pytest.approx(walls[3])
    assert mc["wall_us"] - mc["sum_us"] == pytest.approx(6.0)
    assert [k["name"] for k in mc["kernels"]] == UNFUSED
    assert mc["kernels"][0]["start_us"] == 0.0
    assert f["median_call"]["wall_us"] == pytest.approx(f["median_call"]["sum_us"])
    assert len(u["rows"]) == 56 and len(f["rows"]) == 8
    # the replay's span over its calls (what bench measures per call, graph launch aside)
    seg = P.split_replays(synthetic_trace(calls=4, replays=2), 4)
    spans = [(max(r["start_ns"] + r["dur_ns"] for r in x) - min(r["start_ns"] for r in x)) / 1e3 / 4 for x in seg]
    assert u["span_us_per_call_median"] == pytest.approx(sum(spans[:2]) / 2)
    assert f["span_us_per_call_median"] == pytest.approx(sum(spans[2:]) / 2)


def test_span_per_call_counts_overlapping_calls_once():
    """With PDL a call's kernel starts while the previous one runs: its own wall overstates the time per call,
    the replay's span / calls does not."""
    ks = [{"name": "k", "start_ns": 10_000.0 * i, "dur_ns": 15_000.0} for i in range(4)]  # each overlaps the next
    summ = P.summarize_backend([ks], calls_per_graph=4)
    assert summ["median_call"]["wall_us"] == pytest.approx(15.0)
    assert summ["span_us_per_call_median"] == pytest.approx((30.0 + 15.0) / 4)


def make_result(tmp_commit="abc1234"):
    return {"shape": "ep8", "m": 4, "device": "NVIDIA H200", "commit": tmp_commit, "date": "2025-01-01 00:00:00 UTC",
            "torch": "2.11", "tool": "Nsight Systems (test)", "tool_short": "nsys", "method": "synthetic",
            "calls_per_graph": 4, "replays": 2,
            "backends": P.analyze(synthetic_trace(), ["unfused", "fused"], replays=2, calls_per_graph=4)}


def test_markdown_and_text_tables():
    res = make_result()
    md = P.render_markdown(res, "profile-ep8-m4.png")
    assert "NVIDIA H200" in md and "abc1234" in md and "2025-01-01" in md
    assert "![timeline of the median call of each backend](profile-ep8-m4.png)" in md
    for n in UNFUSED:
        assert f"`{n}`" in md
    assert "`kernel_cutlass_megapre_MegaKernel_object_at_0x7f`" in md  # argument list cut
    u, f = res["backends"]["unfused"]["median_call"], res["backends"]["fused"]["median_call"]
    assert f"| | **wall (first kernel start to last kernel end)** | | **{u['wall_us']:.2f}** |" in md
    assert f"| wall, median call (us) | {u['wall_us']:.2f} | {f['wall_us']:.2f} | {u['wall_us'] / f['wall_us']:.2f} |" in md
    assert "| kernels per call | 7 | 1 | 7.00 |" in md
    txt = P.render_text(res)
    assert "unfused/fused" in txt and "_down_kernel" in txt
    # a backend that could not run is reported, not fatal
    res["backends"]["fused"] = {"error": "RuntimeError: no cubin"}
    md = P.render_markdown(res)
    assert "not available: RuntimeError: no cubin" in md and "| kernels per call | 7 | n/a | - |" in md


def test_short_name():
    long = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char *, 1>>(int, T2, T3)"
    assert P.short_name(long) == "at::native::vectorized_elementwise_kernel<...>"  # too long: template args go
    assert P.short_name("void foo<int, 4>(float *)") == "foo<int, 4>"
    assert P.short_name("_router_gemm_kernel") == "_router_gemm_kernel"
    assert P.short_name("(anonymous)") == "(anonymous)"


def _png_chunks(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks.append((tag, body))
        pos += 12 + n
    return chunks


def _check_png(data: bytes):
    chunks = _png_chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, inter) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    assert all(raw[y * (1 + 3 * w)] == 0 for y in range(h))  # filter 0 on every row
    return w, h, raw


def test_encode_png_minimal():
    px = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30, 1, 2, 3, 4, 5, 6])  # 3 x 2
    w, h, raw = _check_png(P.encode_png(3, 2, px))
    assert (w, h) == (3, 2)
    assert raw == b"\x00" + px[:9] + b"\x00" + px[9:]
    with pytest.raises(ValueError):
        P.encode_png(3, 3, px)


def test_timeline_png_builtin():
    res = make_result()
    w, h, raw = _check_png(P.render_png_builtin(res, width=900))
    assert w == 900 and h > 100
    colours = {raw[y * (1 + 3 * w) + 1 + 3 * x: y * (1 + 3 * w) + 4 + 3 * x] for y in range(0, h, 3) for x in range(0, w, 3)}
    assert bytes(P.PALETTE[0]) in colours and bytes(P.PALETTE[6]) in colours  # kernels 1 and 7 drawn


def test_write_outputs(tmp_path, monkeypatch):
    res = make_result()
    monkeypatch.setattr(P, "write_png", lambda r, path: open(path, "wb").write(P.render_png_builtin(r)) and "built-in")
    paths = P.write_outputs(res, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile-ep8-m4.json", "profile-ep8-m4.md",
                                                         "profile-ep8-m4.png"]
    _check_png(open(paths["png"], "rb").read())
    back = json.load(open(paths["json"]))
    assert back["backends"]["unfused"]["rows"][0]["name"] == UNFUSED[0]
    assert "![timeline" in open(paths["md"]).read()


def test_find_nsys_and_env(tmp_path, monkeypatch):
    fake = tmp_path / "nsys"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MEGAPRE_NSYS", str(fake))
    assert P.find_nsys() == str(fake)
    monkeypatch.setenv("MEGAPRE_NSYS", str(tmp_path / "missing"))
    assert P.find_nsys() is None
    monkeypatch.setattr(P, "NSYS_LIB_DIRS", [str(tmp_path)])
    monkeypatch.setenv("LD_LIBRARY_PATH", "/x")
    env = P.nsys_env()
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path}:/x"
    assert env["PYTHONPATH"].split(":")[0] == P.REPO


def test_cli_without_gpu_exits_nonzero(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from megapre.__main__ import main
    assert main(["profile", "--m", "1", "--tool", "torch"]) != 0
    assert "no CUDA device" in capsys.readouterr().err


FAKE_NSYS = r'''#!/usr/bin/env python3
# Stands in for nsys: records its command lines; `profile` writes the report and the child's side JSON
# (instead of running the child, which needs a GPU); `stats` writes <-o>_cuda_gpu_trace.csv.
import json, os, shutil, sys
a = sys.argv[1:]
with open(os.environ["FAKE_NSYS_LOG"], "a") as f:
    f.write(json.dumps(a) + "\n")
if a[0] == "--version":
    print("NVIDIA Nsight Systems version 2025.3.1.90-fake")
elif a[0] == "profile":
    open(a[a.index("-o") + 1] + ".nsys-rep", "w").write("rep")
    side = a[a.index("--child") + 1]
    json.dump({"device": "NVIDIA H200", "torch": "2.11", "order": ["unfused", "fused"], "errors": {},
               "replays": int(a[a.index("--replays") + 1]), "calls_per_graph": 4}, open(side, "w"))
elif a[0] == "stats":
    shutil.copy(os.environ["FAKE_NSYS_CSV"], a[a.index("-o") + 1] + "_cuda_gpu_trace.csv")
'''


def test_profile_nsys_plumbing_with_a_fake_nsys(tmp_path, monkeypatch):
    fake = tmp_path / "nsys"
    fake.write_text(FAKE_NSYS)
    fake.chmod(0o755)
    lines = ["Start (ns),Duration (ns),CorrId,Strm,Name"]
    lines += [f"{r['start_ns']:.0f},{r['dur_ns']:.0f},1,7,\"{r['name']}\"" for r in synthetic_trace(calls=4, replays=2)]
    (tmp_path / "trace.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("FAKE_NSYS_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("FAKE_NSYS_CSV", str(tmp_path / "trace.csv"))
    out = tmp_path / "out"
    res = P.profile_nsys(str(fake), "ep8", 4, str(out), replays=2, device=None)
    calls = [json.loads(x) for x in (tmp_path / "log").read_text().splitlines()]
    prof, stats = calls[0], calls[1]
    assert prof[:len(P.NSYS_PROFILE_FLAGS) + 1] == ["profile"] + P.NSYS_PROFILE_FLAGS
    assert "--cuda-graph-trace=node" in prof
    base = prof[prof.index("-o") + 1]
    child = prof[prof.index("-o") + 2:]
    assert child[1:5] == ["-m", "megapre", "profile", "--child"]
    assert child[child.index("--shapes") + 1] == "ep8" and child[child.index("--m") + 1] == "4"
    assert stats == ["stats", "-r", "cuda_gpu_trace", "-f", "csv", "-o", base, base + ".nsys-rep"]
    assert (out / "profile-ep8-m4.nsys-rep").read_text() == "rep"
    assert res["nsys_rep"] == "profile-ep8-m4.nsys-rep" and "2025.3.1" in res["tool"]
    assert res["backends"]["unfused"]["kernels_per_call"] == 7 and res["backends"]["fused"]["kernels_per_call"] == 1
