package kvcache_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/require"
	"github.com/x448/float16"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// fixedSelector gives each head group a fixed page list (clipped to the
// sequence); nil lists mean every page.
type fixedSelector struct {
	c      paging.Config
	groups []paging.Group
	pages  [][]int
}

func (s *fixedSelector) Name() string              { return "fixed" }
func (s *fixedSelector) Config() paging.Config     { return s.c }
func (s *fixedSelector) Groups(int) []paging.Group { return s.groups }
func (s *fixedSelector) NeedQueries(_, _ int) bool { return false }
func (s *fixedSelector) Select(_ int, _ paging.Summaries, _ *paging.Queries, upto int) paging.Selection {
	n := paging.PagesOf(upto, s.c.PageSize)
	var out paging.Selection
	for _, p := range s.pages {
		if p == nil {
			out.Groups = append(out.Groups, paging.AllPages(n))
			continue
		}
		var in []int
		for _, x := range p {
			if x < n {
				in = append(in, x)
			}
		}
		out.Groups = append(out.Groups, in)
	}
	return out
}

const (
	tHeads, tKV, tDim, tPage = 8, 4, 8, 16 // query heads, KV heads, head dim, page size
)

var tLayout = kvcache.Layout{Layers: 1, KVHeads: tKV, HeadDim: tDim, PageSize: tPage}

// pass runs one forward pass of one layer through the cache's Attention
// on the real CPU backend and returns the output [batch][heads*dim].
func pass(t *testing.T, b ml.Backend, c *kvcache.Paged, pos0 int, q, k, v []float32) [][]float32 {
	t.Helper()
	n := len(q) / (tHeads * tDim)
	ctx := b.NewContext()
	defer ctx.Close()
	positions := make([]int32, n)
	for i := range positions {
		positions[i] = int32(pos0 + i)
	}
	require.NoError(t, c.StartForward(ctx, input.Batch{Positions: positions, Sequences: make([]int, n)}, false))
	return finishPass(t, ctx, c, q, k, v)
}

func f16(x float32) float64 { return float64(float16.Fromfloat32(x).Float32()) }

// reference is attention in float64 over the keys and values of every
// position (rounded to f16, as cached), for queries at pos0.. : head h of
// the query at position t sees position p <= t if p's page is in the pages
// of its KV head's group or is written by the batch. The probabilities are
// rounded to f16 like ggml's mul_mat with f16 values does.
func reference(q, k, v []float32, pos0 int, visible func(kvHead, page int) bool) [][]float64 {
	// The batch's own pages are always visible (causally).
	return referenceAt(q, k, v, pos0, func(g, p int) bool { return visible(g, p/tPage) || p/tPage >= pos0/tPage })
}

// referenceAt is reference with visibility by position: head h of the
// query at position t sees position p <= t if visible(its KV head, p).
func referenceAt(q, k, v []float32, pos0 int, visible func(kvHead, pos int) bool) [][]float64 {
	n := len(q) / (tHeads * tDim)
	G := tHeads / tKV
	out := make([][]float64, n)
	for i := 0; i < n; i++ {
		t := pos0 + i
		out[i] = make([]float64, tHeads*tDim)
		for h := 0; h < tHeads; h++ {
			g := h / G
			var ps []int
			var ws []float64
			mx := math.Inf(-1)
			for p := 0; p <= t; p++ {
				if !visible(g, p) {
					continue
				}
				dot := 0.0
				for d := 0; d < tDim; d++ {
					dot += f16(q[(i*tHeads+h)*tDim+d]) * f16(k[(p*tKV+g)*tDim+d])
				}
				dot /= math.Sqrt(tDim)
				ps, ws = append(ps, p), append(ws, dot)
				mx = math.Max(mx, dot)
			}
			sum := 0.0
			for j := range ws {
				ws[j] = math.Exp(ws[j] - mx)
				sum += ws[j]
			}
			for j, p := range ps {
				w := f16(float32(ws[j] / sum))
				for d := 0; d < tDim; d++ {
					out[i][h*tDim+d] += w * f16(v[(p*tKV+g)*tDim+d])
				}
			}
		}
	}
	return out
}

