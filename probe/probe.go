// Package probe is ActQKV (arXiv 2502.13542) on the selection seam: the
// "probe" method. Older tokens form blocks with one representative key per
// block and KV head (Reps); a probe query, the activation-weighted sum of a
// window's queries, ranks the blocks by cosine; and a pool of blocks shared
// by the layers is cut per layer from the entropy of each layer's block
// scores (the dynamic KV cut-off), each layer's budget sizing its device
// pool.
//
// Probes run on every multi-token batch (a question) and in decode once
// every ExcBlockSize tokens; the blocks a probe chose serve the steps until
// the next one, while sinks and the window move on. All statistics
// (activation mean and variance, entropy histories) belong to the selector,
// one per session.
package probe

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/viterin/vek/vek32"

	"github.com/kvrecall/kvrecall/paging"
)

// OptionKey is the paging.Config.Options key of a method's Settings
// (runtime.PolicyOptions.Extra["probe"]).
const OptionKey = "probe"

// Settings are probe's own settings; zero fields take the defaults.
type Settings struct {
	// BlockSize is the tokens per block, a multiple of the page size
	// (default: one page). The paper uses 32 (Llama-3) or 64 (Qwen2.5)
	// tokens; pages are the unit kvcache uploads and masks, so a block
	// cannot be smaller than a page, and the default 64-token page is
	// Qwen's block.
	BlockSize int `json:"block_size"`
	// RepTopK is the keys averaged into a block's representative (default 4).
	RepTopK int `json:"repr_topk"`
	// ExcBlockSize is the decode tokens between probes (default 256).
	ExcBlockSize int `json:"exc_block_size"`
	// QuestionWeight weighs, in a session's first probe, the cosine between
	// the mean of the question's queries and a block (the paper's question
	// term, 4 in its code when a question is given apart; default 0: off).
	QuestionWeight float64 `json:"question_weight"`
	// MinBlocks and MaxBlocks clamp a layer's blocks (further capped by the
	// blocks there are). Defaults keep the paper's ratios to its topk: 32
	// and 2·46 blocks for topk 46, so ceil(topk·32/46) and 2·topk.
	MinBlocks int `json:"min_blocks"`
	MaxBlocks int `json:"max_blocks"`
	// History is the entropies kept per layer (default 100, the paper's).
	History int `json:"history"`
	// StatCap caps the count of the running activation statistics, so that
	// they keep adapting (default 1000, the paper's).
	StatCap int `json:"stat_cap"`
	// Neighbors is how many of a probe's best blocks bring the block after
	// them, within the layer's share (default 2; negative: none, as in the
	// paper). An answer continues past the text that matched its question,
	// and the next probe is ExcBlockSize tokens away: a needle whose key
	// ends one block and whose last value opens the next lost its last
	// answer token. Only the best blocks bring one, because every
	// neighbour is a block fewer for other matches: with a neighbour for
	// every block (as retro keeps pages), 48-needle questions at budget
	// 1024 lost one needle of 8.
	Neighbors int `json:"neighbors"`
	// Uniform replaces the activation weights by equal ones: the probe is
	// the plain mean of the window's queries. An ablation, to measure what
	// the weighting buys.
	Uniform bool `json:"uniform"`
	// Reps, if set, are the document's representatives (blocks from 0);
	// blocks after them are built from the queries the selector sees.
	Reps *Reps `json:"-"`
}

// ParseSettings reads Settings from JSON with the names serve's requests
// use ({"block_size": 128, "question_weight": 4}); an unknown field is an
// error naming it. Zero fields keep the defaults (neighbors -1: none).
// Range checks are Fill's.
func ParseSettings(js string) (Settings, error) {
	var s Settings
	dec := json.NewDecoder(strings.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return s, fmt.Errorf("probe settings %s: %w", js, err)
	}
	return s, nil
}

// Defaults.
const (
	DefaultRepTopK      = 4
	DefaultExcBlockSize = 256
	DefaultHistory      = 100
	DefaultStatCap      = 1000
	DefaultNeighbors    = 2
)

