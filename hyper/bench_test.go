package hyper_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/hyper"
)

// BenchmarkAttention times one layer's causal prefill attention on the CPU
// backend, with the tiny preset's heads (8 query heads, 2 KV heads, head
// dim 32): HyperAttention with the paper's defaults against exact attention
// in chunks of 512 queries (the work of a dense prefill in 512-token
// batches; n/64 from 32k on, to stay within ggml's graph size). Run it
// alone:
//
//	go test ./hyper -run '^$' -bench Attention -benchtime 1x
//
// 131072 tokens take about 10 minutes (exact attention is 4x the 65536
// row); select rows with -bench 'Attention/.*/131072'.
func BenchmarkAttention(b *testing.B) {
	s := hyper.Shape{Heads: 8, KVHeads: 2, HeadDim: 32}
	scale := 1 / math.Sqrt(float64(s.HeadDim))
	for _, n := range []int{8192, 16384, 32768, 65536, 131072} {
		r := rand.New(rand.NewPCG(1, uint64(n)))
		q, k, v := randoms(r, n*s.Heads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim)
		for _, method := range []string{"exact", "hyper"} {
			b.Run(fmt.Sprintf("%s/%d", method, n), func(b *testing.B) {
				for range b.N {
					ctx := backend.NewContext()
					qt := ctx.Input().FromFloats(q, s.HeadDim, s.Heads, n)
					kt := ctx.Input().FromFloats(k, s.HeadDim, s.KVHeads, n)
					vt := ctx.Input().FromFloats(v, s.HeadDim, s.KVHeads, n)
					var out ml.Tensor
					if method == "hyper" {
						out = hyper.Attention(ctx, hyper.Default(), qt, kt, vt, scale, true)
					} else {
						out = hyper.Causal(ctx, qt, kt, vt, scale, max(512, n/64))
					}
					ctx.Forward(out).Compute(out)
					ctx.Close()
				}
			})
		}
	}
}