func randoms(r *rand.Rand, n int) []float32 {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(r.NormFloat64())
	}
	return x
}

// Head groups attend to different pages, each over its own pool; the
// result matches float64 attention over the same subsets. The groups'
// heads are interleaved (0,2 and 1,3), so queries are gathered and the
// output heads put back in order.
func TestHeadGroupsMatchFloat64Reference(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()

	cases := []struct {
		name   string
		groups []paging.Group
		pages  [][]int
	}{
		{"interleaved heads, different pages", []paging.Group{
			{KVHeads: []int{0, 2}, Budget: 0, Class: "retrieval"},
			{KVHeads: []int{1, 3}, Budget: 48, Class: "streaming"},
		}, [][]int{{0, 2}, {1, 3, 4}}},
		{"one head alone", []paging.Group{
			{KVHeads: []int{0, 1, 3}, Budget: 0},
			{KVHeads: []int{2}, Budget: 48},
		}, [][]int{nil, {0}}},
		{"three groups", []paging.Group{
			{KVHeads: []int{0}, Budget: 0}, {KVHeads: []int{1, 2}, Budget: 0}, {KVHeads: []int{3}, Budget: 0},
		}, [][]int{{1}, {0, 3}, {2, 4}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(11, 12))
			const first, second = 85, 3
			total := first + second
			q := randoms(r, total*tHeads*tDim)
			k := randoms(r, total*tKV*tDim)
			v := randoms(r, total*tKV*tDim)
			sel := &fixedSelector{c: paging.Config{PageSize: tPage, Sinks: 4, Window: 4}, groups: tc.groups, pages: tc.pages}
			c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: 256, MaxBatch: 96})
			require.NoError(t, err)
			defer c.Close()
			c.Init(b, ml.DTypeF16, 1, 256, 96)
			groupOf := map[int]int{}
			for gi, g := range tc.groups {
				for _, h := range g.KVHeads {
					groupOf[h] = gi
				}
			}
			visible := func(kvHead, page int) bool {
				p := tc.pages[groupOf[kvHead]]
				return p == nil || slices.Contains(p, page)
			}
			split := func(x []float32, per, from, to int) []float32 { return x[from*per : to*per] }
			for _, step := range [][2]int{{0, first}, {first, total}} {
				got := pass(t, b, c, step[0], split(q, tHeads*tDim, step[0], step[1]), split(k, tKV*tDim, step[0], step[1]), split(v, tKV*tDim, step[0], step[1]))
				want := reference(split(q, tHeads*tDim, step[0], step[1]), k, v, step[0], visible)
				worst := 0.0
				for i := range got {
					for j := range got[i] {
						worst = math.Max(worst, math.Abs(float64(got[i][j])-want[i][j]))
					}
				}
				t.Logf("tokens %d..%d: max |diff| %.2g", step[0], step[1], worst)
				require.Less(t, worst, 2e-3)
			}

			// The second pass again, over pages that come back from host
			// memory (a document): every selected page is uploaded into the
			// groups' pools, each taking only its heads' channels, by copy
			// runs and by the page scatter.
			writer, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 256, MaxBatch: 96,
				Selector: &fixedSelector{c: sel.c, groups: []paging.Group{{}}, pages: [][]int{nil}}})
			require.NoError(t, err)
			defer writer.Close()
			writer.Init(b, ml.DTypeF16, 1, 256, 96)
			pass(t, b, writer, 0, split(q, tHeads*tDim, 0, first), split(k, tKV*tDim, 0, first), split(v, tKV*tDim, 0, first))
			defer func(n, sp int, h, d bool) {
				kvcache.MaxUploadRuns, kvcache.DeviceStagePages, kvcache.HostUploads, kvcache.DeviceUploads = n, sp, h, d
			}(kvcache.MaxUploadRuns, kvcache.DeviceStagePages, kvcache.HostUploads, kvcache.DeviceUploads)
			// Staging tensors as large as the pools: every page of the pass
			// goes through them.
			kvcache.DeviceStagePages = 1 << 10
			for _, up := range []struct {
				name   string
				runs   int
				host   bool
				device bool
			}{{"host copies", 1 << 20, true, false}, {"device staging", 1 << 20, false, true},
				{"copy runs", 1 << 20, false, false}, {"page scatter", 0, false, false}} {
				kvcache.MaxUploadRuns, kvcache.HostUploads, kvcache.DeviceUploads = up.runs, up.host, up.device
				reader, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 256, MaxBatch: 96,
					Selector: &fixedSelector{c: sel.c, groups: tc.groups, pages: tc.pages}, Prefix: writer.Store()})
				require.NoError(t, err)
				reader.Init(b, ml.DTypeF16, 1, 256, 96)
				got := pass(t, b, reader, first, split(q, tHeads*tDim, first, total), split(k, tKV*tDim, first, total), split(v, tKV*tDim, first, total))
				reader.Close()
				st := reader.Stats()
				require.Positive(t, st.Uploads)
				if up.device {
					require.Equal(t, st.Uploads, st.DeviceStaged)
				} else {
					require.Zero(t, st.DeviceStaged)
				}
				want := reference(split(q, tHeads*tDim, first, total), k, v, first, visible)
				worst := 0.0
				for i := range got {
					for j := range got[i] {
						worst = math.Max(worst, math.Abs(float64(got[i][j])-want[i][j]))
					}
				}
				t.Logf("from host pages (%s): max |diff| %.2g", up.name, worst)
				require.Less(t, worst, 2e-3)
			}
		})
	}
}