func init() {
	paging.Register("probe", func(c paging.Config) (paging.Selector, error) { return New(c) })
}

// Fill applies the defaults for page size pageSize and a per-layer average
// of topk blocks, and checks the settings; errors name the setting.
func (s Settings) Fill(pageSize, topk int) (Settings, error) {
	if s.BlockSize == 0 {
		s.BlockSize = pageSize
	}
	if s.RepTopK == 0 {
		s.RepTopK = DefaultRepTopK
	}
	if s.ExcBlockSize == 0 {
		s.ExcBlockSize = DefaultExcBlockSize
	}
	if s.History == 0 {
		s.History = DefaultHistory
	}
	if s.Neighbors == 0 {
		s.Neighbors = DefaultNeighbors
	}
	if s.StatCap == 0 {
		s.StatCap = DefaultStatCap
	}
	switch {
	case s.BlockSize < 0 || s.BlockSize%pageSize != 0:
		return s, fmt.Errorf("probe: block_size %d must be a positive multiple of the page size %d", s.BlockSize, pageSize)
	case s.RepTopK < 1 || s.RepTopK > s.BlockSize:
		return s, fmt.Errorf("probe: repr_topk %d must be in [1, block_size %d]", s.RepTopK, s.BlockSize)
	case s.ExcBlockSize < 1:
		return s, fmt.Errorf("probe: exc_block_size %d must be at least 1", s.ExcBlockSize)
	case s.QuestionWeight < 0 || math.IsNaN(s.QuestionWeight) || math.IsInf(s.QuestionWeight, 0):
		return s, fmt.Errorf("probe: question_weight %v must be a finite number >= 0", s.QuestionWeight)
	case s.History < 1:
		return s, fmt.Errorf("probe: history %d must be at least 1", s.History)
	case s.StatCap < 1:
		return s, fmt.Errorf("probe: stat_cap %d must be at least 1", s.StatCap)
	case s.MinBlocks < 0 || s.MaxBlocks < 0:
		return s, fmt.Errorf("probe: min_blocks %d and max_blocks %d must not be negative", s.MinBlocks, s.MaxBlocks)
	}
	if s.MinBlocks == 0 {
		s.MinBlocks = max(1, (topk*32+45)/46)
	}
	if s.MaxBlocks == 0 {
		s.MaxBlocks = 2 * topk
	}
	if s.MinBlocks > s.MaxBlocks {
		return s, fmt.Errorf("probe: min_blocks %d exceeds max_blocks %d", s.MinBlocks, s.MaxBlocks)
	}
	return s, nil
}

// Selector is probe's per-session selector. LayerBudgets reports the
// per-layer budgets of the last probe.
type Selector struct {
	c     paging.Config
	s     Settings
	topk  int // blocks per layer on average (the budget after sinks and window)
	layer []layerState

	reps    *Reps    // the document's, blocks [0, reps.Blocks)
	builder *Builder // blocks from repsEnd on, from the queries seen
	built   *Reps    // builder's blocks, refreshed at each probe
	repsEnd int      // first position the builder covers

	// The current pass.
	pos0, batch int
	probing     bool
	remaining   int // blocks left in the pool during a probing pass
	probes      int // probes so far
	lastProbe   int // position after the last probing pass

	// Scratch.
	probe, qmean []float32
	w            []float32
	key          []float32
	scores       []float32
	cand         []int
}

// layerState is one layer's statistics and choice.
type layerState struct {
	stats   actStats
	hist    []float64 // last normalised entropies, oldest first
	blocks  []int     // blocks chosen by the last probe
	budget  int       // tokens: sinks + window + blocks·BlockSize
	entropy float64   // of the last probe
}

