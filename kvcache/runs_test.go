package kvcache_test

import (
	"context"
	"maps"
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

func toF16(x []float32) []uint16 {
	out := make([]uint16, len(x))
	for i, v := range x {
		out[i] = float16.Fromfloat32(v).Bits()
	}
	return out
}

func u16le(u []uint16) []byte {
	b := make([]byte, 2*len(u))
	for i, x := range u {
		b[2*i], b[2*i+1] = byte(x), byte(x>>8)
	}
	return b
}

// arena is a K/V arena of cells tokens as host rows: keys token-major
// [cells][row], values channel-major [row][cells] (the layouts of a pool).
type arena struct {
	cells, row int
	k, v       []uint16 // v channel-major
}

func newArena(r *rand.Rand, cells, row int) arena {
	k := toF16(randoms(r, cells*row))
	tok := toF16(randoms(r, cells*row))
	v := make([]uint16, cells*row)
	for c := 0; c < cells; c++ {
		for ch := 0; ch < row; ch++ {
			v[ch*cells+c] = tok[c*row+ch]
		}
	}
	return arena{cells: cells, row: row, k: k, v: v}
}

// tensors makes the arena's backend tensors: k [dim, kvHeads, cells], v
// [cells, dim, kvHeads].
func (a arena) tensors(ctx ml.Context, dim, kv int) (ml.Tensor, ml.Tensor) {
	return ctx.Input().FromBytes(ml.DTypeF16, u16le(a.k), dim, kv, a.cells),
		ctx.Input().FromBytes(ml.DTypeF16, u16le(a.v), a.cells, dim, kv)
}

// pageMajor makes the arena's values as pages each channel-major, [P,
// dim, kv, pages] (a host Page's V, page after page); cells must be a
// multiple of P.
func (a arena) pageMajor(ctx ml.Context, P, dim, kv int) ml.Tensor {
	pages := a.cells / P
	pm := make([]uint16, len(a.v))
	for pg := 0; pg < pages; pg++ {
		for ch := 0; ch < a.row; ch++ {
			copy(pm[(pg*a.row+ch)*P:(pg*a.row+ch+1)*P], a.v[ch*a.cells+pg*P:ch*a.cells+(pg+1)*P])
		}
	}
	return ctx.Input().FromBytes(ml.DTypeF16, u16le(pm), P, dim, kv, pages)
}

// gather copies cells of a (in order) into a pool's layout, as uploads
// would.
func gather(as []arena, cells [][2]int) arena {
	out := arena{row: as[0].row}
	for _, c := range cells {
		out.cells++
		a := as[c[0]]
		out.k = append(out.k, a.k[c[1]*a.row:(c[1]+1)*a.row]...)
	}
	out.v = make([]uint16, out.cells*out.row)
	for i, c := range cells {
		a := as[c[0]]
		for ch := 0; ch < out.row; ch++ {
			out.v[ch*out.cells+i] = a.v[ch*a.cells+c[1]]
		}
	}
	return out
}

// Attention over runs of cells read in place gives what attention over a
// pool holding the same cells in the same order gives: bit for bit with
// one run, within float rounding with several (the values' sum is split
// at run boundaries).
func TestRunAttentionMatchesPool(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()

	type run struct{ arena, first, n int }
	cases := []struct {
		name string
		runs []run
	}{
		{"one run", []run{{0, 32, 80}}},
		{"pages in runs", []run{{0, 0, 16}, {0, 48, 32}, {0, 128, 16}, {0, 200, 7}}},
		{"single cells", []run{{0, 5, 1}, {0, 9, 1}, {0, 100, 1}, {0, 101, 3}}},
		{"document and session arenas", []run{{0, 0, 16}, {0, 64, 48}, {1, 0, 16}, {1, 16, 5}}},
	}
	const cells, batch = 256, 3
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(21, 22))
			as := []arena{newArena(r, cells, tKV*tDim), newArena(r, 64, tKV*tDim)}
			var picked [][2]int
			for _, ru := range tc.runs {
				for c := ru.first; c < ru.first+ru.n; c++ {
					picked = append(picked, [2]int{ru.arena, c})
				}
			}
			T := len(picked)
			pool := gather(as, picked)
			mask := make([]float32, T*batch)
			for i := range mask {
				if r.Float64() < 0.3 {
					mask[i] = float32(math.Inf(-1))
				}
			}
			for b := 0; b < batch; b++ {
				mask[b*T+r.IntN(T)] = 0 // every row sees something
			}
			q := randoms(r, tDim*tHeads*batch)

			ctx := b.NewContext()
			defer ctx.Close()
			var ks, vs, vps []ml.Tensor
			for _, a := range as {
				k, v := a.tensors(ctx, tDim, tKV)
				ks, vs, vps = append(ks, k), append(vs, v), append(vps, a.pageMajor(ctx, tPage, tDim, tKV))
			}
			var kspans []kvcache.KSpan
			var vcells, vpages []kvcache.VSpan
			for _, ru := range tc.runs {
				kspans = append(kspans, kvcache.NewKSpan(ks[ru.arena], ru.first, ru.n))
				vcells = append(vcells, kvcache.VCells(vs[ru.arena], ru.first, ru.n))
				// The same cells cut at page boundaries.
				for c := ru.first; c < ru.first+ru.n; {
					n := min(ru.first+ru.n, (c/tPage+1)*tPage) - c
					vpages = append(vpages, kvcache.VPage(vps[ru.arena], c/tPage, c%tPage, n))
					c += n
				}
			}
			pk, pv := pool.tensors(ctx, tDim, tKV)
			qt := ctx.Input().FromFloats(q, tDim, tHeads, batch)
			mt := ctx.Input().FromFloats(mask, T, batch)
			scale := 1 / math.Sqrt(tDim)
			want := qt.(ml.ScaledDotProductAttention).ScaledDotProductAttention(ctx, pk, pv, mt, nil, nil, scale, true)
			got := kvcache.RunAttention(ctx, qt, kspans, vcells, mt, scale)
			gotPages := kvcache.RunAttention(ctx, qt, kspans, vpages, mt, scale)
			ctx.Forward(want, got, gotPages).Compute(want, got, gotPages)
			w := want.Floats()
			for _, out := range []struct {
				name  string
				spans int
				t     ml.Tensor
			}{{"values by runs", len(vcells), got}, {"values by pages", len(vpages), gotPages}} {
				g := out.t.Floats()
				require.Len(t, g, tDim*tHeads*batch)
				worst := 0.0
				for i := range w {
					require.False(t, math.IsNaN(float64(g[i])), "NaN at %d", i)
					worst = math.Max(worst, math.Abs(float64(w[i]-g[i])))
				}
				t.Logf("%s: %d key spans, %d value spans, %d cells: max |diff| %.2g", out.name, len(kspans), out.spans, T, worst)
				if len(kspans) == 1 && out.spans == 1 {
					require.Equal(t, w, g, out.name)
				} else {
					require.Less(t, worst, 1e-5, out.name)
				}
			}
		})
	}
}

