package kvcache

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"time"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"

	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// Options configure a Paged cache.
type Options struct {
	Layout   Layout
	Heads    int             // query heads of the model
	Selector paging.Selector // which pages each layer's head groups attend to; owned by the cache
	Capacity int             // most tokens in the sequence
	MaxBatch int             // most tokens in one forward pass
	// Prefix, if set, is a document's store: the cache starts with its
	// tokens and shares its pages read-only.
	Prefix *Store
	// AttnSoftcap is the model's attention softcap (gemma2), 0 if none:
	// softcapped layers are attended group by group, so their one-token
	// passes keep selecting between graphs (selectgraph.go).
	AttnSoftcap float32
}

// Stats describe a cache's memory and traffic.
type Stats struct {
	ResidentBytes int64 // device pools (keys and values)
	// ResidentByClass splits ResidentBytes by head class ("all",
	// "retrieval", "streaming", as the selector names its groups).
	ResidentByClass map[string]int64
	// AttendedBytes is the KV the last forward pass attended to: the
	// selected tokens of every layer and head group, keys and values.
	AttendedBytes int64
	HostBytes     int64 // host pages, shared document pages included
	Pages         int   // pages in the sequence
	Uploads       int64 // pages copied host -> device so far
	// TokenUploads is the tokens copied host -> device so far into
	// token-granular pools (paging.Group.Tokens), one per token and group.
	TokenUploads int64
	// UploadedBytes is the keys and values copied host -> device so far,
	// pages and tokens together (f16, the group's heads only).
	UploadedBytes int64
	// OrderedBytes is the cluster-ordered copies of the document's KV
	// that staged token groups read (TokenStaging, staged.go): document
	// memory, built once and shared by every session of the document, so
	// not in ResidentBytes (which holds the staging buffers) nor in
	// HostBytes (the pages).
	OrderedBytes int64
	// SummaryBytes is the backend memory of the page summaries scored in
	// the graph: quest's key boxes (f32 [2·headDim, rows, kvHeads] per
	// layer, with headroom) and squeezed's centroids (f32 [headDim, k,
	// kvHeads] per layer). It sits beside the pools, not in ResidentBytes,
	// and unlike them it grows with the document: 1/32 of its KV for the
	// boxes of 64-token pages, 5 % of its tokens' keys for the centroids.
	SummaryBytes int64
	// StagedFromCopy and StagedFromPages count the tokens copied so far
	// into staging buffers from the ordered copies (in runs) and from the
	// host pages, one per token and group.
	StagedFromCopy, StagedFromPages int64
	// DeviceStaged counts the page uploads into pools outside host memory
	// that went through the pools' staging tensors (DeviceUploads,
	// devupload.go); the rest of Uploads went as plain copies into host
	// pools or as graph inputs.
	DeviceStaged int64
	// DeviceStagedTokens counts the token uploads (TokenUploads) into
	// token pools outside host memory that went through staging.
	DeviceStagedTokens int64
	// StagingBytes is the backend memory of the pools' device-upload
	// staging tensors (keys and values, f16), beside the pools: up to
	// DeviceStagePages pages per pool, made on a pool's first device upload.
	StagingBytes int64
	// InPlaceRows counts the rows of ordered copies attended in place
	// (InPlaceRuns): read by the attention, not staged.
	InPlaceRows int64
	// GraphSelections counts the layer selections made inside the graph
	// (one-token passes of layers the layer op attends: SelectInGraph),
	// not between split graphs.
	GraphSelections int64
	// StepScored counts those handed their own centroid scores computed
	// in the graph (paging.StepScored), to rank from instead of scoring
	// on the host.
	StepScored int64
	// Upkeep is the time spent keeping host pages and their summaries up to
	// date (reading new keys and values back, writing pages, summaries).
	Upkeep time.Duration
	// HostWrites is the time spent copying uploads straight into pools in
	// host memory (HostUploads: the CPU backend) and quest's box rows into
	// its host box tensors (HostBounds), as graphs are built, and writing
	// a kept step graph's cells and masks (keptstep.go).
	HostWrites time.Duration
}