// New returns a probe selector for c (filled), reading Settings from
// c.Options["probe"] (a Settings or *Settings; absent: defaults).
func New(c paging.Config) (*Selector, error) {
	if err := c.CheckBudget(); err != nil {
		return nil, err
	}
	if c.Budget <= 0 {
		return nil, errors.New("probe: needs a budget (tokens attended per query); use dense for every token")
	}
	if c.Layers <= 0 {
		return nil, fmt.Errorf("probe: the model's layer count is unknown (%d)", c.Layers)
	}
	var s Settings
	switch v := c.Options[OptionKey].(type) {
	case nil:
	case Settings:
		s = v
	case *Settings:
		if v != nil {
			s = *v
		}
	default:
		return nil, fmt.Errorf("probe: Options[%q] is a %T, want probe.Settings", OptionKey, v)
	}
	free := c.Budget - c.Sinks - c.Window
	if s.BlockSize < 0 || s.BlockSize%c.PageSize != 0 {
		return nil, fmt.Errorf("probe: block_size %d must be a positive multiple of the page size %d", s.BlockSize, c.PageSize)
	}
	bs := s.BlockSize
	if bs == 0 {
		bs = c.PageSize
	}
	if bs <= 0 || free < bs {
		return nil, fmt.Errorf("probe: budget %d leaves %d tokens after sinks %d and window %d, less than one block of %d", c.Budget, free, c.Sinks, c.Window, bs)
	}
	s, err := s.Fill(c.PageSize, free/bs)
	if err != nil {
		return nil, err
	}
	if s.ExcBlockSize > c.Window && c.Window > 0 {
		return nil, fmt.Errorf("probe: exc_block_size %d exceeds the window %d (a probe's window of queries must stay local)", s.ExcBlockSize, c.Window)
	}
	p := &Selector{c: c, s: s, topk: free / s.BlockSize, layer: make([]layerState, c.Layers)}
	if s.Reps != nil {
		if err := s.Reps.Matches(s.BlockSize, s.RepTopK, c.Window); err != nil {
			return nil, err
		}
		if c.KVHeads > 0 && s.Reps.KVHeads != c.KVHeads || s.Reps.Layers != c.Layers {
			return nil, fmt.Errorf("probe: representatives for %d layers × %d KV heads, the model has %d × %d", s.Reps.Layers, s.Reps.KVHeads, c.Layers, c.KVHeads)
		}
		p.reps = s.Reps
		p.repsEnd = s.Reps.Blocks * s.BlockSize
		// The document's query statistics start each layer's running
		// statistics; the session's copy is its own.
		for l := range p.layer {
			if l < len(s.Reps.Stats) && s.Reps.Stats[l].Count > 0 {
				p.layer[l].stats = s.Reps.Stats[l].clone()
			}
			// And the document's entropy history its cut-off.
			if l < len(s.Reps.Entropy) {
				h := s.Reps.Entropy[l]
				p.layer[l].hist = slices.Clone(h[max(0, len(h)-s.History):])
			}
		}
	}
	for l := range p.layer {
		p.layer[l].budget = p.maxBudget()
	}
	return p, nil
}

func (p *Selector) Name() string          { return "probe" }
func (p *Selector) Config() paging.Config { return p.c }

// Settings returns the filled settings.
func (p *Selector) Settings() Settings { return p.s }

// maxBudget is the most tokens a layer may get: sinks, window and
// MaxBlocks blocks.
func (p *Selector) maxBudget() int { return p.c.Sinks + p.c.Window + p.s.MaxBlocks*p.s.BlockSize }

// StartPass implements paging.PassStarter: a pass probes when it is a
// multi-token batch, the session's first pass, or the first after
// ExcBlockSize tokens since the last probe. A probing pass sizes every
// layer's pool for MaxBlocks; the passes after it for what the probe chose.
func (p *Selector) StartPass(pos0, batch int) {
	p.pos0, p.batch = pos0, batch
	p.probing = batch > 1 || p.probes == 0 || pos0+batch-p.lastProbe >= p.s.ExcBlockSize
	if p.probing {
		n := 0
		for l := range p.layer {
			if !p.c.Dense(l) {
				n++
			}
		}
		p.remaining = p.topk * n
	}
}

