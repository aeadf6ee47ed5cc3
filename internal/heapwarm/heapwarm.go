// Package heapwarm brings a process's Go heap to its steady state before a
// timed loop: memory up to the next GC's goal already touched, so that the
// loop's allocations reuse mapped pages instead of faulting fresh ones in.
//
// Why (issue 14, docs/kvcache.md "quest at 64k"): a process that just read
// a long document back from disk has a large live heap (the document's host
// pages) and has never grown to its next GC goal, 2× that. Until its first
// GC cycle every 4 KiB a decode step allocates is a page the process never
// touched: a minor fault, measured at ~10–15 µs each on the 2-core VM of
// these benchmarks. A paged decode step allocates 36–142 KiB (its graph's
// Go-side nodes, masks, quest's bounds), the dense engine's kept step graph
// 2.4 KiB, so 16–64 timed steps after loading charged the paged methods
// (quest most) a cost that a serving process, whose heap has cycled,
// does not pay. Warm makes the timed steps see that steady state.
package heapwarm

import (
	"runtime"
)

// chunk is the ballast's allocation unit: a large object, freed to the
// page heap as whole pages that later small-object spans are carved from.
const chunk = 1 << 20

// Warm runs a GC, then allocates and touches (one byte per 4 KiB page) the
// room between the live heap and the next GC's goal, drops it and runs a
// GC again: the freed pages stay mapped (the runtime's scavenger returns
// only memory beyond about 110 % of the goal), and the allocations that
// follow, up to the goal, land on them. It returns the bytes touched.
// The process's resident memory grows to about the goal (twice the live
// heap with GOGC=100), where a serving process's heap cycles anyway: ~80
// MiB after a tiny-preset 64k document, ~1 GiB after a 1b 32k one.
func Warm() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	// The GC triggers before the heap reaches NextGC; 90 % of the room
	// keeps the ballast from starting a cycle with it live.
	// With the GC off (GOGC=off) the goal is unbounded (NextGC near the
	// largest uint64): touch no more than GOGC=200 would leave room for.
	// The cap comes before the scaling, which would overflow on such a
	// goal.
	var room int64
	if ms.NextGC > ms.HeapAlloc {
		room = int64(min(ms.NextGC-ms.HeapAlloc, 2*ms.HeapAlloc+64<<20))
	}
	room = room * 9 / 10
	if room <= 0 {
		return 0
	}
	ballast := make([][]byte, 0, room/chunk+1)
	for left := room; left > 0; left -= chunk {
		c := make([]byte, chunk)
		for i := 0; i < len(c); i += 4096 {
			c[i] = 1
		}
		ballast = append(ballast, c)
	}
	touched := int64(len(ballast)) * chunk
	runtime.KeepAlive(ballast)
	ballast = nil
	runtime.GC()
	return touched
}
