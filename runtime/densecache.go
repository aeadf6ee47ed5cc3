package runtime

import (
	"errors"
	"fmt"
	"math"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"

	"github.com/kvrecall/kvrecall/internal/backendmem"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// denseCache is the KV cache of DenseCache for models without sliding
// windows: one sequence whose tokens are appended in order, so cell i holds
// position i and the cells in use are always [0, n). It stores and returns
// exactly what ollama's causal cache does (same cells, same padding of the
// attended cells to CachePadding, same mask values and layouts), so logits
// are bit-identical to it and to llama.cpp, but a step's fixed cost does
// not grow with the context:
//
//   - ollama's StartForward scans every cell for a free one (findLocs) and
//     builds the [cells, batch] mask on the host cell by cell (with a
//     slices.Contains per cell), into a fresh Go slice and a fresh backend
//     buffer each step: 0.27 ms of a 8.4 ms step at 8k on the tiny preset,
//     0.07 ms at 2k (docs/performance.md).
//   - here the cells to write are a view of a persistent arange (no input
//     buffer, no scan), and a one-token step's mask is a view of a
//     persistent row, 0 for cells [0, zeroed) and -Inf beyond, of which a
//     step writes only the cells that changed (one, in steady decoding).
//     Batches of several tokens (prefill) build their mask in the graph
//     (kvcache.CausalMask), as the paged cache does.
type denseCache struct {
	backend ml.Backend
	dtype   ml.DType
	config  *ml.CacheConfig
	cells   int // capacity in cells, padded to config.CachePadding

	n int // cells in use: [0, n)

	// The current forward pass.
	layer    int
	batch    int
	attended int       // cells the batch's queries read: n+batch padded
	loc      ml.Tensor // I32 [batch]: the cells of the batch's keys
	mask     ml.Tensor // [attended, batch]

	fixed  ml.Context // holds arange and row for the cache's life
	arange ml.Tensor  // I32 [cells]: i at i
	row    ml.Tensor  // F32 [cells]: the mask of a one-token step
	zeroed int        // row is 0 in [0, zeroed) and -Inf from zeroed on

	ctxs         map[int]ml.Context
	keys, values map[int]ml.Tensor

	// The kept graph of one-token steps (densestep.go), when keepGraph.
	keepGraph  bool
	step       *stepGraph
	stepBuilds int // graphs built for it, for tests
}

// newDenseCache returns an uninitialized cache (Init allocates it).
func newDenseCache() *denseCache {
	return &denseCache{ctxs: map[int]ml.Context{}, keys: map[int]ml.Tensor{}, values: map[int]ml.Tensor{}, keepGraph: denseStepGraphs}
}

var (
	_ ollamakv.Cache  = (*denseCache)(nil)
	_ arch.Positioner = (*denseCache)(nil)
)

func (c *denseCache) SetConfig(config ml.CacheConfig) {
	if c.config != nil {
		panic("dense cache: config cannot be changed after it was set")
	}
	c.config = &config
}

// Init allocates the arange and the mask row ([cells] each, 8 bytes a
// cell beside the keys and values); the keys and values of a layer are
// allocated at its first Put, as ollama's causal cache does.
func (c *denseCache) Init(backend ml.Backend, dtype ml.DType, maxSequences, capacity, maxBatch int) {
	if maxSequences != 1 {
		panic(fmt.Sprintf("dense cache: holds one sequence, not %d", maxSequences))
	}
	if c.config == nil {
		var config ml.CacheConfig
		if cc, ok := backend.(ml.BackendCacheConfig); ok {
			config = cc.CacheConfig()
		}
		c.config = &config
	}
	if c.config.CachePadding == 0 {
		c.config.CachePadding = 1
	}
	if c.config.MaskDType == ml.DTypeOther {
		c.config.MaskDType = ml.DTypeF32
	}
	c.backend, c.dtype = backend, dtype
	c.cells = roundUp(capacity, c.config.CachePadding)
	c.fixed = backend.NewContextSize(2).Input()
	idx := make([]int32, c.cells)
	row := make([]float32, c.cells)
	ninf := float32(math.Inf(-1))
	for i := range idx {
		idx[i] = int32(i)
		row[i] = ninf
	}
	c.arange = c.fixed.FromInts(idx, c.cells)
	c.row = c.fixed.FromFloats(row, c.cells)
}

func roundUp(n, pad int) int { return (n + pad - 1) / pad * pad }

func (c *denseCache) Close() {
	c.step.close()
	c.step = nil
	for _, ctx := range c.ctxs {
		ctx.Close()
	}
	if c.fixed != nil {
		c.fixed.Close()
		c.fixed = nil
	}
}

// errDenseOrder is returned for batches that do not continue the sequence.
var errDenseOrder = errors.New("dense cache: holds one sequence appended in order")

func (c *denseCache) StartForward(ctx ml.Context, batch input.Batch, reserve bool) error {
	n := len(batch.Positions)
	if n == 0 {
		return fmt.Errorf("dense cache: empty batch")
	}
	c.batch = n
	pos0 := c.n
	if reserve {
		// The graph of a pass of this batch at its positions, built to
		// reserve the compute buffer (reserveDense), nothing stored: the
		// cells before the batch and the batch's own are attended, as the
		// real pass at these positions will. (ollama's caches reserve the
		// worst case of every cell; for a prefill that is a buffer for
		// the whole capacity, [cells, batch, heads] f32 scores, when the
		// prompt may be a fraction of it.)
		pos0 = int(batch.Positions[0])
		last := int(batch.Positions[n-1])
		if pos0 < 0 || last != pos0+n-1 || last >= c.cells {
			return fmt.Errorf("dense cache: reserve for positions %d..%d: not %d consecutive positions within the %d cells", pos0, last, n, c.cells)
		}
		c.attended = min(c.cells, roundUp(last+1, c.config.CachePadding))
	} else {
		for i, p := range batch.Positions {
			if int(p) != c.n+i {
				return fmt.Errorf("%w: token %d of the batch has position %d, the next cell is %d", errDenseOrder, i, p, c.n+i)
			}
			if i < len(batch.Sequences) && batch.Sequences[i] != 0 {
				return fmt.Errorf("%w: token %d of the batch is of sequence %d", errDenseOrder, i, batch.Sequences[i])
			}
		}
		if c.n+n > c.cells {
			return fmt.Errorf("%w (cache: %d cells, %d used, batch: %d)", ollamakv.ErrKvCacheFull, c.cells, c.n, n)
		}
		c.attended = roundUp(c.n+n, c.config.CachePadding)
	}
	c.loc = c.arange.View(ctx, pos0*4, n)
	if n == 1 && !reserve {
		c.openRow(c.n + 1)
		c.mask = c.row.View(ctx, 0, c.attended) // [attended, 1]
	} else {
		// Cells [0, pos0) are attended by every row, the batch's own
		// causally, the padding beyond by none.
		c.mask = kvcache.CausalMask(ctx, pos0, c.attended, n)
	}
	if c.config.MaskDType != ml.DTypeF32 {
		c.mask = c.mask.Cast(ctx, c.config.MaskDType)
	}
	if !reserve {
		c.n += n
	}
	return nil
}

// Positions are the batch's cells (cell i holds position i): the view of
// the arange that StartForward made for the cells to write, I32 [batch]
// (arch.Positioner).
func (c *denseCache) Positions(ml.Context) ml.Tensor { return c.loc }

// openRow makes the mask row 0 in [0, upto) and -Inf beyond, writing only
// the cells that differ from what it holds (on the host, before the graph
// that reads it is computed).
func (c *denseCache) openRow(upto int) {
	switch {
	case upto > c.zeroed:
		setF32(c.row, c.zeroed, make([]float32, upto-c.zeroed))
	case upto < c.zeroed:
		ninf := make([]float32, c.zeroed-upto)
		for i := range ninf {
			ninf[i] = float32(math.Inf(-1))
		}
		setF32(c.row, upto, ninf)
	}
	c.zeroed = upto
}

func (c *denseCache) SetLayer(layer int) { c.layer = layer }

// Put stores the batch's keys and values [headDim, kvHeads, batch] in its
// cells (ggml_set_rows, as ollama's causal cache: keys [headDim, kvHeads,
// cells], values [cells, headDim, kvHeads] when the backend wants them
// permuted).
func (c *denseCache) Put(ctx ml.Context, key, value ml.Tensor) {
	kHeadDim, vHeadDim := key.Dim(0), value.Dim(0)
	kvHeads, n := key.Dim(1), key.Dim(2)
	if n != c.batch {
		panic(fmt.Errorf("dense cache: layer %d stores %d tokens, the batch has %d", c.layer, n, c.batch))
	}
	if _, ok := c.keys[c.layer]; !ok {
		// Layer-bound tensors: created under backendmem's lock (other
		// sessions create theirs concurrently).
		backendmem.Do(func() {
			if _, ok := c.ctxs[c.layer]; !ok {
				c.ctxs[c.layer] = c.backend.NewContextSize(2).Layer(c.layer)
			}
			lctx := c.ctxs[c.layer]
			c.keys[c.layer] = lctx.Zeros(c.dtype, kHeadDim, kvHeads, c.cells)
			if c.config.PermutedV {
				c.values[c.layer] = lctx.Zeros(c.dtype, c.cells, vHeadDim, kvHeads)
			} else {
				c.values[c.layer] = lctx.Zeros(c.dtype, vHeadDim, kvHeads, c.cells)
			}
		})
	}
	keys := c.keys[c.layer].Reshape(ctx, kHeadDim*kvHeads, c.cells)
	ctx.Forward(keys.SetRows(ctx, key.Reshape(ctx, kHeadDim*kvHeads, n), c.loc))
	if c.config.PermutedV {
		v := value.Reshape(ctx, vHeadDim*kvHeads, 1, n).Permute(ctx, 2, 0, 1, 3)
		values := c.values[c.layer].Reshape(ctx, 1, c.cells, vHeadDim*kvHeads)
		ctx.Forward(values.SetRows(ctx, v, c.loc))
	} else {
		values := c.values[c.layer].Reshape(ctx, vHeadDim*kvHeads, c.cells)
		ctx.Forward(values.SetRows(ctx, value.Reshape(ctx, vHeadDim*kvHeads, n), c.loc))
	}
}

// Get returns the attended cells' keys [headDim, kvHeads, attended],
// values ([attended, headDim, kvHeads] permuted, else [headDim, kvHeads,
// attended]) and the mask [attended, batch].
func (c *denseCache) Get(ctx ml.Context) (ml.Tensor, ml.Tensor, ml.Tensor) {
	key, value := c.keys[c.layer], c.values[c.layer]
	key = key.View(ctx, 0, key.Dim(0), key.Stride(1), key.Dim(1), key.Stride(2), c.attended)
	if c.config.PermutedV {
		value = value.View(ctx, 0, c.attended, value.Stride(1), value.Dim(1), value.Stride(2), value.Dim(2))
	} else {
		value = value.View(ctx, 0, value.Dim(0), value.Stride(1), value.Dim(1), value.Stride(2), c.attended)
	}
	return key, value, c.mask
}

// CopyPrefix is for caches of several sequences; this one holds one.
func (c *denseCache) CopyPrefix(srcSeq, dstSeq int, len int32) {
	panic(fmt.Sprintf("dense cache: holds one sequence, cannot copy sequence %d to %d", srcSeq, dstSeq))
}

// CanResume: every cell is kept, so any position up to the next one is.
func (c *denseCache) CanResume(seq int, pos int32) bool { return seq == 0 && int(pos) <= c.n }

// Remove drops the cells from beginIndex on. Only suffixes can go: the
// cells stay in position order (ollama's cache would shift the keys
// after a hole; no session makes one).
func (c *denseCache) Remove(seq int, beginIndex, endIndex int32) error {
	if seq != 0 {
		return fmt.Errorf("dense cache: holds sequence 0 only, not %d", seq)
	}
	if int(endIndex) < c.n && endIndex != math.MaxInt32 {
		return fmt.Errorf("dense cache: cannot remove positions [%d, %d) of %d, only a suffix", beginIndex, endIndex, c.n)
	}
	if int(beginIndex) < c.n {
		c.n = max(0, int(beginIndex))
	}
	return nil
}