// Paged is a paged KV cache for one sequence (sequence id 0). It is not safe
// for concurrent use; sessions each have their own.
//
// Each layer's KV heads are split into the selector's groups; each group
// has its own device pool, selection and uploads. A layer with one group of
// every head is laid out exactly like before groups existed, so a dense
// selection stays bit-exact with a dense cache.
type Paged struct {
	touched        uint16   // touchTokens' loads
	stageK, stageV []uint16 // emitTokenUploads' staging, reused
	opt            Options
	L              Layout
	b              ml.Backend
	store          *Store
	layers         []layerState
	closed         bool

	// The current forward pass.
	pos0, n   int
	layer     int
	stamp     uint64
	upto      int
	writes    []int // pages this batch writes; resident in every pool of every layer
	written   int   // layers whose new rows reached the host store
	readbacks map[ml.Context][]readback
	graphRuns map[ml.Context]int // copy runs emitted into each graph of this pass
	pinned    []uint64           // per page: pinMark if placeAll must not evict it
	pinMark   uint64
	// batchPages is the most pages one batch has spanned: budgeted pools
	// are sized for it (they only grow).
	batchPages int

	uploadCount  atomic.Int64
	tokenUploads atomic.Int64
	uploadBytes  atomic.Int64
	upkeep       atomic.Int64 // nanoseconds
	hostWrites   atomic.Int64 // nanoseconds (Stats.HostWrites)
	deviceStaged atomic.Int64 // Stats.DeviceStaged
	// Stats.DeviceStagedTokens
	deviceStagedTokens atomic.Int64

	// Device uploads (devupload.go): one uploader per device a pool is
	// on, made on first use; noUploader once ggml could not start one.
	uploaders  []*uploader
	noUploader bool
	// unwaited are the cells graphs fill (staging or graph inputs), and
	// unwaitedBoxes the box tensors they copy rows into, since the last
	// pass Computed took without error (unstage).
	unwaited      []stagedCell
	unwaitedBoxes []*boxTensor
	// graphs counts the graphs built: one more at each Outputs and
	// StartForward (a staging tensor is written once per graph).
	graphs uint64

	// In-graph page scoring (graphscore.go): on when the selector is a
	// paging.GraphScored that took it; per layer its key boxes; the
	// page bounds each graph computes, read back in Computed.
	graphScores bool
	boxes       []*boxTensor
	cents       []*centTensor // per layer, for a paging.CentroidScored selector
	ranks       map[ml.Context][]rankOut

	// Staged token groups (staged.go): per layer whether the backend
	// refused a staging buffer host memory (token pools then); the batch's
	// cells 0..n-1 (Put's set_rows indices); the last staged mask built,
	// shared within a graph; tokens staged from ordered copies and pages.
	noStage  []bool
	seqCells []int32
	smask    struct {
		ctx ml.Context
		m   int
		t   ml.Tensor
	}
	scells struct {
		ctx ml.Context
		t   ml.Tensor
	}
	stagedCopy, stagedPages atomic.Int64
	inplaceRows             atomic.Int64 // rows of ordered copies attended in place (InPlaceRuns)
	graphSelections         atomic.Int64 // layer selections made inside the graph (selectgraph.go)
	stepScored              atomic.Int64 // of those, with their centroid scores from the graph
	inplaceNow              bool         // this attention may read runs in place (AttentionSoftcap)
	keepCells               bool         // Put writes the batch into staging cells even on a layer-op pass (softcap)
	batchPos                []int32      // batchPositions' list, reused
	// Selection inside the graph (selectgraph.go): the cache's id for the
	// selection op's callback (0: none yet), and the first error a
	// callback met in the graph being computed (Computed returns it).
	gid      uint64
	graphErr error

	// Kept step graphs (keptstep.go): this step's plan, and the kept
	// graph being built (nil: a fresh graph).
	plan     *keptPlan
	building *KeptInputs

	// The last mask built: pools with the same layout and selection (every
	// layer, for a dense selector) share it within a graph.
	mask struct {
		ctx    ml.Context
		pages  []int // pool.page of the used slots
		fill   []int
		sel    []int
		tok    []int32
		window int
		tensor ml.Tensor
	}
}

// layerState is one layer's head groups and its view of the host pages.
type layerState struct {
	groups []*group
	view   *layerView
	// lparams: the layer op's params (one-token passes of a layer whose
	// groups are all staged, inplace.go), made on first use.
	lparams *layerParams
}

// group is one head group of a layer: its KV heads, pool and selection.
type group struct {
	paging.Group
	heads   []int // KV heads, ascending (resolved: never nil)
	all     bool  // every KV head in order: the pool row is the store row
	pool    *pool
	sel     []int   // pages attended in this pass, sorted (nil until chosen)
	tok     []int32 // positions attended in this pass, sorted (nil: every token of sel)
	cells   []int32 // pool cells of the batch's tokens
	uploads []upload
	tups    []tokenUpload // a token pool's planned uploads (pool.tok set)
	// staged: a token-granular group whose pool is a staging buffer
	// filled afresh each pass (TokenStaging, staged.go): rows are this
	// pass's runs of its ordered copy ocopy (nil: every token from the
	// pages), filled the earlier tokens copied in (-1 before the layer's
	// attention is built), okey its heads as the copy's key.
	staged bool
	rows   []int32
	ocopy  *orderedCopy
	filled int
	okey   string
	// inplace: this pass's runs are listed in iparams for the in-place
	// attention (InPlaceRuns, inplace.go), not staged.
	inplace bool
	iparams *inplaceParams

	// rowsOnly: the selection came in the rows-only form
	// (paging.Selection.RowsOnly, asked for by rowsSuffice): tok lists
	// only the positions past the order (the loose tokens) and sel their
	// pages; rows (with ocopy, never nil then) stand for the rest.
	// ftok and fsel are setStaged's fallback lists (no copy to read the
	// rows from), reused across passes.
	rowsOnly bool
	ftok     []int32
	fsel     []int
	// layerOp: this pass attends the group in its layer's one op
	// (kvr_layer_attn, inplace.go): cells [0, filled) hold its loose
	// tokens (K token-major, V channel-major), and the batch's token is in them
	// only if batchLoose (a split pass, read from the pages), else read
	// from the graph's keys and values. batchPut: Put wrote the batch into
	// cells [0, n) (set_rows), as the per-group graph reads them.
	layerOp, batchLoose, batchPut bool
}

type upload struct{ page, slot, rows int }

type readback struct {
	layer int
	k, v  ml.Tensor // f16 [row, batch] copies of the new keys and values
}

var (
	_ ollamakv.Cache       = (*Paged)(nil)
	_ arch.Hooks           = (*Paged)(nil)
	_ arch.Attender        = (*Paged)(nil)
	_ arch.SoftcapAttender = (*Paged)(nil)
)