// Gathering pages from page-major arenas gives their keys and values in
// attention's layout, exactly (f16 to f32), in the order listed.
func TestGatherPages(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	const pagesIn = 10
	L := kvcache.Layout{Layers: 1, KVHeads: tKV, HeadDim: tDim, PageSize: tPage}
	row := L.Row()
	r := rand.New(rand.NewPCG(5, 6))
	a := newArena(r, pagesIn*tPage, row)
	for _, pages := range [][]int{{3}, {0, 1, 2}, {7, 0, 9, 4}} {
		ctx := b.NewContext()
		k, v := a.tensors(ctx, tDim, tKV)
		k, v = kvcache.GatherPages(ctx, k.Reshape(ctx, row*tPage, pagesIn), a.pageMajor(ctx, tPage, tDim, tKV).Reshape(ctx, tPage, row*pagesIn), pages, L)
		ctx.Forward(k, v).Compute(k, v)
		require.Equal(t, []int{tDim, tKV, len(pages) * tPage}, k.Shape())
		require.Equal(t, []int{len(pages) * tPage, tDim, tKV}, v.Shape())
		var cells [][2]int
		for _, p := range pages {
			for c := 0; c < tPage; c++ {
				cells = append(cells, [2]int{0, p*tPage + c})
			}
		}
		want := gather([]arena{a}, cells)
		require.Equal(t, f16sToFloats(want.k), k.Floats(), "keys of pages %v", pages)
		require.Equal(t, f16sToFloats(want.v), v.Floats(), "values of pages %v", pages)
		ctx.Close()
	}
}

