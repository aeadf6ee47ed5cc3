package heapwarm

import (
	"runtime"
	"runtime/debug"
	"testing"
)

// retained is the heap memory the process holds mapped (in use or free but
// not returned to the OS), and the next GC's goal.
func retained() (held, goal, alloc uint64) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapSys - ms.HeapReleased, ms.NextGC, ms.HeapAlloc
}

// After Warm the heap holds mapped memory up to (90 % of the room to) the
// next GC's goal, where a heap whose free memory went back to the OS (as a
// read-back document's read buffers do) held only its live data: the
// allocations of the timed steps that follow land on pages already
// faulted in. (Whether an untouched page faults per 4 KiB or per huge page
// is the kernel's; on the benchmarks' VM a paged decode step's 36–142 KiB
// took 6–35 faults of ~10–15 µs without Warm, ~1 with it: docs/kvcache.md.)
func TestWarmHoldsHeapUpToGoal(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100)) // the goal this test reasons about, whatever GOGC is
	// A live heap of 64 MiB, as a document's host pages, and as much
	// garbage, freed and returned to the OS.
	live := make([][]byte, 64)
	for i := range live {
		live[i] = make([]byte, 1<<20)
	}
	defer runtime.KeepAlive(live)
	garbage := make([][]byte, 64)
	for i := range garbage {
		garbage[i] = make([]byte, 1<<20)
	}
	runtime.KeepAlive(garbage)
	garbage = nil
	debug.FreeOSMemory()
	held, goal, alloc := retained()
	want := alloc + (goal-alloc)*8/10
	if held >= want {
		t.Fatalf("before Warm the heap already holds %d MiB mapped (goal %d MiB, live %d MiB): the test no longer shows what Warm adds", held>>20, goal>>20, alloc>>20)
	}
	touched := Warm()
	held2, goal2, alloc2 := retained()
	t.Logf("mapped heap %d MiB -> %d MiB after Warm (%d MiB touched; goal %d MiB, live %d MiB)", held>>20, held2>>20, touched>>20, goal2>>20, alloc2>>20)
	if want2 := alloc2 + (goal2-alloc2)*8/10; held2 < want2 {
		t.Fatalf("after Warm the heap holds %d MiB mapped, want at least %d MiB (80 %% of the way from live %d MiB to the goal %d MiB)", held2>>20, want2>>20, alloc2>>20, goal2>>20)
	}
}

// With the GC off the goal is unbounded: Warm touches no more than GOGC=200
// would leave room for, instead of allocating until memory runs out.
func TestWarmWithGCOffIsBounded(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	live := make([][]byte, 16)
	for i := range live {
		live[i] = make([]byte, 1<<20)
	}
	defer runtime.KeepAlive(live)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	limit := 2*int64(ms.HeapAlloc) + 64<<20 + chunk
	if touched := Warm(); touched <= 0 || touched > limit {
		t.Fatalf("Warm with the GC off touched %d bytes, want 1..%d", touched, limit)
	}
}
