package runtime

import (
	"fmt"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// reserveIngest reserves the backend's compute buffer for the largest pass
// of a dense ingest of n tokens, once, before its first pass.
//
// Why: ggml's scheduler sizes its compute buffer for the graph at hand and
// frees and reallocates it whenever a graph needs more. A prefill in
// batches needs more at every batch, since the scores [cells, batch, heads]
// (f32, with their softmax beside them) grow with the tokens before the
// batch. Each new buffer is fresh memory from the kernel: at 16k tokens on
// the tiny preset that was about 3 million page faults (zeroed pages) for
// one ingest against llama.cpp's 0.75 million, which reserves its
// worst-case graph once. Reserving the last batch's graph first makes every
// later graph fit the same buffer. Results do not change: only where the
// scheduler puts the intermediate tensors does.
//
// The graph is the real forward pass (arch.Run with Step.Reserve) over a
// stand-in cache that returns tensors of the paged cache's shapes for the
// last batch: keys [headDim, kvHeads, cells] and permuted values [cells,
// headDim, kvHeads] (f16), and the paged cache's causal mask [cells,
// batch] (kvcache.CausalMask, the same graph ops). It reserves only when n is
// longer than what this model reserved before.
func (m *Model) reserveIngest(n int) error {
	bs := min(m.opts.BatchSize, n)
	P := m.opts.PageSize
	cells := (n + P - 1) / P * P
	m.reserveMu.Lock()
	defer m.reserveMu.Unlock()
	if cells <= m.reservedCells && bs <= m.reservedBatch {
		return nil
	}
	// Exclusive: the scheduler is shared, and ollama's Reserve (unlike
	// Compute) does not take its lock. Passes in flight finish first.
	m.life.Lock()
	defer m.life.Unlock()
	if m.closed {
		return ErrClosed
	}
	c := &reserveCache{hd: m.cfg.HeadDim, kvHeads: m.cfg.KVHeads, cells: cells, pos0: n - bs, n: bs}
	if err := m.runReserve(reserveStep(n-bs, bs, false), c, fmt.Sprintf("%d tokens", n)); err != nil {
		return err
	}
	m.reservedCells, m.reservedBatch = max(cells, m.reservedCells), max(bs, m.reservedBatch)
	return nil
}

// reserveCache stands in for the paged cache in reserveIngest's graph: the
// same tensor shapes and ops, no data. Its inputs are allocated (ollama
// gives each input its own buffer) but never written, so they cost address
// space, not memory; one pair of keys and values serves every layer.
type reserveCache struct {
	hd, kvHeads, cells, pos0, n int
	ctx                         ml.Context
	k, v, mask                  ml.Tensor
}

func (c *reserveCache) SetLayer(int)                             {}
func (c *reserveCache) SetConfig(ml.CacheConfig)                 {}
func (c *reserveCache) Init(ml.Backend, ml.DType, int, int, int) {}
func (c *reserveCache) Close()                                   {}
func (c *reserveCache) CopyPrefix(int, int, int32)               {}
func (c *reserveCache) CanResume(int, int32) bool                { return false }
func (c *reserveCache) Remove(int, int32, int32) error           { return nil }
func (c *reserveCache) StartForward(ml.Context, input.Batch, bool) error {
	return nil
}

// Put adds what the paged cache's Put adds to the compute buffer: the f16
// copies of the batch's keys and values that go back to the host pages
// ([kvHeads·headDim, batch] each). Its set_rows into the pools write views
// of the pools, not the compute buffer.
func (c *reserveCache) Put(ctx ml.Context, key, value ml.Tensor) {
	r := c.hd * c.kvHeads
	kOut := ctx.Input().Empty(ml.DTypeF16, r, c.n)
	vOut := ctx.Input().Empty(ml.DTypeF16, r, c.n)
	ctx.Forward(key.Reshape(ctx, r, c.n).Copy(ctx, kOut), value.Reshape(ctx, r, c.n).Copy(ctx, vOut))
}

func (c *reserveCache) Get(ctx ml.Context) (ml.Tensor, ml.Tensor, ml.Tensor) {
	if c.ctx != ctx {
		c.ctx = ctx
		c.k = ctx.Input().Empty(ml.DTypeF16, c.hd, c.kvHeads, c.cells)
		c.v = ctx.Input().Empty(ml.DTypeF16, c.cells, c.hd, c.kvHeads)
		c.mask = kvcache.CausalMask(ctx, c.pos0, c.cells, c.n)
	}
	return c.k, c.v, c.mask
}

// denseReserve is the largest dense prefill the compute buffer was
// reserved for (reserveDense): cells attended, batch tokens, and whether
// every row's logits were wanted.
type denseReserve struct {
	cells, batch int
	all          bool
}

// reserveDense reserves the backend's compute buffer for a prefill into c
// (DenseCache's own cache) of the tokens from position start to n, in
// batches of bs, with every row's logits or only the last one's (all),
// before its first pass.
//
// Why: what reserveIngest does for the paged ingest, for Session.Eval on
// the dense engine. Without it ggml's scheduler frees and reallocates its
// compute buffer at every batch of a prefill, since the scores [attended,
// batch, heads] f32 (and their softmax) grow with the tokens before the
// batch, and each new buffer is fresh memory the kernel must fault in and
// zero. On the tiny preset with 1 thread that made the dense prefill
// 0.6x llama.cpp's at 8k (620 thousand page faults, 4.4 s of the kernel's
// time in an 8k bench run), where llama.cpp reserves its worst-case graph
// once (docs/performance.md, "Dense prefill").
//
// The graphs reserved are the prefill's own passes, every batch of it
// (arch.Run with Step.Reserve on the session's cache, whose reserve mode
// attends to exactly the cells a pass at those positions will), and ggml
// keeps the largest buffer of them. Reserving only the last batch is not
// enough: the causal mask's pieces (kvcache.CausalMask) differ in size
// from batch to batch, and ggml's greedy allocator then places some
// earlier graph less tightly (by tens of KiB in
// TestDensePrefillReservesOnce), which would reallocate the buffer again.
// A reserve builds and plans a graph without computing it (well under a
// millisecond for the tiny preset, against ~0.5 s for one 512-token batch
// at 8k), and is skipped when a prefill at least as large was reserved.
func (m *Model) reserveDense(c *denseCache, start, n, bs int, all bool) error {
	want := denseReserve{cells: roundUp(n, c.config.CachePadding), batch: min(bs, n-start), all: all}
	m.reserveMu.Lock()
	defer m.reserveMu.Unlock()
	have := m.denseReserved
	if want.cells <= have.cells && want.batch <= have.batch && (have.all || !all) {
		return nil
	}
	// Exclusive, as in reserveIngest: ollama's Reserve does not take the
	// scheduler's lock.
	m.life.Lock()
	defer m.life.Unlock()
	if m.closed {
		return ErrClosed
	}
	for from := start; from < n; from += bs {
		if err := m.runReserve(reserveStep(from, min(bs, n-from), all), c, fmt.Sprintf("a prefill to %d tokens", n)); err != nil {
			return err
		}
	}
	m.denseReserved = denseReserve{max(want.cells, have.cells), max(want.batch, have.batch), have.all || all}
	return nil
}

// reserveStep is a pass of k tokens at positions from..from+k-1 for a
// reservation: only the last row's logits, or every row's (all).
func reserveStep(from, k int, all bool) arch.Step {
	st := arch.Step{Tokens: make([]int32, k), Positions: make([]int32, k), Outputs: []int32{int32(k - 1)}, Reserve: true}
	for i := range st.Positions {
		st.Positions[i] = int32(from + i)
	}
	if all {
		st.Outputs = st.Outputs[:0]
		for i := range k {
			st.Outputs = append(st.Outputs, int32(i))
		}
	}
	return st
}

// runReserve builds and reserves st's graph over cache c; ggml's panics
// (an allocation that fails) come back as errors naming what.
func (m *Model) runReserve(st arch.Step, c ollamakv.Cache, what string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("reserve the compute buffer for %s: %v", what, r)
		}
	}()
	_, _, err = m.net.Run(m.backend, st, c)
	return err
}