// NewPaged returns a cache; Init must be called before use (the runtime does).
func NewPaged(o Options) (*Paged, error) {
	if err := o.Layout.Check(); err != nil {
		return nil, err
	}
	if o.Selector == nil {
		return nil, errors.New("kvcache: no page selector")
	}
	if o.Selector.Config().PageSize != o.Layout.PageSize {
		return nil, fmt.Errorf("kvcache: selector page size %d differs from the cache's %d", o.Selector.Config().PageSize, o.Layout.PageSize)
	}
	if o.Heads <= 0 || o.Heads%o.Layout.KVHeads != 0 {
		return nil, fmt.Errorf("kvcache: %d query heads for %d KV heads", o.Heads, o.Layout.KVHeads)
	}
	c := &Paged{opt: o, L: o.Layout, readbacks: map[ml.Context][]readback{}, graphRuns: map[ml.Context]int{},
		ranks: map[ml.Context][]rankOut{}}
	if gs, ok := o.Selector.(paging.GraphScored); ok {
		c.graphScores = gs.UseGraphScores()
	}
	var err error
	if o.Prefix != nil {
		if o.Prefix.L != o.Layout {
			return nil, fmt.Errorf("kvcache: document layout %+v differs from the model's %+v", o.Prefix.L, o.Layout)
		}
		c.store = o.Prefix.Fork()
	} else if c.store, err = NewStore(o.Layout); err != nil {
		return nil, err
	}
	if o.Capacity < c.store.Len() {
		return nil, fmt.Errorf("kvcache: capacity %d is less than the %d tokens of the document", o.Capacity, c.store.Len())
	}
	c.layers = make([]layerState, o.Layout.Layers)
	for l := range c.layers {
		c.layers[l].view = &layerView{s: c.store, layer: l}
		gs, err := resolveGroups(o.Selector.Groups(l), o.Layout.KVHeads)
		if err != nil {
			return nil, fmt.Errorf("kvcache: %s, layer %d: %w", o.Selector.Name(), l, err)
		}
		c.layers[l].groups = gs
	}
	// A sliding-window layer's host pages keep only its window (Store).
	ws := make([]int, o.Layout.Layers)
	for l := range ws {
		ws[l] = c.SlidingWindow(l)
	}
	if err := c.store.setWindows(ws); err != nil {
		return nil, err
	}
	return c, nil
}

// resolveGroups checks that groups split the kvHeads heads, each exactly
// once, and fills in nil head lists.
func resolveGroups(gs []paging.Group, kvHeads int) ([]*group, error) {
	if len(gs) == 0 {
		return nil, errors.New("no head groups")
	}
	seen := make([]bool, kvHeads)
	var out []*group
	for i, g := range gs {
		heads := g.KVHeads
		if heads == nil {
			if len(gs) != 1 {
				return nil, fmt.Errorf("group %d lists no heads but is not the only group", i)
			}
			heads = AllHeads(kvHeads)
		}
		if len(heads) == 0 || !slices.IsSorted(heads) {
			return nil, fmt.Errorf("group %d: heads %v must be a non-empty ascending list", i, heads)
		}
		for _, h := range heads {
			if h < 0 || h >= kvHeads || seen[h] {
				return nil, fmt.Errorf("group %d: KV head %d is out of range or in two groups", i, h)
			}
			seen[h] = true
		}
		out = append(out, &group{Group: g, heads: heads, all: len(heads) == kvHeads})
	}
	if i := slices.Index(seen, false); i >= 0 {
		return nil, fmt.Errorf("KV head %d is in no group", i)
	}
	return out, nil
}

// AllHeads returns 0..n-1.
func AllHeads(n int) []int { return paging.AllPages(n) }

// Store returns the host pages (owned by the cache; read-only for callers).
func (c *Paged) Store() *Store { return c.store }

// Selector returns the cache's page selector.
func (c *Paged) Selector() paging.Selector { return c.opt.Selector }

// Selected returns the pages any head of layer attended to in the last
// forward pass.
func (c *Paged) Selected(layer int) []int {
	var sel paging.Selection
	for _, g := range c.layers[layer].groups {
		sel.Groups = append(sel.Groups, c.groupPages(g))
	}
	return sel.Union()
}

// SelectedByGroup returns the pages each head group of layer attended to in
// the last forward pass, with the groups.
func (c *Paged) SelectedByGroup(layer int) ([]paging.Group, [][]int) {
	var gs []paging.Group
	var sel [][]int
	for _, g := range c.layers[layer].groups {
		gg := g.Group
		gg.KVHeads = slices.Clone(g.heads)
		gs = append(gs, gg)
		sel = append(sel, slices.Clone(c.groupPages(g)))
	}
	return gs, sel
}

// groupPages is the pages g attended to in the last pass: its selection's,
// and for a rows-only selection also those of the rows' positions, found
// through the order (reports only: not the pass's hot path).
func (c *Paged) groupPages(g *group) []int {
	if !g.rowsOnly || g.ocopy == nil {
		return g.sel
	}
	P := c.L.PageSize
	pages := slices.Clone(g.sel)
	for i := 0; i+1 < len(g.rows); i += 2 {
		for _, t := range g.ocopy.order[g.rows[i]:g.rows[i+1]] {
			pages = append(pages, int(t)/P)
		}
	}
	slices.Sort(pages)
	return slices.Compact(pages)
}

// forgetPass clears what a staged group holds of one pass: its
// selection (pages, tokens, rows and their copy) and how its attention
// was built (the next pass's start, a cut, a selection that failed in
// the graph).
func (g *group) forgetPass() {
	g.sel, g.tok, g.rows, g.ocopy, g.rowsOnly = nil, nil, nil, nil, false
	g.filled, g.inplace, g.layerOp, g.batchLoose, g.batchPut = -1, false, false, false, false
}

