package heads

import (
	"fmt"

	"github.com/kvrecall/kvrecall/gguf"
)

// MetaRetrievalHeads is the GGUF key, after the architecture's prefix
// ("llama.kvrecall.retrieval_heads"), under which the foundry's constructed
// models record their retrieval heads: int32 pairs layer, query head.
const MetaRetrievalHeads = "kvrecall.retrieval_heads"

// Head names a query head of a layer.
type Head struct{ Layer, Head int }

// Recorded returns the retrieval heads a model file records in its
// metadata (the foundry's recall models do), and whether it records any.
func Recorded(f *gguf.File) ([]Head, bool, error) {
	key := f.Architecture() + "." + MetaRetrievalHeads
	v, ok := f.Get(key)
	if !ok {
		return nil, false, nil
	}
	pairs, ok := v.([]int32)
	if !ok || len(pairs)%2 != 0 {
		return nil, true, fmt.Errorf("heads: %s: %s holds %T of length %d, want layer/head int32 pairs", f.Path, key, v, len(pairs))
	}
	var out []Head
	for i := 0; i < len(pairs); i += 2 {
		out = append(out, Head{int(pairs[i]), int(pairs[i+1])})
	}
	return out, true, nil
}

// FromQueryHeads classifies KV heads from a list of retrieval query
// heads: a KV head is a retrieval head if any of the query heads that read
// it is one, else a streaming head.
func FromQueryHeads(layers, heads, kvHeads int, retrieval []Head) (Mask, error) {
	if heads <= 0 || kvHeads <= 0 || heads%kvHeads != 0 {
		return nil, fmt.Errorf("heads: %d query heads for %d KV heads", heads, kvHeads)
	}
	m := make(Mask, layers)
	for l := range m {
		m[l] = make([]bool, kvHeads)
		for h := range m[l] {
			m[l][h] = true
		}
	}
	for _, r := range retrieval {
		if r.Layer < 0 || r.Layer >= layers || r.Head < 0 || r.Head >= heads {
			return nil, fmt.Errorf("heads: retrieval head %d of layer %d is outside the model (%d layers, %d heads)", r.Head, r.Layer, layers, heads)
		}
		m[r.Layer][r.Head/(heads/kvHeads)] = false
	}
	return m, nil
}

// Count returns the streaming and retrieval KV heads of m over layers ×
// kvHeads.
func (m Mask) Count(layers, kvHeads int) (streaming, retrieval int) {
	for l := 0; l < layers; l++ {
		for h := 0; h < kvHeads; h++ {
			if m.Streaming(l, h) {
				streaming++
			} else {
				retrieval++
			}
		}
	}
	return streaming, retrieval
}