func TestPageRuns(t *testing.T) {
	const P = 16
	cases := []struct {
		name  string
		pages []int
		fill  map[int]int // pages not listed are full
		want  [][2]int    // first cell, cells
	}{
		{"consecutive pages merge", []int{0, 1, 2, 5, 6, 9}, nil, [][2]int{{0, 48}, {80, 32}, {144, 16}}},
		{"a partial page ends its run", []int{3, 4, 5}, map[int]int{4: 7}, [][2]int{{48, 23}, {80, 16}}},
		{"empty pages are skipped", []int{0, 1, 2}, map[int]int{1: 0}, [][2]int{{0, 16}, {32, 16}}},
		{"none", nil, nil, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := kvcache.PageRuns(tc.pages, P, func(p int) int {
				if n, ok := tc.fill[p]; ok {
					return n
				}
				return P
			})
			require.Equal(t, tc.want, got)
		})
	}
}

// benchShape is a model's attention shape for the benchmarks: 4 layers
// (the tiny preset's count; the 1b preset has 16), pages of 64, a 16k
// document, a 2048-token budget (33 pages read).
type benchShape struct {
	name              string
	heads, kv, dim    int
	layers, page, doc int
}

var benchShapes = []benchShape{
	{name: "tiny", heads: 8, kv: 2, dim: 32, layers: 4, page: 64, doc: 16384},
	{name: "1b", heads: 32, kv: 8, dim: 64, layers: 4, page: 64, doc: 16384},
}

// selections of 33 pages of a document of doc tokens as the methods make
// them: sinks, a retrieval part, the recent window. The names give the
// number of runs of consecutive pages.
func benchSelections(doc, P int) map[string][]int {
	last := doc / P // the page decode writes
	window := []int{last - 4, last - 3, last - 2, last - 1}
	mid := func(step, width, count int) []int {
		var out []int
		for i := 0; i < count; i++ {
			for w := 0; w < width; w++ {
				out = append(out, 8+i*step+w)
			}
		}
		return out
	}
	var w []int
	for p := last - 28; p < last; p++ {
		w = append(w, p)
	}
	return map[string][]int{
		"window-2runs": append([]int{0}, w...),                          // sinks + 28 recent pages
		"retro-16runs": slices.Concat([]int{0}, mid(16, 2, 14), window), // 14 retrieved pages, each with the next
		"quest-30runs": slices.Concat([]int{0}, mid(8, 1, 28), window),  // 28 scattered pages
	}
}