// runRows is the number of rows of the runs rows ([a, e) pairs).
func runRows(rows []int32) int {
	n := 0
	for i := 0; i+1 < len(rows); i += 2 {
		n += int(rows[i+1] - rows[i])
	}
	return n
}

// SlidingWindow returns the window of layer's groups when every group is
// a sliding-window group (paging.Group.Window), else 0.
func (c *Paged) SlidingWindow(layer int) int {
	w := 0
	for i, g := range c.layers[layer].groups {
		if g.Window <= 0 || (i > 0 && g.Window != w) {
			return 0
		}
		w = g.Window
	}
	return w
}

// Stats reports memory use and traffic.
func (c *Paged) Stats() Stats {
	st := Stats{HostBytes: c.store.Bytes(), Pages: c.store.Pages(), Uploads: c.uploadCount.Load(),
		TokenUploads: c.tokenUploads.Load(), UploadedBytes: c.uploadBytes.Load(),
		Upkeep: time.Duration(c.upkeep.Load()), HostWrites: time.Duration(c.hostWrites.Load()), ResidentByClass: map[string]int64{}}
	for l := range c.layers {
		for _, g := range c.layers[l].groups {
			if g.pool != nil {
				b := g.pool.bytes(c.L)
				st.ResidentBytes += b
				st.ResidentByClass[g.Class] += b
				if sg := g.pool.stage; sg != nil {
					st.StagingBytes += int64(sg.cells*g.pool.row) * 2 * 2
				}
			}
			if g.Tokens {
				// A token pool attends to its listed tokens only (and a
				// rows-only selection to its rows besides).
				n := len(g.tok)
				if g.rowsOnly {
					n += runRows(g.rows)
				}
				st.AttendedBytes += int64(n) * int64(len(g.heads)*c.L.HeadDim) * 2 * 2
				continue
			}
			for _, p := range g.sel {
				if p < c.store.Pages() {
					n := c.L.PageSize // a page a window dropped since (TrimWindows) was full
					if pg := c.store.pages[l][p]; pg != nil {
						n = pg.N
					}
					st.AttendedBytes += int64(n) * int64(len(g.heads)*c.L.HeadDim) * 2 * 2
				}
			}
		}
	}
	st.OrderedBytes = c.store.OrderedBytes()
	for _, bt := range c.boxes {
		if bt != nil {
			st.SummaryBytes += int64(2*c.L.HeadDim*bt.cap*c.L.KVHeads) * 4
		}
	}
	for _, ct := range c.cents {
		if ct != nil {
			st.SummaryBytes += int64(c.L.HeadDim*ct.k*c.L.KVHeads) * 4
		}
	}
	st.StagedFromCopy, st.StagedFromPages = c.stagedCopy.Load(), c.stagedPages.Load()
	st.DeviceStaged, st.DeviceStagedTokens = c.deviceStaged.Load(), c.deviceStagedTokens.Load()
	st.InPlaceRows = c.inplaceRows.Load()
	st.GraphSelections = c.graphSelections.Load()
	st.StepScored = c.stepScored.Load()
	return st
}

// ResidentSlots is the size of layer's device pools in pages, all groups together.
func (c *Paged) ResidentSlots(layer int) int {
	n := 0
	for _, g := range c.layers[layer].groups {
		n += c.slotsFor(g)
	}
	return n
}

// slotsFor sizes a group's pool: the whole capacity for a dense group, else
// its budget plus the pages the largest batch so far has written, plus
// slack for a window that has moved on while retrieved pages stay.
func (c *Paged) slotsFor(g *group) int {
	P := c.L.PageSize
	pages := (c.opt.Capacity+P-1)/P + 1
	if g.Budget <= 0 {
		return pages
	}
	pc := c.opt.Selector.Config()
	budget := max(g.Budget, pc.Sinks+pc.Window)
	if g.Window > 0 {
		budget = g.Window // a windowed layer: no sinks, its own window
	}
	return min(pages, (budget+P-1)/P+c.batchPages+3)
}

// poolFor returns g's pool, created or grown for the largest batch so far.
// A document session's first batch is its question, and its decode steps
// write one page at a time: sizing pools for the batches that really come,
// rather than for the largest the model allows, keeps resident KV at the
// budget. A larger batch later (a long follow-up prompt) replaces the pool
// with a larger empty one; its pages are uploaded again, once.
//
// A selector whose budgets change between passes (paging.PassStarter) also
// shrinks a pool when its budget falls, so that each layer holds what its
// budget says.
func (c *Paged) poolFor(layer int, g *group) *pool {
	_, dynamic := c.opt.Selector.(paging.PassStarter)
	if g.pool != nil && g.pool.staged { // TokenStaging turned off since
		g.pool.close()
		g.pool = nil
	}
	if want := c.slotsFor(g); g.pool == nil || g.pool.slots < want || (dynamic && g.pool.slots > want) {
		if g.pool != nil {
			g.pool.close()
		}
		g.pool = newPool(c.b, c.L, layer, len(g.heads), want, g.Tokens)
		if g.Tokens {
			g.pool.tok = newTokenCells(want * c.L.PageSize)
		}
		g.uploads, g.tups = nil, nil
	}
	return g.pool
}

// Init implements kvcache.Cache. The pool is always f16 with permuted values
// and an f32 mask: ggml's attention without flash attention.
func (c *Paged) Init(b ml.Backend, dtype ml.DType, maxSequences, capacity, maxBatch int) {
	c.b = b
	if maxSequences > 1 {
		panic("kvcache: a paged cache holds one sequence")
	}
	if capacity > 0 && capacity < c.opt.Capacity {
		c.opt.Capacity = capacity
	}
	if maxBatch > 0 {
		c.opt.MaxBatch = max(c.opt.MaxBatch, maxBatch)
	}
}

