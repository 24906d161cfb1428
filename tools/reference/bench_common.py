"""The timing protocol the PyTorch sides of `autoglm bench` share: announce
one JSON line of facts, then answer each "CASE SECONDS" line on stdin with
{"case", "seconds_per_call"}: the median of calls timed for SECONDS (at
least 3) after one warm-up call. A case that returns a float reports that
as its own time (e.g. per decoded token)."""
import json
import statistics
import sys
import time


def timeit(fn, seconds):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        r = fn()
        times.append(r if isinstance(r, float) else time.perf_counter() - t)
    return statistics.median(times)


def serve(cases, info):
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        case, seconds = line.split()
        print(json.dumps({"case": case, "seconds_per_call": timeit(cases[case], float(seconds))}), flush=True)