// BenchmarkAttentionInPlace times the attention of one decode step (four
// layers, one query token) over the 33 selected pages of a 16k document,
// the ways a CPU backend could read them:
//
//   - pool: a pool that already holds them in f16 (what window and retro
//     pay today; quest adds its uploads, BenchmarkUploadCost);
//
//   - pool-f32: the same pool held in f32 (twice the bytes);
//
//   - gather: no pool; one get_rows per K and V from page-major document
//     arenas (gatherPages, f32 out), then the same attention;
//
//   - in-place: no pool, no copy; attention per run of consecutive pages
//     read from channel-major arenas (runAttention).
//
//     go test ./kvcache -run XXX -bench AttentionInPlace -benchtime 400x
func BenchmarkAttentionInPlace(b *testing.B) {
	m, err := runtime.Open(context.Background(), testmodels.Random(b, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 1, ContextLength: 256})
	require.NoError(b, err)
	defer m.Close()
	be := m.Backend()
	for _, sh := range benchShapes {
		r := rand.New(rand.NewPCG(1, 2))
		row, P := sh.kv*sh.dim, sh.page
		L := kvcache.Layout{Layers: sh.layers, KVHeads: sh.kv, HeadDim: sh.dim, PageSize: P}
		docPages := sh.doc/P + 1 // the document and the decode page
		doc := newArena(r, docPages*P, row)
		hold := be.NewContext()
		ak, av := doc.tensors(hold, sh.dim, sh.kv)
		// Page-major arenas: K [row·P, pages] (the same bytes as ak), V
		// [P, row·pages] (Page.V page after page).
		avpm := doc.pageMajor(hold, P, sh.dim, sh.kv)
		scale := 1 / math.Sqrt(float64(sh.dim))
		sels := benchSelections(sh.doc, P)
		for _, name := range slices.Sorted(maps.Keys(sels)) {
			pages := append(sels[name], sh.doc/P) // + the decode page (1 token)
			fill := func(p int) int {
				if p == sh.doc/P {
					return 1
				}
				return P
			}
			var picked [][2]int
			for _, p := range pages {
				for c := 0; c < P; c++ { // whole slots, as a pool holds them
					picked = append(picked, [2]int{0, p*P + c})
				}
			}
			cells := len(picked)
			pool := gather([]arena{doc}, picked)
			pk, pv := pool.tensors(hold, sh.dim, sh.kv)
			pk32 := hold.Input().FromFloats(f16sToFloats(pool.k), sh.dim, sh.kv, cells)
			pv32 := hold.Input().FromFloats(f16sToFloats(pool.v), cells, sh.dim, sh.kv)
			mask := make([]float32, cells) // the decode page's slot: 1 token of 64
			for i := cells - P + 1; i < cells; i++ {
				mask[i] = float32(math.Inf(-1))
			}
			var ks []kvcache.KSpan
			var vs []kvcache.VSpan
			runMask := make([]float32, 0, cells)
			for _, ru := range kvcache.PageRuns(pages, P, fill) {
				ks = append(ks, kvcache.NewKSpan(ak, ru[0], ru[1]))
				vs = append(vs, kvcache.VCells(av, ru[0], ru[1]))
				runMask = append(runMask, make([]float32, ru[1])...)
			}
			step := func(b *testing.B, m []float32, attend func(ctx ml.Context, q, mask ml.Tensor) ml.Tensor) {
				for b.Loop() {
					ctx := be.NewContext()
					mt := ctx.Input().FromFloats(m, len(m), 1)
					var outs []ml.Tensor
					for range sh.layers {
						q := ctx.Input().FromFloats(randoms(r, sh.dim*sh.heads), sh.dim, sh.heads, 1)
						outs = append(outs, attend(ctx, q, mt))
					}
					ctx.Forward(outs...).Compute(outs...)
					ctx.Close()
				}
			}
			sdpa := func(q, k, v, mask ml.Tensor, ctx ml.Context) ml.Tensor {
				return q.(ml.ScaledDotProductAttention).ScaledDotProductAttention(ctx, k, v, mask, nil, nil, scale, true)
			}
			pre := sh.name + "/" + name + "/"
			b.Run(pre+"pool", func(b *testing.B) {
				step(b, mask, func(ctx ml.Context, q, mt ml.Tensor) ml.Tensor { return sdpa(q, pk, pv, mt, ctx) })
			})
			b.Run(pre+"pool-f32", func(b *testing.B) {
				step(b, mask, func(ctx ml.Context, q, mt ml.Tensor) ml.Tensor { return sdpa(q, pk32, pv32, mt, ctx) })
			})
			b.Run(pre+"gather", func(b *testing.B) {
				step(b, mask, func(ctx ml.Context, q, mt ml.Tensor) ml.Tensor {
					k, v := kvcache.GatherPages(ctx, ak.Reshape(ctx, row*P, docPages), avpm.Reshape(ctx, P, row*docPages), pages, L)
					return sdpa(q, k, v, mt, ctx)
				})
			})
			b.Run(pre+"graph-overhead", func(b *testing.B) {
				// What every variant above pays besides attention: a
				// context, the mask and query inputs, one op per layer.
				step(b, mask, func(ctx ml.Context, q, mt ml.Tensor) ml.Tensor { return q.Scale(ctx, 1) })
			})
			b.Run(pre+"in-place", func(b *testing.B) {
				step(b, runMask, func(ctx ml.Context, q, mt ml.Tensor) ml.Tensor {
					return kvcache.RunAttention(ctx, q, ks, vs, mt, scale)
				})
				b.ReportMetric(float64(len(ks)), "spans")
			})
		}
		hold.Close()
	}
}