// SetConfig implements kvcache.Cache; only the layout the paged pool
// produces (permuted V, f32 mask) is accepted.
func (c *Paged) SetConfig(cfg ml.CacheConfig) {
	if !cfg.PermutedV || (cfg.MaskDType != ml.DTypeF32 && cfg.MaskDType != ml.DTypeOther) {
		panic("kvcache: the paged cache needs permuted values and an f32 mask (flash attention off)")
	}
}

// Close frees the device pools.
func (c *Paged) Close() {
	for l := range c.layers {
		for _, g := range c.layers[l].groups {
			if g.pool != nil {
				g.pool.close()
			}
		}
	}
	for _, bt := range c.boxes {
		if bt != nil {
			bt.ctx.Close()
		}
	}
	c.boxes = nil
	for _, ct := range c.cents {
		if ct != nil {
			ct.ctx.Close()
		}
	}
	c.cents = nil
	for _, u := range c.uploaders {
		u.close()
	}
	c.uploaders = nil
	c.closed = true
}

// SetLayer implements kvcache.Cache.
func (c *Paged) SetLayer(layer int) { c.layer = layer }

// CopyPrefix is not supported: a paged cache holds one sequence; documents
// share pages through Options.Prefix instead.
func (c *Paged) CopyPrefix(srcSeq, dstSeq int, n int32) {}

// CanResume reports whether the next token can be at pos: at most the
// sequence's length, and, with sliding-window layers, no earlier than the
// last forward pass began (their older pages are gone).
func (c *Paged) CanResume(seq int, pos int32) bool {
	return seq == 0 && pos >= 0 && c.store.canCut(int(pos))
}

// Remove drops tokens from beginIndex to the end (only suffixes can be
// removed; with sliding-window layers, only back to where the last forward
// pass began).
func (c *Paged) Remove(seq int, beginIndex, endIndex int32) error {
	if seq != 0 || endIndex != math.MaxInt32 {
		return ollamakv.ErrNotSupported
	}
	n := int(beginIndex)
	if n < c.store.from && c.store.windowed() {
		return fmt.Errorf("%w: the sliding-window layers keep only the pages their window can read from position %d on; cannot cut the sequence back to %d", ollamakv.ErrNotSupported, c.store.from, n)
	}
	if c.written > 0 && c.written < c.L.Layers {
		// A forward pass failed halfway: some layers hold the batch already.
		c.store.n = max(c.store.n, c.pos0+c.n)
	}
	c.written = 0
	c.store.truncate(n)
	P := c.L.PageSize
	for l := range c.layers {
		for _, g := range c.layers[l].groups {
			p := g.pool
			if p != nil && p.staged {
				// A staging buffer is filled afresh each pass; the cut
				// pass's selection and copy are forgotten, so that no
				// check reads positions the cut dropped.
				g.forgetPass()
				continue
			}
			if p == nil {
				continue
			}
			if p.tok != nil {
				p.tok.drop(n)
				continue
			}
			p.drop((n + P - 1) / P)
			if n%P != 0 {
				if s := p.resident(n / P); s >= 0 {
					p.fill[s] = min(p.fill[s], n%P)
				}
			}
		}
	}
	return nil
}

// NeedQueries implements arch.Hooks.
// A layer that selects inside the graph (selectgraph.go) does not: the
// pass is not split there.
func (c *Paged) NeedQueries(layer int) bool {
	return c.opt.Selector.NeedQueries(layer, c.n) && !c.selectInGraph(layer)
}

