package squeezed

import (
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/kvrecall/kvrecall/paging"
)

// BenchmarkSelectStep times the "squeezed" selector's Select for one
// decode step on the clusters of a stored document
// ($KVRECALL_BENCH_CLUSTERS: its .kvs file, tiny preset: 4 layers × 2 KV
// heads × headDim 32, 65536 tokens, as for BenchmarkStepLimit; use a
// copy). One op is one decode step: Select for each of the 4 clustered
// layers, one query token of 8 query heads (GQA 4), budget 2048, default
// sinks (64), window (256) and pages (64 tokens), random queries (the
// tiny preset's keys have no structure: every head is scored flat after
// its probing lookups, which the warm-up does).
//
//	KVRECALL_BENCH_CLUSTERS=/tmp/selectcost/pages-79a00b94728292d3.kvs \
//	    go test ./squeezed -run XXX -bench SelectStep -benchtime 2000x
//
// Parts, each a decode step:
//   - old: the reference Select (select_ref_test.go: the code before
//     this rework), on its own selector;
//   - new: Select;
//   - rows: Select told that the rows suffice (paging.Queries.RowsSuffice,
//     as the cache asks on a decode step attended in place): the same
//     rows, only the loose tokens listed, no sorted token list;
//   - score-old: the former Transposed.Scores (vek32.MatMul_Into per
//     block) of every head's GQA group, what old does first;
//   - score: Transposed.Scores (score4AVX2), what new does first;
//   - score-rank: score, then TopRanked per query head (the ranked
//     lists; what is left of Select above it is the taking of clusters
//     and the lists of tokens, pages and rows).
//
// The six run in turn, selectRounds times (sub-benchmarks old#01 ...).
const selectRounds = 3