func f16sToFloats(u []uint16) []float32 {
	out := make([]float32, len(u))
	for i, x := range u {
		out[i] = float16.Frombits(x).Float32()
	}
	return out
}

// stepSelector gives every layer the page list pages() returns (clipped
// to the sequence), one group of every head with a 2048-token budget.
type stepSelector struct {
	page  int
	pages func() []int
}

func (s *stepSelector) Name() string { return "bench" }
func (s *stepSelector) Config() paging.Config {
	return paging.Config{PageSize: s.page, Sinks: 64, Window: 256, Budget: 2048}
}
func (s *stepSelector) Groups(int) []paging.Group { return []paging.Group{{Budget: 2048}} }
func (s *stepSelector) NeedQueries(_, _ int) bool { return false }
func (s *stepSelector) Select(_ int, _ paging.Summaries, _ *paging.Queries, upto int) paging.Selection {
	n := paging.PagesOf(upto, s.page)
	var in []int
	for _, p := range s.pages() {
		if p < n {
			in = append(in, p)
		}
	}
	return paging.Selection{Groups: [][]int{in}}
}

// BenchmarkUploadCost times decode steps of the paged cache alone (the
// attention of four layers, the tiny preset's shape, over a 16k document
// with a 2048-token budget) with a selection that stays (window, retro:
// nothing uploaded) and one that changes 22 of its 28 retrieved pages
// every step (quest's 1.4 MiB per step on the tiny preset). The
// difference is what copying pages into the pool costs per step on the
// CPU backend: the host gather, the input buffers and the in-graph copies.
//
//	go test ./kvcache -run XXX -bench UploadCost -benchtime 400x
func BenchmarkUploadCost(b *testing.B) {
	m, err := runtime.Open(context.Background(), testmodels.Random(b, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 1, ContextLength: 256})
	require.NoError(b, err)
	defer m.Close()
	be := m.Backend()
	for _, sh := range benchShapes {
		b.Run(sh.name, func(b *testing.B) { uploadCost(b, be, sh) })
	}
}

