package kvcache_test

import (
	"context"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// A selection made inside the graph that fails (here: tokens out of
// order, once) fails its pass with the selection's error, from Computed,
// keeps none of the pass's keys and values, and the cache goes on: the
// same position is passed again, selects and attends.
func TestSelectInGraphError(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 512})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	groups := []paging.Group{{KVHeads: []int{0, 2}, Budget: 32, Tokens: true}, {KVHeads: []int{1, 3}, Budget: 32, Tokens: true}}
	orders := randomOrders(len(groups), 5)
	ordered := orderedPick(orders)
	const bad = 182 // the pass at position 181 selects unsorted tokens
	var queried [][][]float32
	failed := make([]bool, len(groups))
	sel := &orderedTokenSelector{c: paging.Config{PageSize: tPage, Sinks: 4, Window: 4}, groups: groups, order: orders, queried: &queried,
		pick: func(g, upto int) ([]int32, []int32) {
			if upto == bad && !failed[g] {
				failed[g] = true // once: the pass is taken again
				return []int32{7, 3}, nil
			}
			return ordered(g, upto)
		}}
	c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: 512, MaxBatch: 96})
	require.NoError(t, err)
	defer c.Close()
	c.Init(b, ml.DTypeF16, 1, 512, 96)
	r := rand.New(rand.NewPCG(7, 8))
	for pos0, n := 0, 90; pos0 < 180; pos0 += n {
		hookedPass(t, b, c, pos0, randoms(r, n*tHeads*tDim), randoms(r, n*tKV*tDim), randoms(r, n*tKV*tDim))
	}
	hookedPass(t, b, c, 180, randoms(r, tHeads*tDim), randoms(r, tKV*tDim), randoms(r, tKV*tDim))

	// The bad pass: one graph, whose selection op fails.
	ctx := b.NewContext()
	require.NoError(t, c.StartForward(ctx, input.Batch{Positions: []int32{181}, Sequences: []int{0}}, false))
	require.False(t, c.NeedQueries(0), "a one-token pass selects in the graph")
	c.SetLayer(0)
	out := c.Attention(ctx, 0, ctx.Input().FromFloats(randoms(r, tHeads*tDim), tDim, tHeads, 1),
		ctx.Input().FromFloats(randoms(r, tKV*tDim), tDim, tKV, 1), ctx.Input().FromFloats(randoms(r, tKV*tDim), tDim, tKV, 1), 1/math.Sqrt(tDim))
	res := ctx.Input().Empty(ml.DTypeF32, tDim, tHeads, 1)
	ts := append([]ml.Tensor{out.Copy(ctx, res), res}, c.Outputs(ctx)...)
	ctx.Forward(ts...).Compute(ts...)
	err = c.Computed(ctx)
	ctx.Close()
	require.ErrorContains(t, err, "not sorted")
	require.NoError(t, c.Computed(b.NewContext()), "the error is the failed pass's only")
	// Nothing of the failed pass is kept: the sequence is as before it.
	require.Equal(t, 181, c.Store().Len())
	require.NoError(t, c.CheckInvariants())

	// The next pass takes position 181 again.
	got := hookedPass(t, b, c, 181, randoms(r, tHeads*tDim), randoms(r, tKV*tDim), randoms(r, tKV*tDim))
	require.Len(t, got, 1)
	for _, x := range got[0] {
		require.False(t, math.IsNaN(float64(x)))
	}
}
