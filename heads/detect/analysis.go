// Package detect finds a model's retrieval heads and makes a heads.Profile
// of them. Detection follows the Retrieval Head paper (arXiv 2404.15574):
// decode needle-in-a-haystack answers greedily and score a head each time
// its most attended position is the needle token being copied. A data-free
// score (RazorAttention) counts echo and induction heads on repeated random
// tokens instead. Both need each head's top-1 attended position, which the
// Analysis cache computes beside exact attention; it is never in the normal
// decode path. Ablation is the paper's causal check.
package detect

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/model/input"

	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// Analysis is a dense cache (ollama's causal cache, as runtime.DenseCache
// makes it) that, while Record is set, also finds for every query of a
// forward pass and every layer and query head the cached position with the
// highest attention score. The attention output itself is computed exactly
// as the normal path computes it (nn.Attention over the same cache), so the
// logits do not change; the scores are computed a second time for the
// argmax. While Streaming is set it instead limits chosen KV heads to a
// window (the causal check, see Ablation).
//
// The cache holds one sequence whose tokens were appended in order (a
// runtime.Session), so cache cell i holds position i; Top relies on that.
type Analysis struct {
	ollamakv.Cache

	// Record turns the argmax on for the following forward passes.
	Record bool

	// Streaming, when set ([layer][kvHead], true = streaming), restricts the
	// attention of those KV heads' query heads to Window for the following
	// forward passes: the Retrieval Head paper's ablation, done with a
	// per-head mask (exact, not faster). Nil means dense attention.
	Streaming [][]bool
	Window    Window

	layers, heads int
	kvHeads       int
	permutedV     bool              // the backend caches V as [cells, headDim, kvHeads]
	positions     []int32           // positions of the current batch
	pending       []pendingTop      // argmax tensors of the current graph
	top           map[int32][]int32 // position -> [layer*heads + head] attended position
}

type pendingTop struct {
	layer int
	t     ml.Tensor // I32 [1, batch, heads]
}

var (
	_ arch.Attender = (*Analysis)(nil)
	_ arch.Hooks    = (*Analysis)(nil)
)

// NewSession starts a session on m whose cache is an Analysis.
func NewSession(m *runtime.Model) (*runtime.Session, *Analysis, error) {
	var a *Analysis
	s, err := m.NewSessionWith(func(m *runtime.Model) (ollamakv.Cache, error) {
		c, err := runtime.DenseCache(m)
		if err != nil {
			return nil, err
		}
		cfg := m.Config()
		a = &Analysis{Cache: c, layers: cfg.Layers, heads: cfg.Heads, kvHeads: cfg.KVHeads, top: map[int32][]int32{}}
		if bc, ok := m.Backend().(ml.BackendCacheConfig); ok {
			a.permutedV = bc.CacheConfig().PermutedV
		}
		return a, nil
	})
	if err != nil {
		return nil, nil, err
	}
	return s, a, nil
}

// StartForward remembers the batch's positions: the argmax rows follow them.
func (a *Analysis) StartForward(ctx ml.Context, batch input.Batch, reserve bool) error {
	a.positions = append(a.positions[:0], batch.Positions...)
	a.pending = a.pending[:0]
	if a.Streaming != nil {
		ok := len(a.Streaming) == a.layers
		for _, row := range a.Streaming {
			ok = ok && len(row) == a.kvHeads
		}
		if !ok {
			return fmt.Errorf("heads: the streaming mask must be [%d layers][%d KV heads]", a.layers, a.kvHeads)
		}
	}
	return a.Cache.StartForward(ctx, batch, reserve)
}

// Window is what a streaming head keeps: the first Sinks positions and the
// Recent positions up to and including the query's own.
type Window struct{ Sinks, Recent int }

// DefaultWindow is DuoAttention's streaming window.
var DefaultWindow = Window{Sinks: 64, Recent: 256}

// Attention implements arch.Attender.
func (a *Analysis) Attention(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64) ml.Tensor {
	var out, kq ml.Tensor
	if a.ablated(layer) {
		out, kq = a.windowed(ctx, layer, q, k, v, scale)
	} else {
		out = nn.Attention(ctx, q, k, v, scale, a.Cache) // stores k, v first; [headDim, heads, batch]
	}
	if !a.Record {
		return out
	}
	if kq == nil {
		kq = a.scores(ctx, q, scale)
	}
	top := kq.TopK(ctx, 1) // I32 [1, batch, heads], a view of a full argsort
	dst := ctx.Input().Empty(ml.DTypeI32, 1, top.Dim(1), top.Dim(2))
	ctx.Forward(top.Copy(ctx, dst))
	a.pending = append(a.pending, pendingTop{layer: layer, t: dst})
	return out
}