// Groups implements paging.Selector: one group per layer; its budget is
// the layer's cut-off (MaxBlocks while a probe is choosing it).
func (p *Selector) Groups(layer int) []paging.Group {
	if p.c.Dense(layer) {
		return []paging.Group{{Class: "all"}}
	}
	b := p.layer[layer].budget
	if p.probing {
		b = p.maxBudget()
	}
	return []paging.Group{{Budget: b, Class: "all"}}
}

// NeedQueries implements paging.Selector.
func (p *Selector) NeedQueries(layer, batch int) bool {
	if p.c.Dense(layer) {
		return false
	}
	if p.batch != batch { // StartPass was not called (a selector used outside kvcache)
		p.StartPass(p.pos0, batch)
	}
	return p.probing
}

// LayerBudgets returns each layer's tokens after the last probe (sinks,
// window and its blocks; 0 for a dense layer).
func (p *Selector) LayerBudgets() []int {
	out := make([]int, len(p.layer))
	for l := range p.layer {
		if !p.c.Dense(l) {
			out[l] = p.layer[l].budget
		}
	}
	return out
}

// LayerEntropies returns each layer's normalised entropy of the last probe.
func (p *Selector) LayerEntropies() []float64 {
	out := make([]float64, len(p.layer))
	for l := range p.layer {
		out[l] = p.layer[l].entropy
	}
	return out
}

// Select implements paging.Selector.
func (p *Selector) Select(layer int, s paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	n := paging.PagesOf(upto, p.c.PageSize)
	if p.c.Dense(layer) {
		return paging.One(paging.AllPages(n))
	}
	req, _ := p.c.Required(upto)
	ls := &p.layer[layer]
	if q != nil && len(q.Q) > 0 {
		pos0 := upto - len(q.Q)
		if kr, ok := s.(paging.KeyReader); ok {
			if p.builder == nil {
				p.builder = NewBuilder(p.c.Layers, s.KVHeads(), s.HeadDim(), p.s.BlockSize, p.s.RepTopK, p.c.Window, p.s.ExcBlockSize, p.repsEnd)
				if p.repsEnd == 0 {
					// The session reads the whole sequence (a streaming
					// prefill): keep what a document's representatives need.
					p.builder.SetHistory(p.c, p.s.History)
				}
			}
			if pos0 >= p.repsEnd {
				p.builder.Add(layer, kr, q, pos0)
			}
			if layer == p.lastLayer() {
				// Every layer has seen this batch: refresh the built blocks
				// for the next probe.
				defer p.refreshBuilt(s, upto)
			}
		}
		p.probeLayer(layer, s, q, upto, req)
		if layer == p.lastLayer() {
			p.probes++
			p.lastProbe = upto
		}
	}
	pp := p.s.BlockSize / p.c.PageSize
	out := slices.Clone(req)
	for _, b := range ls.blocks {
		for pg := b * pp; pg < (b+1)*pp && pg < n; pg++ {
			out = append(out, pg)
		}
	}
	slices.Sort(out)
	return paging.One(slices.Compact(out))
}

func (p *Selector) lastLayer() int { return p.c.Layers - 1 }

// refreshBuilt turns the builder's scores into representatives of the
// blocks after the document's. The builder reads keys of every layer,
// which only the cache's views give: they come from one view's store via
// layerKeys when available.
func (p *Selector) refreshBuilt(s paging.Summaries, upto int) {
	lk, ok := s.(LayerKeys)
	if !ok {
		return
	}
	// Only whole blocks, and only those older than the window (newer ones
	// are attended anyway).
	end := (upto / p.s.BlockSize) * p.s.BlockSize
	if end <= p.repsEnd {
		return
	}
	r, err := p.builder.Reps(end, lk.LayerKeys)
	if err == nil {
		p.built = r
	}
}

