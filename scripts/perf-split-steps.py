#!/usr/bin/env python3
# perf-split-steps.py STEPLOG PERFSCRIPT [TOP]: splits perf samples by engine.
#
# STEPLOG is BenchmarkQuestFromDisk's $KVRECALL_BENCH_STEPLOG (one line per
# step: engine, start and end in CLOCK_MONOTONIC ns, minor faults), PERFSCRIPT
# the output of `perf script -F time,ip,sym --ns` of a `perf record -k
# CLOCK_MONOTONIC -g` of the same run. Prints, per engine, microseconds per
# step inclusive of some frames of the paged step and by leaf symbol
# (docs/performance.md, "quest at 64k"). Sample times are scaled so that an
# engine's samples add up to its measured step time.

import sys, bisect, collections, re
log, ps = sys.argv[1], sys.argv[2]
top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
iv = []
for l in open(log):
    e, a, b = l.split()[:3]; iv.append((int(a), int(b), e))
iv.sort()
starts = [a for a, _, _ in iv]
nsteps = collections.Counter(e for _, _, e in iv)
steptime = collections.Counter()
for a, b, e in iv: steptime[e] += (b - a) / 1e3
leaf = collections.defaultdict(collections.Counter)
incl = collections.defaultdict(collections.Counter)
cnt = collections.Counter()
cats = ['scoreInGraph', 'uploadBoxes', 'questHeadScores', 'maxHeadsGraph', 'readRanks', 'scored).lagged', 'StartForward', 'Computed', 'maskFor',
        'arch.(*Model).Run', 'Run.func3', 'ggml_backend_sched_graph_compute', 'runtime.gcBgMarkWorker', 'runtime.mallocgc', 'uploadRuns', 'copyRuns', 'placeAll', 'groupKV', 'Floats']
def flush(t, frames):
    if t is None or not frames: return
    i = bisect.bisect_right(starts, t) - 1
    if i < 0 or t > iv[i][1]: e = '(between steps)'
    else: e = iv[i][2]
    cnt[e] += 1
    leaf[e][frames[0]] += 1
    seen = set()
    for f in frames:
        for c in cats:
            if c in f and c not in seen:
                seen.add(c); incl[e][c] += 1
t = None; frames = []
for l in open(ps):
    if not l.strip():
        flush(t, frames); t = None; frames = []; continue
    if not l.startswith('\t') and not l.startswith(' ' * 8):
        m = re.search(r'(\d+)\.(\d+):', l)
        if m:
            flush(t, frames); frames = []
            t = int(m.group(1)) * 10**9 + int(m.group(2).ljust(9, '0')[:9])
            continue
    parts = l.strip().split(None, 1)
    if len(parts) == 2:
        sym = re.sub(r'\s*\(.*\)$', '', parts[1])
        sym = re.sub(r'\+0x[0-9a-f]+$', '', sym)
        frames.append(sym)
flush(t, frames)
total = sum(cnt.values())
engines = [e for e in nsteps]
print('samples', total, {e: cnt[e] for e in cnt})
# us per sample: derive from the measured step time of each engine
for e in engines:
    if cnt[e] == 0: continue
    us = steptime[e] / cnt[e]  # us per sample
    print('\n== %s: %d steps, %.1f us/step measured, %d samples (%.1f us/sample)' % (e, nsteps[e], steptime[e] / nsteps[e], cnt[e], us))
    for c in cats:
        if incl[e][c]: print('   incl %-35s %7.1f us/step' % (c, incl[e][c] * us / nsteps[e]))
    for s, n in leaf[e].most_common(top):
        print('   %7.1f  %s' % (n * us / nsteps[e], s[:110]))
