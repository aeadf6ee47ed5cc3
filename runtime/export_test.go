package runtime

// SetHyperGraphNodes makes HyperAttention ingests plan for a backend graph
// size of n nodes (0: the backend's own) and returns the previous value.
func SetHyperGraphNodes(n int) int {
	old := hyperGraphNodes
	hyperGraphNodes = n
	return old
}

// HyperStagedGraphs is the number of graphs hyper.Staged has computed.
func HyperStagedGraphs() int64 { return hyperStagedGraphs.Load() }