// SequenceReps returns the representatives, query statistics and entropy
// history of a session that read its whole sequence (a streaming prefill),
// for blocks of the first upto tokens, to be stored as a document's.
func (p *Selector) SequenceReps(s paging.Summaries, upto int) (*Reps, error) {
	lk, ok := s.(LayerKeys)
	if p.builder == nil || p.repsEnd != 0 || !ok {
		return nil, errors.New("probe: this session did not read its whole sequence with keys it can reach")
	}
	r, err := p.builder.Reps(upto, lk.LayerKeys)
	if err != nil {
		return nil, err
	}
	p.builder.AddEntropies(r)
	return r, nil
}

// LayerKeys is implemented by summaries that can read the keys of any
// layer of the same sequence (kvcache's views), for the representatives of
// blocks a session writes.
type LayerKeys interface {
	LayerKeys(layer int) paging.KeyReader
}

// repOf returns the representative of block b, KV head g in layer, or nil.
func (p *Selector) repOf(layer, b, g int) []float32 {
	if p.reps != nil && b < p.reps.Blocks {
		return p.reps.Rep(layer, b, g)
	}
	if p.built != nil {
		if i := b - p.repsEnd/p.s.BlockSize; i >= 0 && i < p.built.Blocks {
			return p.built.Rep(layer, i, g)
		}
	}
	return nil
}

// probeLayer runs a probe for layer: statistics, probe query, block scores,
// entropy, the layer's share of the pool and its blocks.
func (p *Selector) probeLayer(layer int, s paging.Summaries, q *paging.Queries, upto int, req []int) {
	ls := &p.layer[layer]
	hd, kvh := s.HeadDim(), s.KVHeads()
	group := q.Heads / kvh
	width := q.Heads * hd
	ls.stats.update(q.Q, p.s.StatCap)
	p.w = ls.stats.weights(p.w, q.Q)
	if p.s.Uniform {
		for t := range p.w {
			p.w[t] = 1 / float32(len(p.w))
		}
	}
	p.probe = grow(p.probe, width)
	clear(p.probe)
	for t, row := range q.Q {
		for i, v := range row {
			p.probe[i] += p.w[t] * v
		}
	}
	useQ := p.s.QuestionWeight > 0 && p.probes == 0
	if useQ {
		p.qmean = grow(p.qmean, width)
		clear(p.qmean)
		for _, row := range q.Q {
			vek32.Add_Inplace(p.qmean, row)
		}
	}
	// Candidate blocks: those with a representative that are not wholly
	// sinks or window.
	pp := p.s.BlockSize / p.c.PageSize
	nblocks := (upto + p.s.BlockSize - 1) / p.s.BlockSize
	p.cand = p.cand[:0]
	p.scores = p.scores[:0]
	pn := norm(p.probe)
	qn := norm(p.qmean)
	for b := 0; b < nblocks; b++ {
		inReq := true
		for pg := b * pp; pg < (b+1)*pp; pg++ {
			if _, ok := slices.BinarySearch(req, pg); !ok {
				inReq = false
				break
			}
		}
		if inReq || p.repOf(layer, b, 0) == nil {
			continue
		}
		// cos(probe, R_b), R_b = rep of each query head's KV head,
		// concatenated over query heads [heads·headDim].
		var dot, qdot, rn float32
		for g := 0; g < kvh; g++ {
			r := p.repOf(layer, b, g)
			rn += float32(group) * vek32.Dot(r, r)
			for h := g * group; h < (g+1)*group; h++ {
				dot += vek32.Dot(p.probe[h*hd:(h+1)*hd], r)
				if useQ {
					qdot += vek32.Dot(p.qmean[h*hd:(h+1)*hd], r)
				}
			}
		}
		sc := cosine(dot, pn, rn)
		if useQ {
			sc += float32(p.s.QuestionWeight) * cosine(qdot, qn, rn)
		}
		p.cand = append(p.cand, b)
		p.scores = append(p.scores, sc)
	}
	nb := len(p.cand)
	ls.entropy = NormEntropy(p.scores)
	ls.hist = append(ls.hist, ls.entropy)
	if len(ls.hist) > p.s.History {
		ls.hist = ls.hist[len(ls.hist)-p.s.History:]
	}
	// The layer's share of the pool that remains: mean_H[n] / Σ_{m≥n}
	// mean_H[m] over the non-dense layers from this one on, equal shares
	// while a later layer has no history yet.
	var means []float64
	for m := layer; m < len(p.layer); m++ {
		if p.c.Dense(m) {
			continue
		}
		h := p.layer[m].hist
		if len(h) == 0 {
			means = append(means, math.NaN())
			continue
		}
		var sum float64
		for _, v := range h {
			sum += v
		}
		means = append(means, sum/float64(len(h)))
	}
	k := Share(means, p.remaining, min(p.s.MinBlocks, nb), min(p.s.MaxBlocks, nb))
	p.remaining -= k
	ls.blocks = pickBlocks(ls.blocks[:0], p.cand, p.scores, k, max(0, p.s.Neighbors))
	ls.budget = p.c.Sinks + p.c.Window + k*p.s.BlockSize
}

