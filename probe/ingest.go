package probe

import (
	"errors"
	"fmt"
	"time"

	"github.com/kvrecall/kvrecall/paging"
)

// Ingester is a dense selector for a document's prefill that also builds
// its block representatives and query statistics: it asks for every
// layer's queries, scores the local attention each key receives (Builder),
// and attends to every page. Reps returns the result after the prefill.
type Ingester struct {
	c    paging.Config
	s    Settings
	b    *Builder
	last paging.Summaries
	upto int
	// took is the time spent scoring and building representatives:
	// the ingest's share of the work that computeProbeReps's second
	// prefill used to do (its dense forward pass aside).
	took time.Duration
}

// NewIngester returns an ingest selector for c (PageSize, Window, Layers
// and KVHeads set) and the settings that shape representatives
// (BlockSize, RepTopK, ExcBlockSize).
func NewIngester(c paging.Config, s Settings) (*Ingester, error) {
	c.Budget = 0
	c, err := c.Fill()
	if err != nil {
		return nil, err
	}
	if c.Layers <= 0 {
		return nil, fmt.Errorf("probe: the model's layer count is unknown (%d)", c.Layers)
	}
	if s.BlockSize < 0 || s.BlockSize%c.PageSize != 0 {
		return nil, fmt.Errorf("probe: block_size %d must be a positive multiple of the page size %d", s.BlockSize, c.PageSize)
	}
	if s, err = s.Fill(c.PageSize, 1); err != nil {
		return nil, err
	}
	return &Ingester{c: c, s: s}, nil
}

func (g *Ingester) Name() string                  { return "probe-ingest" }
func (g *Ingester) Settings() Settings            { return g.s }
func (g *Ingester) Config() paging.Config         { return g.c }
func (g *Ingester) Groups(int) []paging.Group     { return []paging.Group{{Class: "all"}} }
func (g *Ingester) NeedQueries(layer, _ int) bool { return true }

// Select implements paging.Selector: every page, after scoring the batch's
// local attention.
func (g *Ingester) Select(layer int, s paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	if q != nil && len(q.Q) > 0 {
		t0 := time.Now()
		defer func() { g.took += time.Since(t0) }()
		if kr, ok := s.(paging.KeyReader); ok {
			if g.b == nil {
				g.b = NewBuilder(g.c.Layers, s.KVHeads(), s.HeadDim(), g.s.BlockSize, g.s.RepTopK, g.c.Window, g.s.ExcBlockSize, 0)
				g.b.SetHistory(g.c, g.s.History)
			}
			g.b.Add(layer, kr, q, upto-len(q.Q))
			g.last, g.upto = s, upto
		}
	}
	return paging.One(paging.AllPages(paging.PagesOf(upto, g.c.PageSize)))
}

// Took is the time the ingester has spent scoring keys and building
// representatives (Select and Reps).
func (g *Ingester) Took() time.Duration { return g.took }

// Reps returns the representatives of every block prefilled so far.
func (g *Ingester) Reps() (*Reps, error) {
	t0 := time.Now()
	defer func() { g.took += time.Since(t0) }()
	if g.b == nil {
		return nil, errors.New("probe: the prefill handed over no queries and keys")
	}
	lk, ok := g.last.(LayerKeys)
	if !ok {
		return nil, errors.New("probe: the cache's summaries cannot read keys of every layer")
	}
	r, err := g.b.Reps(g.upto, lk.LayerKeys)
	if err != nil {
		return nil, err
	}
	g.b.AddEntropies(r)
	return r, nil
}