// scores returns the pre-softmax attention scores of q over the cache.
func (a *Analysis) scores(ctx ml.Context, q ml.Tensor, scale float64) ml.Tensor {
	// The same scores as the attention: keys [headDim, n_kv, kvHeads] times
	// queries [headDim, batch, heads] gives [n_kv, batch, heads] (GQA
	// broadcasts KV head g to query heads g*group..), scaled, plus the causal
	// mask [n_kv, batch] (-inf where a query may not look). Softmax keeps the
	// order, so its argmax is the argmax of these.
	key, _, mask := a.Cache.Get(ctx)
	kq := key.Permute(ctx, 0, 2, 1, 3).MulmatFullPrec(ctx, q.Permute(ctx, 0, 2, 1, 3))
	kq = kq.Scale(ctx, scale)
	if mask != nil {
		if mask.DType() != ml.DTypeF32 {
			mask = mask.Cast(ctx, ml.DTypeF32)
		}
		kq = kq.Add(ctx, mask)
	}
	return kq
}

func (a *Analysis) ablated(layer int) bool {
	return a.Streaming != nil && slices.Contains(a.Streaming[layer], true)
}

// windowed is attention in which the query heads of streaming KV heads see
// only the window: softmax(K·Q·scale + mask) V with a mask [n_kv, batch,
// heads] built on the host (cell c holds position c; -inf past the query
// and, for streaming heads, between the sinks and the recent window). It
// also returns the masked scores before the softmax, for the argmax.
func (a *Analysis) windowed(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64) (out, scores ml.Tensor) {
	ctx.Forward(q)
	if k != nil {
		ctx.Forward(k, v)
		a.Cache.Put(ctx, k, v)
	}
	key, value, causal := a.Cache.Get(ctx) // key [headDim, kvHeads, n_kv]
	n, batch := causal.Dim(0), q.Dim(2)
	group := a.heads / a.kvHeads
	mask := make([]float32, n*batch*a.heads)
	inf := float32(math.Inf(-1))
	for h := range a.heads {
		streaming := a.Streaming[layer][h/group]
		for b, pos := range a.positions {
			row := mask[(h*batch+b)*n : (h*batch+b+1)*n]
			for c := range row {
				hidden := int32(c) > pos ||
					streaming && c >= a.Window.Sinks && int32(c) <= pos-int32(a.Window.Recent)
				if hidden {
					row[c] = inf
				}
			}
		}
	}
	kq := key.Permute(ctx, 0, 2, 1, 3).MulmatFullPrec(ctx, q.Permute(ctx, 0, 2, 1, 3)) // [n_kv, batch, heads]
	scores = kq.Scale(ctx, scale).Add(ctx, ctx.Input().FromFloats(mask, n, batch, a.heads))
	if !a.permutedV {
		value = value.Permute(ctx, 1, 2, 0, 3).Contiguous(ctx) // [headDim, kvHeads, n_kv] -> [n_kv, headDim, kvHeads]
	}
	out = value.Mulmat(ctx, scores.Softmax(ctx)).Permute(ctx, 0, 2, 1, 3).Contiguous(ctx) // [headDim, batch, heads] -> [headDim, heads, batch]
	return out, scores
}

// NeedQueries implements arch.Hooks: the analysis needs one graph per pass.
func (a *Analysis) NeedQueries(int) bool { return false }

// SetQueries implements arch.Hooks (never called).
func (a *Analysis) SetQueries(int, [][]float32) error { return nil }

// Outputs implements arch.Hooks: the argmax copies must be computed.
func (a *Analysis) Outputs(ml.Context) []ml.Tensor {
	out := make([]ml.Tensor, len(a.pending))
	for i, p := range a.pending {
		out[i] = p.t
	}
	return out
}

// Computed implements arch.Hooks: it copies the argmax rows to the host.
func (a *Analysis) Computed(ml.Context) error {
	for _, p := range a.pending {
		b := p.t.Bytes()
		batch := len(a.positions)
		if len(b) != 4*batch*a.heads {
			return fmt.Errorf("heads: layer %d argmax has %d bytes, want %d", p.layer, len(b), 4*batch*a.heads)
		}
		for i, pos := range a.positions {
			row := a.top[pos]
			if row == nil {
				row = make([]int32, a.layers*a.heads)
				for j := range row {
					row[j] = -1
				}
				a.top[pos] = row
			}
			for h := 0; h < a.heads; h++ {
				// element (0, i, h) of [1, batch, heads]
				at := int32(binary.LittleEndian.Uint32(b[4*(h*batch+i):]))
				if at < 0 || at > pos {
					return fmt.Errorf("heads: layer %d head %d at position %d attends to cell %d: the cache is not one in-order sequence", p.layer, h, pos, at)
				}
				row[p.layer*a.heads+h] = at
			}
		}
	}
	a.pending = a.pending[:0]
	return nil
}

// Top returns the position that query head h of layer attended to most from
// position pos, or -1 if that was not recorded.
func (a *Analysis) Top(pos int32, layer, head int) int32 {
	row := a.top[pos]
	if row == nil {
		return -1
	}
	return row[layer*a.heads+head]
}

// Reset forgets every recorded argmax.
func (a *Analysis) Reset() { clear(a.top) }