func grow(x []float32, n int) []float32 {
	if cap(x) < n {
		return make([]float32, n)
	}
	return x[:n]
}

func norm(x []float32) float32 {
	if len(x) == 0 {
		return 0
	}
	return float32(math.Sqrt(float64(vek32.Dot(x, x))))
}

// cosine is dot / (|a|·sqrt(bb)), 0 when either vector is zero.
func cosine(dot, an, bb float32) float32 {
	if an == 0 || bb <= 0 {
		return 0
	}
	return dot / (an * float32(math.Sqrt(float64(bb))))
}

// NormEntropy is the entropy of softmax(scores) divided by log(len):
// 1 for equal scores, near 0 when one block dominates; 0 for fewer than
// two blocks.
func NormEntropy(scores []float32) float64 {
	if len(scores) < 2 {
		return 0
	}
	m := math.Inf(-1)
	for _, v := range scores {
		m = max(m, float64(v))
	}
	var z float64
	for _, v := range scores {
		z += math.Exp(float64(v) - m)
	}
	var h float64
	for _, v := range scores {
		pr := math.Exp(float64(v)-m) / z
		if pr > 0 {
			h -= pr * math.Log(pr)
		}
	}
	return h / math.Log(float64(len(scores)))
}

// Share is the dynamic cut-off for one layer: means[0] is the layer's mean
// normalised entropy and means[1:] those of the layers after it; the layer
// gets round(means[0]/Σ means · remaining) blocks, or remaining/len(means)
// when any mean is unknown (NaN) or the sum is not positive (the paper's
// warm-up), clamped to [lo, hi] (lo wins over hi).
func Share(means []float64, remaining, lo, hi int) int {
	if len(means) == 0 {
		return max(0, lo)
	}
	w := 1 / float64(len(means))
	var sum float64
	known := true
	for _, m := range means {
		if math.IsNaN(m) {
			known = false
		}
		sum += m
	}
	if known && sum > 0 {
		w = means[0] / sum
	}
	k := int(math.Round(w * float64(remaining)))
	return max(min(k, hi), lo)
}

// pickBlocks appends to dst up to k of the candidate blocks cand (ascending)
// in descending score order; the best neighbors of them are each followed
// by the next candidate block. It returns them sorted.
func pickBlocks(dst, cand []int, scores []float32, k, neighbors int) []int {
	for r, i := range topK(scores, len(scores)) {
		if len(dst) == k {
			break
		}
		if b := cand[i]; !slices.Contains(dst, b) {
			dst = append(dst, b)
		}
		if r < neighbors && len(dst) < k {
			if _, ok := slices.BinarySearch(cand, cand[i]+1); ok && !slices.Contains(dst, cand[i]+1) {
				dst = append(dst, cand[i]+1)
			}
		}
	}
	slices.Sort(dst)
	return dst
}