// Splitting heads into groups that all select every page gives the same
// result as one group of every head.
func TestHeadGroupsSelectingEverythingMatchOneGroup(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	r := rand.New(rand.NewPCG(13, 14))
	const n1, n2 = 70, 1
	q := randoms(r, (n1+n2)*tHeads*tDim)
	k := randoms(r, (n1+n2)*tKV*tDim)
	v := randoms(r, (n1+n2)*tKV*tDim)
	run := func(groups []paging.Group) [][]float32 {
		pages := make([][]int, len(groups))
		sel := &fixedSelector{c: paging.Config{PageSize: tPage, Sinks: 4, Window: 4}, groups: groups, pages: pages}
		c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: 256, MaxBatch: 96})
		require.NoError(t, err)
		defer c.Close()
		c.Init(b, ml.DTypeF16, 1, 256, 96)
		out := pass(t, b, c, 0, q[:n1*tHeads*tDim], k[:n1*tKV*tDim], v[:n1*tKV*tDim])
		return append(out, pass(t, b, c, n1, q[n1*tHeads*tDim:], k[n1*tKV*tDim:], v[n1*tKV*tDim:])...)
	}
	one := run([]paging.Group{{}})
	split := run([]paging.Group{{KVHeads: []int{0, 3}}, {KVHeads: []int{1, 2}}})
	worst := 0.0
	for i := range one {
		for j := range one[i] {
			worst = math.Max(worst, math.Abs(float64(one[i][j]-split[i][j])))
		}
	}
	t.Logf("max |diff| one group vs two: %g", worst)
	require.Zero(t, worst, "per-head dot products and sums are the same operations")
}

// The causal mask built in the graph (dense selections, pages in position
// order) equals the host mask value for value, 0 and -Inf.
func TestCausalMaskMatchesHostMask(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 1, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	for _, c := range []struct{ pos0, cells, n int }{
		{0, 16, 16}, {0, 32, 20}, {16, 48, 20}, {37, 64, 3}, {100, 112, 1}, {5, 16, 11},
		// batches of a multiple of 8 tokens: the concatenations split in 8
		{1, 16, 8}, {24, 48, 16}, {32, 48, 16}, {0, 32, 24}, {64, 128, 64},
	} {
		t.Run(fmt.Sprintf("pos0=%d,cells=%d,n=%d", c.pos0, c.cells, c.n), func(t *testing.T) {
			ctx := m.Backend().NewContext()
			defer ctx.Close()
			mask := kvcache.CausalMask(ctx, c.pos0, c.cells, c.n)
			out := ctx.Input().Empty(ml.DTypeF32, c.cells, c.n)
			ctx.Forward(mask.Copy(ctx, out), out).Compute(out)
			require.Equal(t, kvcache.OrderedHostMask(c.pos0, c.cells, c.n, 16), out.Floats())
		})
	}
}