// StartForward implements kvcache.Cache: the batch must continue the
// sequence. It places the pages the batch writes in every pool and chooses
// the pages of every layer whose selector needs no queries.
func (c *Paged) StartForward(ctx ml.Context, batch input.Batch, reserve bool) error {
	if reserve {
		return nil
	}
	if c.closed {
		return errors.New("kvcache: cache is closed")
	}
	n := len(batch.Positions)
	pos0 := c.store.Len()
	for i, p := range batch.Positions {
		if int(p) != pos0+i || batch.Sequences[i] != 0 {
			return fmt.Errorf("kvcache: batch must continue sequence 0 at position %d (got position %d)", pos0+i, p)
		}
	}
	if pos0+n > c.opt.Capacity {
		return fmt.Errorf("%w: %d tokens exceed the capacity of %d", ollamakv.ErrKvCacheFull, pos0+n, c.opt.Capacity)
	}
	P := c.L.PageSize
	c.pos0, c.n, c.upto, c.written = pos0, n, pos0+n, 0
	c.graphErr = nil // a failed pass's, never returned
	c.graphs++
	if len(c.unwaited) > 0 || len(c.unwaitedBoxes) > 0 {
		// A graph was built with uploads and never reached Computed (its
		// build failed, or its compute panicked): its copies into the
		// pools may never have run, so what it uploaded is uploaded again.
		c.waitUploads()
		c.unstage()
	}
	c.stamp++
	c.plan = nil // PrepareKeptStep's, for this pass only
	clear(c.graphRuns)
	// Windowed layers drop the host pages no query from pos0 on can read
	// (kept up to here so that a failed pass can be removed again).
	c.store.trimTo(pos0)
	c.store.grow(pos0 + n)
	c.writes = c.writes[:0]
	for p := pos0 / P; p <= (pos0+n-1)/P; p++ {
		c.writes = append(c.writes, p)
	}
	c.batchPages = max(c.batchPages, len(c.writes))
	if ps, ok := c.opt.Selector.(paging.PassStarter); ok {
		// The selector's budgets may change from pass to pass (probe's
		// per-layer cut-off): read them again, so that poolFor resizes.
		ps.StartPass(pos0, n)
		for l := range c.layers {
			gs := c.opt.Selector.Groups(l)
			if len(gs) != len(c.layers[l].groups) {
				return fmt.Errorf("kvcache: %s changed the head groups of layer %d", c.opt.Selector.Name(), l)
			}
			for i, g := range gs {
				c.layers[l].groups[i].Budget = g.Budget
			}
		}
	}
	if c.noStage == nil {
		c.noStage = make([]bool, len(c.layers))
	}
	for l := range c.layers {
		ls := &c.layers[l]
		staged := c.stagedOK(l) && c.startStaged(l) // else token pools
		if staged && c.selectInGraph(l) {
			c.prebuildOrdered(l)
		}
		for _, g := range ls.groups {
			if staged && g.Tokens {
				continue // startStaged readied it
			}
			g.staged = false
			pl := c.poolFor(l, g)
			// Uploads planned by a pass that never reached its graph (it
			// failed) did not happen: those slots must be filled again.
			for _, u := range g.uploads {
				if pl.page[u.slot] == u.page {
					pl.fill[u.slot] = 0
				}
			}
			for _, u := range g.tups {
				if pl.tok.pos[u.cell] == u.pos {
					pl.tok.free(u.cell)
				}
			}
			g.sel, g.tok, g.uploads, g.tups, g.cells = nil, nil, g.uploads[:0], g.tups[:0], g.cells[:0]
		}
		if !c.opt.Selector.NeedQueries(l, n) {
			if err := c.setSelection(l, c.opt.Selector.Select(l, ls.view, nil, c.upto), false); err != nil {
				return err
			}
		}
		for _, g := range ls.groups {
			if g.staged {
				continue // nothing to place: filled when attention is built
			}
			if g.pool.tok != nil {
				if err := c.placeBatchTokens(l, g); err != nil {
					return err
				}
				if g.sel != nil {
					if err := c.placeTokens(l, g); err != nil {
						return err
					}
				}
				continue
			}
			// Pages go into slots in page order, so that with every page
			// selected the pool is laid out like a dense cache (and sums in
			// the same order).
			place := c.writes
			if g.sel != nil {
				place = union(g.sel, c.writes, c.store.Pages())
			}
			if err := c.placeAll(l, g, place); err != nil {
				return err
			}
			for i := 0; i < n; i++ {
				pos := pos0 + i
				g.cells = append(g.cells, int32(g.pool.resident(pos/P)*P+pos%P))
			}
		}
	}
	return nil
}

// setSelection checks a selector's answer for layer and hands each group
// its pages. rowsAsked says whether the selector was asked for it with
// Queries.RowsSuffice (rowsSuffice): only then may it answer in the
// rows-only form.
func (c *Paged) setSelection(layer int, sel paging.Selection, rowsAsked bool) error {
	gs := c.layers[layer].groups
	if len(sel.Groups) != len(gs) {
		return fmt.Errorf("kvcache: %s selected for %d head groups in layer %d, which has %d", c.opt.Selector.Name(), len(sel.Groups), layer, len(gs))
	}
	if sel.RowsOnly && !rowsAsked {
		return fmt.Errorf("kvcache: %s answered layer %d in the rows-only form, which the cache did not ask for (Queries.RowsSuffice): it needs every token listed", c.opt.Selector.Name(), layer)
	}
	if sel.Tokens != nil && len(sel.Tokens) != len(gs) {
		return fmt.Errorf("kvcache: %s selected tokens for %d head groups in layer %d, which has %d", c.opt.Selector.Name(), len(sel.Tokens), layer, len(gs))
	}
	limit := c.store.Pages()
	for i, pages := range sel.Groups {
		if err := checkPages(pages, limit); err != nil {
			return fmt.Errorf("kvcache: %s, layer %d, group %d: %w", c.opt.Selector.Name(), layer, i, err)
		}
		gs[i].sel = pages
		if gs[i].sel == nil {
			gs[i].sel = []int{}
		}
		gs[i].tok = nil
		if gs[i].Tokens && (sel.Tokens == nil || sel.Tokens[i] == nil) {
			return fmt.Errorf("kvcache: %s, layer %d, group %d: the group is token-granular, but its selection lists no tokens", c.opt.Selector.Name(), layer, i)
		}
		if sel.Tokens != nil && sel.Tokens[i] != nil {
			if err := checkTokens(sel.Tokens[i], pages, c.L.PageSize); err != nil {
				return fmt.Errorf("kvcache: %s, layer %d, group %d: %w", c.opt.Selector.Name(), layer, i, err)
			}
			gs[i].tok = sel.Tokens[i]
		}
		var rows []int32
		if sel.Rows != nil {
			if len(sel.Rows) != len(gs) {
				return fmt.Errorf("kvcache: %s selected rows for %d head groups in layer %d, which has %d", c.opt.Selector.Name(), len(sel.Rows), layer, len(gs))
			}
			rows = sel.Rows[i]
		}
		rowsOnly := sel.RowsOnly && rows != nil
		if rowsOnly && !gs[i].staged {
			return fmt.Errorf("kvcache: %s, layer %d, group %d: a rows-only selection for a group that is not staged", c.opt.Selector.Name(), layer, i)
		}
		if gs[i].staged {
			if err := c.setStaged(layer, i, gs[i], rows, rowsOnly); err != nil {
				return fmt.Errorf("kvcache: %s, layer %d, group %d: %w", c.opt.Selector.Name(), layer, i, err)
			}
		} else if rows != nil {
			// Token pools do not read the runs; their check is cheap.
			if to, ok := c.opt.Selector.(paging.TokenOrdered); ok {
				order, _ := to.TokenOrder(layer, i)
				if err := checkRows(rows, order, gs[i].tok, false); err != nil {
					return fmt.Errorf("kvcache: %s, layer %d, group %d: %w", c.opt.Selector.Name(), layer, i, err)
				}
			}
		}
	}
	return nil
}