func BenchmarkSelectStep(b *testing.B) {
	const layers, kvHeads, d, tokens, G, budget = benchLayers, benchKVHeads, benchD, benchTokens, benchG, benchBudget
	ix := storedClusters(b)
	c := paging.Config{PageSize: 64, Budget: budget, Layers: layers, KVHeads: kvHeads, Options: map[string]any{OptionKey: ix}}
	newSel := func() *selector {
		s, err := paging.New("squeezed", c)
		if err != nil {
			b.Fatal(err)
		}
		return s.(*selector)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	qs := make([]*paging.Queries, 64)
	for i := range qs {
		q := make([]float32, kvHeads*G*d)
		for t := range q {
			q[t] = float32(rng.NormFloat64())
		}
		qs[i] = &paging.Queries{Q: [][]float32{q}, Heads: kvHeads * G}
	}
	rowsQs := make([]*paging.Queries, len(qs))
	for i, q := range qs {
		rowsQs[i] = &paging.Queries{Q: q.Q, Heads: q.Heads, RowsSuffice: true}
	}
	// A decode step some tokens into the answer of a 16-token question.
	upto := func(i int) int { return tokens + 16 + i%64 }
	type selectFn func(layer int, sum paging.Summaries, q *paging.Queries, upto int) paging.Selection
	step := func(sel selectFn, qs []*paging.Queries, i int) {
		for l := range layers {
			sel(l, nil, qs[i%len(qs)], upto(i))
		}
	}
	ref := &refSelector{selector: newSel()}
	cur := newSel()
	for i := range 16 { // the probing lookups: every head then goes flat
		step(ref.Select, qs, i)
		step(cur.Select, qs, i)
	}
	for l := range layers {
		for g := range kvHeads {
			if cur.flatHead(l, g) == nil {
				b.Fatalf("layer %d KV head %d is not scored flat after the warm-up", l, g)
			}
		}
	}
	run := func(sel selectFn, qs []*paging.Queries) func(b *testing.B) {
		return func(b *testing.B) {
			b.ReportAllocs()
			for i := range b.N {
				step(sel, qs, i)
			}
		}
	}
	var sc Scratch
	var sbuf, tmp []float32
	var out []int32
	olds := map[*Head]*oldTransposed{}
	for l := range layers {
		for g := range kvHeads {
			olds[ix.Heads[l][g]] = oldTranspose(ix.Heads[l][g], G)
		}
	}
	scoreOld := func(b *testing.B) {
		for i := range b.N {
			q := qs[i%len(qs)].Q[0]
			for l := range layers {
				for g := range kvHeads {
					h := ix.Heads[l][g]
					sbuf = grow(sbuf, G*h.K())
					tmp = olds[h].Scores(sbuf, q[g*G*d:(g+1)*G*d], tmp)
				}
			}
		}
	}
	parts := func(rank bool) func(b *testing.B) {
		return func(b *testing.B) {
			b.ReportAllocs()
			for i := range b.N {
				q := qs[i%len(qs)].Q[0]
				_, _, tokBudget := cur.bounds(upto(i))
				for l := range layers {
					for g := range kvHeads {
						h, tr := ix.Heads[l][g], cur.flatHead(l, g)
						k := h.K()
						sbuf = grow(sbuf, G*k)
						tmp = tr.Scores(sbuf, q[g*G*d:(g+1)*G*d], tmp)
						if !rank {
							continue
						}
						out = out[:0]
						for j := range G {
							out = h.TopRanked(sbuf[j*k:(j+1)*k], tokBudget, &sc, out)
						}
					}
				}
			}
		}
	}
	// Rounds of the six in turn (-count repeats each sub-benchmark in a
	// row, not the set), so that the machine's drift cancels in the
	// ratios of one round.
	for range selectRounds {
		b.Run("old", run(ref.Select, qs))
		b.Run("new", run(cur.Select, qs))
		b.Run("rows", run(cur.Select, rowsQs))
		b.Run("score-old", scoreOld)
		b.Run("score", parts(false))
		b.Run("score-rank", parts(true))
	}
}

// BenchmarkSelectRowsOnly times one decode step's Select in full (full:
// the sorted token list and its pages, as before) and in the rows-only
// form (rows: paging.Queries.RowsSuffice, what the cache asks for on a
// decode step attended in place), alternately, selectRounds times, on
// the clusters of a stored document of any shape: $KVRECALL_BENCH_CLUSTERS
// (a copy of its .kvs file) and $KVRECALL_BENCH_SHAPE, "layers,kvHeads,
// headDim,tokens,G" (default the tiny preset's 64k document,
// "4,2,32,65536,4"; the 1b preset's 32k one is "16,8,64,32768,4"). One op
// is a step: Select for every layer, one query token of random queries,
// budget 2048, the default sinks, window and 64-token pages, some tokens
// into the answer of a 16-token question. The heads' centroid lookups
// (flat or hierarchical, as the probing lookups of the warm-up decide)
// are the same in both; the difference is the lists.
//
//	KVRECALL_BENCH_CLUSTERS=/tmp/ro/pages-9334c1b69eeae45c.kvs KVRECALL_BENCH_SHAPE=16,8,64,32768,4 \
//	    go test ./squeezed -run XXX -bench SelectRowsOnly -benchtime 200x
func BenchmarkSelectRowsOnly(b *testing.B) {
	path := os.Getenv("KVRECALL_BENCH_CLUSTERS")
	if path == "" {
		b.Skip("set KVRECALL_BENCH_CLUSTERS to a stored clusters file (a copy) and KVRECALL_BENCH_SHAPE to its shape")
	}
	shape := []int{benchLayers, benchKVHeads, benchD, benchTokens, benchG}
	if s := os.Getenv("KVRECALL_BENCH_SHAPE"); s != "" {
		f := strings.Split(s, ",")
		if len(f) != len(shape) {
			b.Fatalf("KVRECALL_BENCH_SHAPE %q: want layers,kvHeads,headDim,tokens,G", s)
		}
		for i := range f {
			n, err := strconv.Atoi(strings.TrimSpace(f[i]))
			if err != nil || n <= 0 {
				b.Fatalf("KVRECALL_BENCH_SHAPE %q: %q is not a positive number", s, f[i])
			}
			shape[i] = n
		}
	}
	layers, kvHeads, d, tokens, G := shape[0], shape[1], shape[2], shape[3], shape[4]
	ix, err := ReadFile(path, layers, kvHeads, d, tokens)
	if err != nil {
		b.Fatal(err)
	}
	c := paging.Config{PageSize: 64, Budget: benchBudget, Layers: layers, KVHeads: kvHeads, Options: map[string]any{OptionKey: ix}}
	s, err := paging.New("squeezed", c)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	full := make([]*paging.Queries, 64)
	rows := make([]*paging.Queries, len(full))
	for i := range full {
		q := make([]float32, kvHeads*G*d)
		for t := range q {
			q[t] = float32(rng.NormFloat64())
		}
		full[i] = &paging.Queries{Q: [][]float32{q}, Heads: kvHeads * G}
		rows[i] = &paging.Queries{Q: full[i].Q, Heads: kvHeads * G, RowsSuffice: true}
	}
	upto := func(i int) int { return tokens + 16 + i%64 }
	step := func(qs []*paging.Queries, i int) {
		for l := range layers {
			s.Select(l, nil, qs[i%len(qs)], upto(i))
		}
	}
	for i := range 16 { // the probing lookups
		step(full, i)
	}
	run := func(qs []*paging.Queries) func(b *testing.B) {
		return func(b *testing.B) {
			b.ReportAllocs()
			for i := range b.N {
				step(qs, i)
			}
		}
	}
	for range selectRounds {
		b.Run("full", run(full))
		b.Run("rows", run(rows))
	}
}
