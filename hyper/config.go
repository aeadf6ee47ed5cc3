// Package hyper implements HyperAttention (Han et al., arXiv 2310.05869;
// public code insuhan/hyper-attn) for long prefill: keys and queries are
// hashed with SimHash, sorted by bucket, attended exactly inside the
// diagonal blocks of the sorted order, plus a uniform sample of key columns
// weighted n/m; causal attention is the paper's recursive halving, exact
// below MinSeqLen. Attention builds it as ggml graph ops through ollama's
// ml API (so any ggml backend runs it); Reference is the same algorithm in
// plain Go (float64), with the same hash, sort and samples from one seed.
package hyper

import (
	"fmt"
	"math"
	"math/rand/v2"
)

// Config holds HyperAttention's settings. The defaults are the paper's.
type Config struct {
	// Projections is r, the number of SimHash projections: 2^r buckets.
	Projections int
	// BlockSize is b, the size of the diagonal blocks of the sorted order.
	BlockSize int
	// Samples is m, the number of uniformly sampled key columns per head.
	Samples int
	// MinSeqLen: causal attention over at most this many tokens is exact,
	// and so is unmasked attention with fewer queries than this.
	MinSeqLen int
	// Seed fixes the projections and the samples.
	Seed uint64
}

// Default returns the paper's defaults: 7 projections (128 buckets), blocks
// of 256, 256 samples, exact below 4096 tokens.
func Default() Config {
	return Config{Projections: 7, BlockSize: 256, Samples: 256, MinSeqLen: 4096, Seed: 1}
}

// MaxTokens bounds the sequence: a sort key is bucket·2^17 + index in a
// float32, exact up to 2^24 (so 2^r·n <= 2^24 as well).
const MaxTokens = 1 << 17

// Validate reports the first bad setting by name.
func (c Config) Validate() error {
	switch {
	case c.Projections < 1 || c.Projections > 7:
		return fmt.Errorf("hyper: projections %d: want 1..7 (sort keys bucket·2^17+index must stay exact in float32)", c.Projections)
	case c.BlockSize < 1:
		return fmt.Errorf("hyper: block size %d: want at least 1", c.BlockSize)
	case c.Samples < 0:
		return fmt.Errorf("hyper: samples %d: want 0 or more", c.Samples)
	case c.MinSeqLen < 1:
		return fmt.Errorf("hyper: min_seq_len %d: want at least 1", c.MinSeqLen)
	}
	return nil
}

// projections returns the SimHash directions, [r][d] row-major: standard
// normal draws from the seed, shared by every head and level (as in the
// public code).
func (c Config) projections(d int) []float32 {
	r := rand.New(rand.NewPCG(c.Seed, 0x9e3779b97f4a7c15))
	p := make([]float32, c.Projections*d)
	for i := range p {
		p[i] = float32(r.NormFloat64())
	}
	return p
}

// samples returns the sampled sorted-key indices of one unmasked call over
// keys [klo, khi) (nk keys), m per KV head, [kvHeads][m]: uniform with
// replacement, drawn from a generator seeded by the seed and the key range,
// so the reference and the graph draw the same ones in any order.
func (c Config) samples(klo, khi, kvHeads int) [][]int32 {
	r := rand.New(rand.NewPCG(c.Seed^0x5bd1e995, uint64(klo)<<32|uint64(khi)))
	nk := khi - klo
	out := make([][]int32, kvHeads)
	for h := range out {
		out[h] = make([]int32, c.Samples)
		for j := range out[h] {
			out[h][j] = int32(r.IntN(nk))
		}
	}
	return out
}

// blocks returns the number of blocks and the query block size of an
// unmasked call: ceil(nk/b) key blocks of b keys (the last padded), and
// queries split into as many blocks of ceil(nq/blocks).
func (c Config) blocks(nq, nk int) (nb, bq int) {
	nb = (nk + c.BlockSize - 1) / c.BlockSize
	bq = (nq + nb - 1) / nb
	return nb, bq
}

// grayRank is the position of bucket bits in the reflected Gray code
// sequence, so that neighbouring buckets in sorted order differ in one
// projection's sign: bit i of the rank is the parity of bits i..r-1.
// (The public code indexes its Gray sequence by the bits instead; the rank
// is the order that puts similar buckets next to each other.)
func grayRank(bits, r int) int {
	rank := 0
	for i := r - 1; i >= 0; i-- {
		par := 0
		for j := i; j < r; j++ {
			par ^= bits >> j & 1
		}
		rank |= par << i
	}
	return rank
}

var negInf = math.Inf(-1)
