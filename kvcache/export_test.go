package kvcache

// OrderedHostMask is buildMask for a pool whose slots hold pages 0..used-1
// in order, full before pos0 and filled to pos0+n after it, all selected.
func OrderedHostMask(pos0, cells, n, P int) []float32 {
	used := cells / P
	pl := newPool(nil, Layout{Layers: 1, KVHeads: 1, HeadDim: 1, PageSize: P}, 0, 1, used, false)
	var sel []int
	for s := 0; s < used; s++ {
		pl.page[s], pl.where[s] = s, s
		pl.fill[s] = min(P, max(0, pos0+n-s*P))
		sel = append(sel, s)
	}
	var writes []int
	for p := pos0 / P; p <= (pos0+n-1)/P; p++ {
		writes = append(writes, p)
	}
	return buildMask(pl, used, sel, nil, writes, used, pos0, n, P)
}

// QuestScores is questScores: one layer's in-graph Quest bounds.
var QuestScores = questScores