// checkTokens reports token lists that are unsorted, repeated, or name a
// position on a page not in pages.
func checkTokens(toks []int32, pages []int, P int) error {
	j := 0
	for i, t := range toks {
		if i > 0 && t <= toks[i-1] {
			return fmt.Errorf("tokens not sorted and distinct at %d", i)
		}
		for j < len(pages) && pages[j] < int(t)/P {
			j++
		}
		if t < 0 || j == len(pages) || pages[j] != int(t)/P {
			return fmt.Errorf("token %d is on page %d, which is not selected", t, int(t)/P)
		}
	}
	return nil
}

// AttendedTokens returns, per head group of layer, how many earlier
// tokens (before the last batch) the last forward pass let it attend to.
func (c *Paged) AttendedTokens(layer int) []int {
	var out []int
	for _, g := range c.layers[layer].groups {
		n := 0
		if g.rowsOnly {
			n = runRows(g.rows) // positions of the order, all before pos0 (setStaged)
		}
		if g.tok != nil {
			for _, t := range g.tok {
				if int(t) < c.pos0 {
					n++
				}
			}
		} else {
			for _, p := range g.sel {
				n += max(0, min(c.L.PageSize, c.pos0-p*c.L.PageSize))
			}
		}
		out = append(out, n)
	}
	return out
}

// checkPages reports pages that are unsorted, repeated or out of range.
func checkPages(pages []int, limit int) error {
	for i, p := range pages {
		if p < 0 || p >= limit {
			return fmt.Errorf("page %d out of range [0, %d)", p, limit)
		}
		if i > 0 && p <= pages[i-1] {
			return fmt.Errorf("pages not sorted and distinct at %d", i)
		}
	}
	return nil
}

// SetQueries implements arch.Hooks: choose layer's pages from its queries.
func (c *Paged) SetQueries(layer int, q [][]float32) error {
	return c.setQueries(layer, q, nil)
}

// setQueries is SetQueries with the pass's centroid scores, when the graph
// computed them (paging.Queries.Scores; selectgraph.go).
func (c *Paged) setQueries(layer int, q [][]float32, scores []float32) error {
	ls := &c.layers[layer]
	rows := c.rowsSuffice(layer)
	if err := c.setSelection(layer, c.opt.Selector.Select(layer, ls.view, &paging.Queries{Q: q, Heads: c.opt.Heads, RowsSuffice: rows, Scores: scores}, c.upto), rows); err != nil {
		return err
	}
	for _, g := range ls.groups {
		if g.staged {
			continue
		}
		if g.pool.tok != nil {
			if err := c.placeTokens(layer, g); err != nil {
				return err
			}
			continue
		}
		if err := c.placeAll(layer, g, g.sel); err != nil {
			return err
		}
	}
	return nil
}

// Put implements kvcache.Cache: the batch's keys and values go into their
// slots of every group's pool, and f16 copies are read back into the host
// pages after the graph runs. key, value: [headDim, kvHeads, batch].
func (c *Paged) Put(ctx ml.Context, key, value ml.Tensor) {
	l, r, n := c.layer, c.L.Row(), c.n
	if key.Dim(2) != n {
		panic(fmt.Errorf("kvcache: batch of %d tokens, StartForward saw %d", key.Dim(2), n))
	}
	k := key.Reshape(ctx, r, n)
	v := value.Reshape(ctx, r, n)
	P := c.L.PageSize
	// A one-token pass whose layer op reads the batch's token from key and
	// value (or, split, from the pages) writes nothing into staging cells:
	// V's cells are channel-major, one isolated 2-byte store per channel.
	skipStaged := c.layerOp(l) && !c.keepCells
	for _, g := range c.layers[l].groups {
		pl := g.pool
		if g.staged {
			g.batchPut = !skipStaged
			if skipStaged {
				continue
			}
		}
		gk, gv := k, v
		if !g.all {
			gk = pickHeads(ctx, key, g.heads).Reshape(ctx, pl.row, n)
			gv = pickHeads(ctx, value, g.heads).Reshape(ctx, pl.row, n)
		}
		cells := c.keptCellsFor(ctx, g) // a kept graph's, written at every step
		if cells == nil && g.staged {
			cells = c.stagedCells(ctx) // cells 0..n-1, one input for the graph
		}
		if cells == nil {
			cells = ctx.Input().FromInts(g.cells, n)
		}
		ctx.Forward(pl.k.Reshape(ctx, pl.row, pl.slots*P).SetRows(ctx, gk, cells))
		if pl.tok != nil { // a token pool's values are token-major, like its keys
			ctx.Forward(pl.v.Reshape(ctx, pl.row, pl.slots*P).SetRows(ctx, gv, cells))
			continue
		}
		vp := gv.Reshape(ctx, pl.row, 1, n).Permute(ctx, 2, 0, 1, 3) // [1, batch, row]
		ctx.Forward(pl.v.Reshape(ctx, 1, pl.slots*P, pl.row).SetRows(ctx, vp, cells))
	}
	c.batchWritten(l)
	kOut := ctx.Input().Empty(ml.DTypeF16, r, n)
	vOut := ctx.Input().Empty(ml.DTypeF16, r, n)
	ctx.Forward(k.Copy(ctx, kOut), v.Copy(ctx, vOut))
	c.readbacks[ctx] = append(c.readbacks[ctx], readback{layer: l, k: kOut, v: vOut})
}