func uploadCost(b *testing.B, be ml.Backend, sh benchShape) {
	bLayers, bHeads, bKV, bDim, bPage, bDoc := sh.layers, sh.heads, sh.kv, sh.dim, sh.page, sh.doc
	L := kvcache.Layout{Layers: bLayers, KVHeads: bKV, HeadDim: bDim, PageSize: bPage}
	r := rand.New(rand.NewPCG(3, 4))
	doc, err := kvcache.NewStore(L)
	require.NoError(b, err)
	row := bKV * bDim
	for done := 0; done < bDoc; done += 1024 {
		var ks, vs [][]uint16
		for range bLayers {
			ks = append(ks, toF16(randoms(r, 1024*row)))
			vs = append(vs, toF16(randoms(r, 1024*row)))
		}
		doc.FillForTest(ks, vs, 1024)
	}
	for _, churn := range []int{0, 22} {
		b.Run(map[int]string{0: "stable", 22: "churn-22-pages"}[churn], func(b *testing.B) {
			middle := make([]int, 0, 28)
			for i := range 28 {
				middle = append(middle, 8+i*8)
			}
			step := 0
			sel := &stepSelector{page: bPage, pages: func() []int {
				last := (bDoc + step) / bPage
				return slices.Concat([]int{0}, middle, []int{last - 4, last - 3, last - 2, last - 1})
			}}
			c, err := kvcache.NewPaged(kvcache.Options{Layout: L, Heads: bHeads, Selector: sel, Capacity: bDoc + 8192, MaxBatch: 1, Prefix: doc})
			require.NoError(b, err)
			defer c.Close()
			c.Init(be, ml.DTypeF16, 1, bDoc+8192, 1)
			scale := 1 / math.Sqrt(float64(bDim))
			decode := func() {
				ctx := be.NewContext()
				defer ctx.Close()
				pos := int32(bDoc + step)
				require.NoError(b, c.StartForward(ctx, input.Batch{Positions: []int32{pos}, Sequences: []int{0}}, false))
				var outs []ml.Tensor
				for l := range bLayers {
					c.SetLayer(l)
					q := ctx.Input().FromFloats(randoms(r, bDim*bHeads), bDim, bHeads, 1)
					k := ctx.Input().FromFloats(randoms(r, bDim*bKV), bDim, bKV, 1)
					v := ctx.Input().FromFloats(randoms(r, bDim*bKV), bDim, bKV, 1)
					outs = append(outs, c.Attention(ctx, l, q, k, v, scale))
				}
				outs = append(outs, c.Outputs(ctx)...)
				ctx.Forward(outs...).Compute(outs...)
				require.NoError(b, c.Computed(ctx))
				step++
				// The next step's retrieved pages: churn of them replaced by
				// pages not seen before.
				for i := 0; i < churn; i++ {
					middle[(step*churn+i)%len(middle)] = 8 + r.IntN(bDoc/bPage-16)
				}
				slices.Sort(middle)
				middle = slices.Compact(middle)
				for len(middle) < 28 { // keep 28 distinct pages
					middle = append(middle, 8+r.IntN(bDoc/bPage-16))
					slices.Sort(middle)
					middle = slices.Compact(middle)
				}
			}
			decode() // the question's uploads: not part of a decode step
			before := c.Stats().UploadedBytes
			b.ResetTimer()
			for range b.N {
				decode()
			}
			b.StopTimer()
			b.ReportMetric(float64(c.Stats().UploadedBytes-before)/float64(b.N)/(1<<20), "MiB/step")
		})
	}
}

