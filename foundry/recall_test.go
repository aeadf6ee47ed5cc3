package foundry

import (
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRecallAnswersWithReference(t *testing.T) {
	for _, o := range []RecallOptions{{}, {Layers: 4, PrevLayer: 1, RetrievalLayer: 2}, {Deep: true}} {
		r, err := BuildRecall(o)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(7, 7))
		rv := r.Vocab
		for depth := 0; depth <= 100; depth += 50 {
			const n = 600
			var p []int32
			p = append(p, 1)
			for len(p) < n {
				p = append(p, rv.Filler[rng.IntN(len(rv.Filler))])
			}
			key := rv.Keys[rng.IntN(len(rv.Keys))]
			want := []int32{rv.Values[rng.IntN(len(rv.Values))], rv.Values[rng.IntN(len(rv.Values))], rv.Values[rng.IntN(len(rv.Values))]}
			at := 1 + (n-1)*depth/100
			needle := append([]int32{key}, want...)
			p = slices.Insert(p, at, needle...)
			p = append(p, rv.Questions[3], rv.Questions[4], rv.Questions[5], key)
			got := r.greedy(p, 3)
			if !slices.Equal(got, want) {
				t.Errorf("layers %d depth %d: got %v want %v", r.Opts.Layers, depth, got, want)
			}
		}
	}
}

func TestEnsureRebuildsOtherVersions(t *testing.T) {
	dir := t.TempDir()
	builds := 0
	build := func(p string) error {
		builds++
		return WriteRandom(p, RandomOptions{Arch: "llama", Shape: Shape{Hidden: 32, Layers: 1, Heads: 2, KVHeads: 1, HeadDim: 16, FFN: 32, Vocab: 300, Context: 64, RopeBase: 10000}, Seed: 1})
	}
	p, err := Ensure(dir, "m.gguf", build, nil)
	require.NoError(t, err)
	require.True(t, Current(p))
	_, err = Ensure(dir, "m.gguf", build, nil)
	require.NoError(t, err)
	require.Equal(t, 1, builds, "a current file is reused")
	require.NoError(t, os.WriteFile(p, []byte("GGUF junk"), 0o644))
	_, err = Ensure(dir, "m.gguf", build, nil)
	require.NoError(t, err)
	require.Equal(t, 2, builds, "a broken or stale file is rebuilt")
}

// In the deep layout every recorded head does its job on a needle prompt in
// the float64 reference: retrieval heads put their top weight on the value
// being copied, the echo head on the earlier occurrence of its own token.
func TestDeepRecallHeads(t *testing.T) {
	r, err := BuildRecall(RecallOptions{Deep: true})
	require.NoError(t, err)
	require.Equal(t, []Head{{2, 0}, {2, 1}, {4, 3}}, r.RetrievalHeads)
	require.Equal(t, []Head{{1, 0}}, r.EchoHeads)
	_, err = BuildRecall(RecallOptions{Deep: true, Layers: 4})
	require.ErrorContains(t, err, "deep layout")

	rv := r.Vocab
	rng := rand.New(rand.NewPCG(3, 3))
	var p []int32
	p = append(p, 1)
	for len(p) < 300 {
		p = append(p, rv.Filler[rng.IntN(len(rv.Filler))])
	}
	key := rv.Keys[5]
	p = slices.Insert(p, 100, key, rv.Values[7], rv.Values[8], rv.Values[9])
	p = append(p, rv.Questions[0], rv.Questions[1], rv.Questions[2], key)
	att := r.Attention(p)
	top := func(w []float64) int { return slices.Index(w, slices.Max(w)) }
	for _, h := range r.RetrievalHeads {
		require.Equal(t, 101, top(att[h.Layer][h.Head]), "retrieval head %v", h)
	}
	for _, h := range r.EchoHeads {
		require.Equal(t, 100, top(att[h.Layer][h.Head]), "echo head %v", h)
	}
	require.Equal(t, len(p)-2, top(att[0][0]), "previous-token head")
}
