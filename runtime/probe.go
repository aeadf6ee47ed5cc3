package runtime

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"os"
	"sync/atomic"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/probe"
)

// probeReps returns doc's block representatives and query statistics for
// probe settings s under window (the local attention span): from memory,
// from the document's representatives file, or, for a document ingested
// without them (or with other settings), computed by prefilling its tokens
// once more and stored next to its pages. The file's name carries the
// settings that shape it, so several coexist.
func (m *Model) probeReps(ctx context.Context, doc *Document, s probe.Settings, window int) (*probe.Reps, error) {
	key := probeRepsName(s.BlockSize, s.RepTopK, window)
	doc.probeMu.Lock()
	defer doc.probeMu.Unlock()
	if r := doc.probe[key]; r != nil {
		return r, nil
	}
	path := m.documents().local.SidePath(doc.ID, key)
	r, err := probe.ReadFile(path, doc.Tokens, repsFingerprint(m.fp, doc), m.cfg.Layers, m.cfg.KVHeads, m.cfg.HeadDim)
	switch {
	case err == nil:
	case errors.Is(err, os.ErrNotExist) || errors.Is(err, probe.ErrStale):
		// A document ingested before representatives existed, asked with
		// new settings, or replaced since they were computed: upgrade it.
		if r, err = m.computeProbeReps(ctx, doc, s, window); err != nil {
			return nil, fmt.Errorf("document %s: probe representatives: %w", doc.ID, err)
		}
		if err := m.writeProbeReps(doc, key, r); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("document %s: %w (delete the file to recompute it)", doc.ID, err)
	}
	if doc.probe == nil {
		doc.probe = map[string]*probe.Reps{}
	}
	doc.probe[key] = r
	return r, nil
}

// repsFingerprint binds a representatives file to the model and to the
// document's text: a document replaced under the same id (same length,
// other text) does not reuse them.
func repsFingerprint(fp kvcache.Fingerprint, doc *Document) [32]byte {
	return sha256.Sum256(append(fp[:], doc.TextSHA256...))
}

// writeProbeReps stores r next to doc's pages, under the lock that deletes
// take, so that a delete never races the write.
func (m *Model) writeProbeReps(doc *Document, key string, r *probe.Reps) error {
	err := m.documents().local.WriteSide(doc.ID, key, func(path string) error {
		return r.WriteFile(path, doc.Tokens, repsFingerprint(m.fp, doc))
	})
	if err != nil {
		return fmt.Errorf("document %s: save probe representatives: %w", doc.ID, err)
	}
	return nil
}

// probeRepsName names a document's representatives file by the settings
// that shape it.
func probeRepsName(blockSize, repTopK, window int) string {
	return fmt.Sprintf("probe-b%d-r%d-w%d.kvr", blockSize, repTopK, window)
}

// hasSide reports whether document id has side file name on the local
// tier (a representatives file, say).
func (m *Model) hasSide(id, name string) bool {
	_, err := os.Stat(m.documents().local.SidePath(id, name))
	return err == nil
}

// probeRepsPrefills counts computeProbeReps's prefills (a test hook: an
// ingest with IngestOptions.ProbeReps must leave none to do).
var probeRepsPrefills atomic.Int64

// computeProbeReps prefills doc's tokens with dense attention, handing
// every layer's queries to a probe.Ingester that scores the local
// attention each key receives.
func (m *Model) computeProbeReps(ctx context.Context, doc *Document, s probe.Settings, window int) (*probe.Reps, error) {
	probeRepsPrefills.Add(1)
	ing, err := probe.NewIngester(paging.Config{PageSize: m.opts.PageSize, Window: window, Layers: m.cfg.Layers, KVHeads: m.cfg.KVHeads}, s)
	if err != nil {
		return nil, err
	}
	cache, err := m.newPaged(ing, doc.Tokens, nil)
	if err != nil {
		return nil, err
	}
	sess := &Session{m: m, cache: cache, capacity: doc.Tokens}
	defer sess.Close()
	if _, err := sess.Eval(ctx, doc.tokens, false, nil); err != nil {
		return nil, err
	}
	return ing.Reps()
}

// withProbeReps fills o.Extra["probe"] with the document's representatives
// when o names the probe method, so that its selector scores the
// document's blocks.
func (m *Model) withProbeReps(ctx context.Context, doc *Document, o PolicyOptions) (PolicyOptions, error) {
	method, _, err := paging.Parse(orDefault(o.Policy))
	if err != nil || method != "probe" {
		return o, err
	}
	if err := m.windowedRefusal(method); err != nil {
		// Before computing representatives: that prefill would read the
		// keys of windowed layers, whose pages keep only the window.
		return o, err
	}
	var s probe.Settings
	switch v := o.Extra[probe.OptionKey].(type) {
	case nil:
	case probe.Settings:
		s = v
	case *probe.Settings:
		if v != nil {
			s = *v
		}
	default:
		return o, fmt.Errorf("probe: Extra[%q] is a %T, want probe.Settings", probe.OptionKey, v)
	}
	if s.Reps != nil {
		return o, nil
	}
	// The defaults that shape representatives.
	if s.BlockSize == 0 {
		s.BlockSize = m.opts.PageSize
	}
	if s.RepTopK == 0 {
		s.RepTopK = probe.DefaultRepTopK
	}
	window := o.Window
	if window == 0 {
		window = paging.DefaultWindow
	}
	if s.BlockSize < 0 || s.BlockSize%m.opts.PageSize != 0 {
		return o, fmt.Errorf("probe: block_size %d must be a positive multiple of the page size %d", s.BlockSize, m.opts.PageSize)
	}
	if s.RepTopK < 1 || s.RepTopK > s.BlockSize {
		return o, fmt.Errorf("probe: repr_topk %d must be in [1, block_size %d]", s.RepTopK, s.BlockSize)
	}
	r, err := m.probeReps(ctx, doc, s, window)
	if err != nil {
		return o, err
	}
	s.Reps = r
	o.Extra = maps.Clone(o.Extra)
	if o.Extra == nil {
		o.Extra = map[string]any{}
	}
	o.Extra[probe.OptionKey] = s
	return o, nil
}

func orDefault(policy string) string {
	if policy == "" {
		return "retro"
	}
	return policy
}

// LayerBudgets returns the per-layer budgets in tokens that the session's
// method chose for its last forward pass, or nil for a method with fixed
// budgets (probe's dynamic cut-off reports them; 0 is a dense layer).
func (s *Session) LayerBudgets() []int {
	pc, ok := s.cache.(*kvcache.Paged)
	if !ok {
		return nil
	}
	sel := pc.Selector()
	for sel != nil {
		if lb, ok := sel.(interface{ LayerBudgets() []int }); ok {
			return lb.LayerBudgets()
		}
		u, ok := sel.(interface{ Unwrap() paging.Selector })
		if !ok {
			return nil
		}
		sel = u.Unwrap()
	}
	return nil
}