// topK returns the indices of the k largest scores (ties: lower index).
func topK(scores []float32, k int) []int {
	idx := make([]int, len(scores))
	for i := range idx {
		idx[i] = i
	}
	slices.SortStableFunc(idx, func(a, b int) int {
		switch {
		case scores[a] > scores[b]:
			return -1
		case scores[a] < scores[b]:
			return 1
		}
		return 0
	})
	return idx[:min(k, len(idx))]
}

// actStats are one layer's running mean and variance of the query
// activations, per channel [heads·headDim], updated as in ActQKV's code:
// the first batch sets them (unbiased variance), later batches merge with a
// count capped at StatCap.
type actStats struct {
	mean, vars []float64
	Count      int       // windows seen
	bm, bv     []float64 // batch mean and (biased) variance, scratch
}

func (a *actStats) update(q [][]float32, cap_ int) {
	n := len(q)
	c := len(q[0])
	if len(a.bm) != c {
		a.bm, a.bv = make([]float64, c), make([]float64, c)
	}
	clear(a.bm)
	clear(a.bv)
	for _, row := range q {
		for i, v := range row {
			a.bm[i] += float64(v)
		}
	}
	for i := range a.bm {
		a.bm[i] /= float64(n)
	}
	for _, row := range q {
		for i, v := range row {
			d := float64(v) - a.bm[i]
			a.bv[i] += d * d
		}
	}
	for i := range a.bv {
		a.bv[i] /= float64(n)
	}
	fn := float64(n)
	if a.Count == 0 {
		a.mean, a.vars = make([]float64, c), make([]float64, c)
		copy(a.mean, a.bm)
		for i, v := range a.bv {
			if n > 1 {
				a.vars[i] = v * fn / (fn - 1)
			}
		}
	} else {
		k := float64(min(a.Count, cap_))
		for i := range a.mean {
			d := a.bm[i] - a.mean[i]
			a.vars[i] = (a.vars[i]*(k-1/fn) + a.bv[i] + d*d/(1+1/k)) / (k + 1 - 1/fn)
			a.mean[i] = (a.mean[i]*k + a.bm[i]) / (k + 1)
		}
	}
	a.Count++
}

// weights returns each query's weight: the mean over channels of
// (q−μ)²/(σ² + mean(σ²)/100), normalised to sum 1 (equal weights when all
// are zero, as for a single query).
func (a *actStats) weights(w []float32, q [][]float32) []float32 {
	w = grow(w, len(q))
	var vm float64
	for _, v := range a.vars {
		vm += v
	}
	vm /= float64(len(a.vars))
	eps := vm / 100
	var total float64
	for t, row := range q {
		var s float64
		for i, v := range row {
			d := float64(v) - a.mean[i]
			den := a.vars[i] + eps
			if den > 0 {
				s += d * d / den
			}
		}
		s /= float64(len(row))
		w[t] = float32(s)
		total += s
	}
	if total <= 0 || math.IsNaN(total) || math.IsInf(total, 0) {
		for t := range w {
			w[t] = 1 / float32(len(w))
		}
		return w
	}
	for t := range w {
		w[t] = float32(float64(w[t]) / total)
	}
	return w
}

func (a actStats) clone() actStats {
	return actStats{mean: slices.Clone(a.mean), vars: slices.Clone(a.vars), Count: a.Count}
}

// ActivationWeights returns the weights ActQKV gives the window of queries
// q [tokens][channels] after the windows in warm: each window updates the
// running statistics in turn (q too), then each query of q weighs
// (q−μ)²/(σ²+mean(σ²)/100) averaged over channels, normalised over q.
func ActivationWeights(warm [][][]float32, q [][]float32) []float32 {
	var a actStats
	for _, w := range warm {
		a.update(w, DefaultStatCap)
	}
	a.update(q, DefaultStatCap)
	return a.weights(nil, q)
}