// On the CPU backend pools are host memory and take uploads as plain
// copies (HostUploads). Pools on other backends take them through their
// staging tensors (DeviceUploads), or as graph inputs; the CPU backend
// runs both paths with HostUploads off. All three write the same bytes:
// the same attention outputs bit for bit, for
// a dense selection, a sparse one and head groups, with a document forked
// by two sessions that attend to different pages, over a question and two
// decode steps each (pass checks the invariants before and after every
// pass).
func TestHostUploadsMatchGraphUploads(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	defer func(h, d bool, sp int) {
		kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages = h, d, sp
	}(kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages)

	cases := []struct {
		name   string
		groups []paging.Group
		pages  [2][][]int // sessions A and B
	}{
		{"dense, every page", []paging.Group{{}}, [2][][]int{{nil}, {nil}}},
		{"sparse", []paging.Group{{Budget: 48}}, [2][][]int{{{0, 2, 4}}, {{1, 3}}}},
		{"head groups", []paging.Group{{KVHeads: []int{0, 2}}, {KVHeads: []int{1, 3}, Budget: 48}},
			[2][][]int{{{1, 3}, {0, 4, 5}}, {nil, {2}}}},
	}
	const first = 85 // the document; then a question of 3 tokens and 2 decode steps
	steps := [][2]int{{first, first + 3}, {first + 3, first + 4}, {first + 4, first + 5}}
	total := first + 5
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(31, 32))
			var q, k, v [2][]float32 // per session (the document's part is shared)
			for s := range 2 {
				q[s], k[s], v[s] = randoms(r, total*tHeads*tDim), randoms(r, total*tKV*tDim), randoms(r, total*tKV*tDim)
			}
			copy(k[1][:first*tKV*tDim], k[0])
			copy(v[1][:first*tKV*tDim], v[0])
			cfg := paging.Config{PageSize: tPage, Sinks: 4, Window: 4}
			split := func(x []float32, per, from, to int) []float32 { return x[from*per : to*per] }
			type mode int
			const (
				graphInputs mode = iota
				hostCopies
				deviceStaging
				smallStaging // staging tensors of one page: a pass of more takes graph inputs
			)
			run := func(m mode) [][][]float32 {
				host := m == hostCopies
				kvcache.HostUploads, kvcache.DeviceUploads = host, m == deviceStaging || m == smallStaging
				kvcache.DeviceStagePages = 8
				if m == smallStaging {
					kvcache.DeviceStagePages = 1
				}
				writer, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 256, MaxBatch: 96,
					Selector: &fixedSelector{c: cfg, groups: []paging.Group{{}}, pages: [][]int{nil}}})
				require.NoError(t, err)
				defer writer.Close()
				writer.Init(b, ml.DTypeF16, 1, 256, 96)
				pass(t, b, writer, 0, split(q[0], tHeads*tDim, 0, first), split(k[0], tKV*tDim, 0, first), split(v[0], tKV*tDim, 0, first))
				var sessions [2]*kvcache.Paged
				for s := range 2 {
					c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 256, MaxBatch: 96,
						Selector: &fixedSelector{c: cfg, groups: tc.groups, pages: tc.pages[s]}, Prefix: writer.Store()})
					require.NoError(t, err)
					defer c.Close()
					c.Init(b, ml.DTypeF16, 1, 256, 96)
					sessions[s] = c
				}
				var out [][][]float32
				for _, st := range steps { // the two sessions interleaved
					for s, c := range sessions {
						out = append(out, pass(t, b, c, st[0], split(q[s], tHeads*tDim, st[0], st[1]), split(k[s], tKV*tDim, st[0], st[1]), split(v[s], tKV*tDim, st[0], st[1])))
						require.Equal(t, host, c.HostPooled(), "the CPU backend's pools are host memory")
					}
				}
				for _, c := range sessions {
					st := c.Stats()
					require.Positive(t, st.Uploads)
					switch m {
					case deviceStaging:
						require.Equal(t, st.Uploads, st.DeviceStaged, "every upload fits the staging tensors")
						require.Positive(t, st.StagingBytes)
					case smallStaging:
						require.Less(t, st.DeviceStaged, st.Uploads, "a group uploads several pages in one pass")
					default:
						require.Zero(t, st.DeviceStaged)
					}
				}
				return out
			}
			graph := run(graphInputs)
			require.Equal(t, graph, run(hostCopies))
			require.Equal(t, graph, run(deviceStaging))
			require.Equal(t, graph, run(smallStaging))
		})
	}
}

// hostMem finds a pool tensor's memory on the CPU backend, and refuses
// anything it could not write as a pool: another type, another size, a
// view that is not contiguous.
func TestHostMem(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 1, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	ctx := m.Backend().NewContext()
	defer ctx.Close()
	f16 := ctx.Input().FromBytes(ml.DTypeF16, u16le(toF16([]float32{1, 2, 3, 4, 5, 6})), 2, 3)
	cases := []struct {
		name  string
		t     ml.Tensor
		elems int
		want  int
	}{
		{"f16 tensor", f16, 6, 6},
		{"another size", f16, 4, 0},
		{"f32 tensor", ctx.Input().FromFloats([]float32{1, 2}, 2), 2, 0},
		{"permuted view", f16.Permute(ctx, 1, 0, 2, 3), 6, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.Len(t, kvcache.HostMem(tc.t, tc.elems), tc.want)
		})
	}
	// The memory found is the tensor's: what is written there is what
	// the backend reads back.
	mem := kvcache.HostMem(f16, 6)
	require.Equal(t, toF16([]float32{1, 2, 3, 4, 5, 6}), mem)
	copy(mem, toF16([]float32{6, 5, 4, 3, 2, 1}))
	read := f16.Cast(ctx, ml.DTypeF32) // a graph reads the tensor
	ctx.Forward(read).Compute(read)
	require.Equal(t, []float32{6, 5, 4, 3, 2, 1}, read.Floats())
}
