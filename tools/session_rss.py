"""Resident memory with several graphs' ONNX Runtime sessions open in one process. Prints one JSON line.

    python tools/session_rss.py ARTIFACTS MODE prefill_full.onnx,decode_full.onnx
MODE: plain (InferenceSession per graph, ORT defaults), plain-noprepack, shared (OrtRunner: one memory-mapped
weights.bin via add_initializer, prepacking off: the default), shared-prepack (OrtRunner(prepack=True)).
"""
import sys, json, time
from pathlib import Path
import onnxruntime as ort
from halfv_export.engines import ort as ort_mod
art = Path(sys.argv[1]); mode = sys.argv[2]; graphs = sys.argv[3].split(",")
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) * 1024
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"): return int(line.split()[1]) * 1024
base = rss(); keep = []; t = time.perf_counter()
if mode == "plain-noprepack":
    plain_opts = ort_mod.session_options
    def opts(threads=None):
        o = plain_opts(threads); o.add_session_config_entry("session.disable_prepacking", "1"); return o
    ort_mod.session_options = opts
if mode.startswith("plain"):
    for g in graphs:
        keep.append(ort.InferenceSession(str(art / g), ort_mod.session_options(), providers=["CPUExecutionProvider"]))
else:
    r = ort_mod.OrtRunner(art, prepack=(mode == "shared-prepack"))
    for g in graphs:
        keep.append(r.session(g))
print(json.dumps({"mode": mode, "graphs": graphs, "sessions_seconds": round(time.perf_counter() - t, 1),
                  "rss_delta_MiB": round((rss() - base) / 2**20, 1), "peak_rss_MiB": round(hwm() / 2**20, 1),
                  "weights_bin_MiB": round((art / "weights.bin").stat().st_size / 2**20, 1)}))