// tokenSelector gives each head group fixed token lists (and their pages).
type tokenSelector struct {
	c      paging.Config
	groups []paging.Group
	tokens [][]int32
}

func (s *tokenSelector) Name() string              { return "tokens" }
func (s *tokenSelector) Config() paging.Config     { return s.c }
func (s *tokenSelector) Groups(int) []paging.Group { return s.groups }
func (s *tokenSelector) NeedQueries(_, _ int) bool { return false }
func (s *tokenSelector) Select(_ int, _ paging.Summaries, _ *paging.Queries, upto int) paging.Selection {
	var out paging.Selection
	for _, toks := range s.tokens {
		var pages []int
		for _, t := range toks {
			if p := int(t) / tPage; len(pages) == 0 || pages[len(pages)-1] != p {
				pages = append(pages, p)
			}
		}
		out.Groups = append(out.Groups, pages)
		out.Tokens = append(out.Tokens, toks)
	}
	return out
}

// Token selections (squeezed): each group attends to exactly its listed
// earlier positions plus the batch, matching float64 attention over the
// same positions, although the pools hold the listed tokens' whole pages.
func TestTokenSelectionsMatchFloat64Reference(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	groups := []paging.Group{{KVHeads: []int{0, 2}, Budget: 64}, {KVHeads: []int{1, 3}, Budget: 64}}
	tokens := [][]int32{{1, 5, 17, 18, 40, 63, 79}, {0, 2, 33, 34, 35, 64, 70}}
	r := rand.New(rand.NewPCG(21, 22))
	const first, second = 80, 3 // the second batch starts a page
	total := first + second
	q := randoms(r, total*tHeads*tDim)
	k := randoms(r, total*tKV*tDim)
	v := randoms(r, total*tKV*tDim)
	sel := &tokenSelector{c: paging.Config{PageSize: tPage, Sinks: 4, Window: 4}, groups: groups, tokens: tokens}
	c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: 256, MaxBatch: 96})
	require.NoError(t, err)
	defer c.Close()
	c.Init(b, ml.DTypeF16, 1, 256, 96)
	split := func(x []float32, per, from, to int) []float32 { return x[from*per : to*per] }
	for _, step := range [][2]int{{0, first}, {first, total}} {
		got := pass(t, b, c, step[0], split(q, tHeads*tDim, step[0], step[1]), split(k, tKV*tDim, step[0], step[1]), split(v, tKV*tDim, step[0], step[1]))
		want := referenceAt(split(q, tHeads*tDim, step[0], step[1]), k, v, step[0], func(g, p int) bool {
			return p >= step[0] || slices.Contains(tokens[g%2], int32(p))
		})
		worst := 0.0
		for i := range got {
			for j := range got[i] {
				worst = math.Max(worst, math.Abs(float64(got[i][j])-want[i][j]))
			}
		}
		t.Logf("tokens %d..%d: max |diff| %.2g", step[0], step[1], worst)
		require.Less(t, worst, 2e-3)
		require.NoError(t, c.CheckInvariants())
	}
	require.Equal(t, []int{7, 7}, c.AttendedTokens(0))
}

// funcTokenSelector gives each head group the tokens tok(group, upto)
// returns (sorted, below upto), and their pages.
type funcTokenSelector struct {
	c      paging.Config
	groups []paging.Group
	tok    func(group, upto int) []int32
}

func (s *funcTokenSelector) Name() string              { return "func-tokens" }
func (s *funcTokenSelector) Config() paging.Config     { return s.c }
func (s *funcTokenSelector) Groups(int) []paging.Group { return s.groups }
func (s *funcTokenSelector) NeedQueries(_, _ int) bool { return false }
func (s *funcTokenSelector) Select(_ int, _ paging.Summaries, _ *paging.Queries, upto int) paging.Selection {
	var out paging.Selection
	for g := range s.groups {
		toks := s.tok(g, upto)
		var pages []int
		for _, t := range toks {
			if p := int(t) / tPage; len(pages) == 0 || pages[len(pages)-1] != p {
				pages = append(pages, p)
			}
		}
		out.Groups = append(out.Groups, pages)
		out.Tokens = append(out.Tokens, toks)
	}
	return out
}
