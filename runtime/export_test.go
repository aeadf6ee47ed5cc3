package runtime

import (
	"context"

	"github.com/kvrecall/kvrecall/probe"
)

// SetHyperGraphNodes makes HyperAttention ingests plan for a backend graph
// size of n nodes (0: the backend's own) and returns the previous value.
func SetHyperGraphNodes(n int) int {
	old := hyperGraphNodes
	hyperGraphNodes = n
	return old
}

// HyperStagedGraphs is the number of graphs hyper.Staged has computed.
func HyperStagedGraphs() int64 { return hyperStagedGraphs.Load() }

// ProbeRepsPrefills is the number of second prefills that probe
// representatives have needed (computeProbeReps).
func ProbeRepsPrefills() int64 { return probeRepsPrefills.Load() }

// ProbeReps returns doc's probe representatives for settings s and local
// window (from memory, its file, or a second prefill), as a probe session
// gets them.
func ProbeReps(ctx context.Context, m *Model, doc *Document, s probe.Settings, window int) (*probe.Reps, error) {
	return m.probeReps(ctx, doc, s, window)
}

// SetDenseStepGraphs makes DenseCache caches created afterwards keep their
// one-token step graph (on) or build one per step (off), and returns the
// previous setting.
func SetDenseStepGraphs(on bool) bool {
	old := denseStepGraphs
	denseStepGraphs = on
	return old
}

// SetStepGraphHostOnly false makes DenseCache's step graphs count as not
// all in host memory (the fallback a multi-backend scheduler takes), and
// returns the previous setting.
func SetStepGraphHostOnly(on bool) bool {
	old := stepGraphHostOnly
	stepGraphHostOnly = on
	return old
}

// DenseStepKept reports whether s's DenseCache cache still keeps step
// graphs.
func DenseStepKept(s *Session) bool {
	dc, ok := s.cache.(*denseCache)
	return ok && dc.keepGraph
}

// DenseStepBuilds is the number of one-token step graphs s's DenseCache
// cache has built (-1: not DenseCache's own cache).
func DenseStepBuilds(s *Session) int {
	if dc, ok := s.cache.(*denseCache); ok {
		return dc.stepBuilds
	}
	return -1
}

// SetPagedStepGraphs makes sessions on Paged caches made afterwards keep
// their one-token step graph (on) or build one per step (off), and
// returns the previous setting.
func SetPagedStepGraphs(on bool) bool {
	old := pagedStepGraphs
	pagedStepGraphs = on
	return old
}

// PagedStepBuilds is the number of kept step graphs s has built on its
// Paged cache (-1: s keeps none).
func PagedStepBuilds(s *Session) int {
	if s.pstep == nil {
		return -1
	}
	return s.pstep.builds
}

// PagedStepKept reports whether s still keeps step graphs on its Paged
// cache.
func PagedStepKept(s *Session) bool { return s.pstep != nil && s.pstep.keep }

// SetPagedStepFault sets the failure kept paged step graphs meet (nil:
// none; see pagedStepFault) and returns the previous one.
func SetPagedStepFault(f func(stage string) error) func(stage string) error {
	old := pagedStepFault
	pagedStepFault = f
	return old
}

// OffloadedLayers is offloadedLayers: the layers n GPU layers are.
func OffloadedLayers(n, blocks int) []int { return offloadedLayers(n, blocks) }

// CheckOffload is checkOffload.
var CheckOffload = checkOffload