// batchWritten records that the batch's tokens are in layer's pools.
func (c *Paged) batchWritten(layer int) {
	P := c.L.PageSize
	for _, g := range c.layers[layer].groups {
		pl := g.pool
		if g.staged || pl.tok != nil {
			continue // the batch's cells were mapped when placed (staged: cells 0..n-1)
		}
		for i := 0; i < c.n; i++ {
			pos := c.pos0 + i
			s := pl.resident(pos / P)
			pl.fill[s] = max(pl.fill[s], pos%P+1)
		}
	}
}

// pickHeads returns the heads of t [headDim, heads, batch] listed in
// heads, in that order, as a contiguous [headDim, len(heads), batch]: one
// view per run of consecutive heads, concatenated.
func pickHeads(ctx ml.Context, t ml.Tensor, heads []int) ml.Tensor {
	var out ml.Tensor
	for i := 0; i < len(heads); {
		j := i + 1
		for j < len(heads) && heads[j] == heads[j-1]+1 {
			j++
		}
		part := t.View(ctx, heads[i]*t.Stride(1), t.Dim(0), t.Stride(1), j-i, t.Stride(2), t.Dim(2))
		if out == nil {
			out = part.Contiguous(ctx)
		} else {
			out = out.Concat(ctx, part, 1)
		}
		i = j
	}
	return out
}

// Outputs implements arch.Hooks: the read-back copies of ctx. It also
// waits for the pass's device uploads (devupload.go), which ctx's copies
// read: callers call it after building ctx and before computing it.
func (c *Paged) Outputs(ctx ml.Context) []ml.Tensor {
	c.waitUploads()
	c.graphs++
	var out []ml.Tensor
	for _, rb := range c.readbacks[ctx] {
		out = append(out, rb.k, rb.v)
	}
	for _, r := range c.ranks[ctx] {
		out = append(out, r.scores)
	}
	return out
}

// Computed implements arch.Hooks: new keys and values reach the host pages
// and their summaries.
func (c *Paged) Computed(ctx ml.Context) error {
	t0 := time.Now()
	defer func() { c.upkeep.Add(int64(time.Since(t0))) }()
	err := c.graphErr
	// A selection inside the graph failed (selectgraph.go): the layers
	// after it attended from a wrong hidden state. Or a graph computed
	// while copies into its staging tensors were in flight: it may have
	// read stale pages. Either way none of the pass's keys and values are
	// stored; the sequence stays as it was (as a split pass stops before
	// the failing layer's attention).
	if c.waitUploads() && err == nil {
		err = errors.New("kvcache: a graph was computed before Outputs waited for its device uploads")
	}
	if err != nil {
		// Nothing else waits for the failed graph (its outputs are never
		// read), and the next pass may rewrite staging tensors it reads.
		// (Only outputs handed to Compute can be waited for: a graph
		// computed without Outputs has none of these. Its stream runs it
		// before the next pass's graph, which uploads again every cell
		// it wrote.)
		for _, rb := range c.readbacks[ctx] {
			syncTensor(rb.k)
		}
		for _, r := range c.ranks[ctx] {
			syncTensor(r.scores)
		}
		c.graphErr = nil
		delete(c.readbacks, ctx)
		delete(c.ranks, ctx)
		c.unstage()
		c.dropUnstored()
		return err
	}
	// The graph computed: its uploads are in the pools.
	c.unwaited, c.unwaitedBoxes = c.unwaited[:0], c.unwaitedBoxes[:0]
	for _, rb := range c.readbacks[ctx] {
		kb, vb := rb.k.Bytes(), rb.v.Bytes()
		if len(kb) != 2*c.n*c.L.Row() || len(vb) != len(kb) {
			return fmt.Errorf("kvcache: read back %d bytes of keys, want %d", len(kb), 2*c.n*c.L.Row())
		}
		c.stored(rb.layer, bytesU16(kb), bytesU16(vb))
	}
	delete(c.readbacks, ctx)
	return c.readRanks(ctx)
}

// dropUnstored forgets, after a failed pass, the rows its batch put into
// page pools: the host pages never got them, so each slot's fill goes back
// to the tokens its page holds on the host, and the next pass writes them
// again. A token pool's listed tokens that unstage freed leave the failed
// pass's list (the list names resident tokens: CheckInvariants).
func (c *Paged) dropUnstored() {
	for l := range c.layers {
		for _, g := range c.layers[l].groups {
			pl := g.pool
			if pl != nil && pl.tok != nil && !g.staged && g.tok != nil {
				g.tok = slices.DeleteFunc(g.tok, func(t int32) bool { return pl.tok.cellOf(t) < 0 })
			}
			if pl == nil || pl.tok != nil || pl.staged {
				continue
			}
			for s, p := range pl.page {
				if p < 0 {
					continue
				}
				n := 0
				if p < len(c.store.pages[l]) && c.store.pages[l][p] != nil {
					n = c.store.pages[l][p].N
				}
				pl.fill[s] = min(pl.fill[s], n)
			}
		}
	}
}

// stored writes the batch's keys and values of layer ([batch][row] f16)
// into the host pages; the sequence grows when every layer has them.
func (c *Paged) stored(layer int, k, v []uint16) {
	c.store.write(layer, c.pos0, k, v, c.n)
	c.written++
	if c.written == c.L.Layers {
		c.store.n = c.pos0 + c.n
	}
}
