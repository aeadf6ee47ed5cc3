package runtime

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
)

// DefaultPageSize is the page size of paged caches and documents.
const DefaultPageSize = 64

// PolicyOptions choose a paging method for a paged session or an Ask.
type PolicyOptions struct {
	// Policy names a registered method (paging.Names: dense, window, quest,
	// retro, ...) with optional modifiers ("retro+heads"); default retro.
	Policy      string
	Budget      int // tokens attended per query, sinks and window included (default 2048)
	Sinks       int // default 64
	Window      int // default 256
	DenseLayers int // first layers that attend to everything (default 0)
	Neighbors   int // retro: pages kept after each retrieved page (default 1)
	// Extra carries method-specific settings, keyed by the method or
	// modifier that reads them (heads: its *heads.Profile).
	Extra map[string]any
}

// Layout returns the paged-cache geometry of the model.
func (m *Model) Layout() kvcache.Layout {
	return kvcache.Layout{Layers: m.cfg.Layers, KVHeads: m.cfg.KVHeads, HeadDim: m.cfg.HeadDim, PageSize: m.opts.PageSize}
}

// NewSelector builds a fresh page selector (one per session: it keeps
// state) for the method o describes, for this model.
func (m *Model) NewSelector(o PolicyOptions) (paging.Selector, error) {
	if o.Policy == "" {
		o.Policy = "retro"
	}
	method, mods, err := paging.Parse(o.Policy)
	if err != nil {
		return nil, err
	}
	if o.Budget == 0 && method != "dense" {
		o.Budget = paging.DefaultBudget
	}
	if err := m.windowedRefusal(method); err != nil {
		return nil, err
	}
	if slices.Contains(mods, heads.OptionKey) && o.Extra[heads.OptionKey] == nil {
		prof, err := m.HeadProfile()
		if err != nil {
			return nil, err
		}
		o.Extra = maps.Clone(o.Extra)
		if o.Extra == nil {
			o.Extra = map[string]any{}
		}
		o.Extra[heads.OptionKey] = prof
	}
	return paging.New(o.Policy, paging.Config{
		PageSize: m.opts.PageSize, Budget: o.Budget, Sinks: o.Sinks, Window: o.Window,
		DenseLayers: o.DenseLayers, Neighbors: o.Neighbors,
		Layers: m.cfg.Layers, KVHeads: m.cfg.KVHeads, Options: o.Extra,
	})
}

// windowedRefusal refuses the methods that cannot run on a model with
// sliding-window layers. probe and squeezed assume every layer reaches
// their selector (probe's per-layer cut-off and pass counting, squeezed's
// per-layer clusters), and read keys of every layer from the host pages;
// windowed layers are answered by the sliding-window wrapper instead, and
// their host pages keep only the window.
func (m *Model) windowedRefusal(method string) error {
	if (method == "probe" || method == "squeezed") && m.cfg.SlidingWindow > 0 {
		return fmt.Errorf("method %s does not support %s's sliding-window layers yet: use dense, window, quest or retro", method, m.cfg.Arch)
	}
	return nil
}

// headDefault holds a model's default head profile.
type headDefault struct {
	mu      sync.RWMutex
	set     bool
	classes heads.Classes
	err     error
}

// HeadProfile returns the head classes that "+heads" methods use when a
// call gives none: the profile set with SetHeadProfile, else the retrieval
// heads the GGUF records (the foundry's recall models do), else the profile
// beside the model file (heads.DefaultPath: model.heads.json, where `heads
// detect` writes it), else an error saying how to make one.
func (m *Model) HeadProfile() (heads.Classes, error) {
	m.heads.mu.RLock()
	if m.heads.set {
		defer m.heads.mu.RUnlock()
		return m.heads.classes, m.heads.err
	}
	m.heads.mu.RUnlock()
	m.heads.mu.Lock()
	defer m.heads.mu.Unlock()
	if !m.heads.set {
		m.heads.set = true
		recorded, ok, err := heads.Recorded(m.file)
		beside := heads.DefaultPath(m.path)
		_, statErr := os.Stat(beside)
		switch {
		case err != nil:
			m.heads.err = err
		case ok:
			m.heads.classes, m.heads.err = heads.FromQueryHeads(m.cfg.Layers, m.cfg.Heads, m.cfg.KVHeads, recorded)
		case statErr == nil:
			m.heads.classes, m.heads.err = heads.Load(beside, m)
		default:
			m.heads.err = fmt.Errorf("model %s has no head profile: detect one (`heads detect --model %s` writes %s) or set one (serve --heads-profile, runtime.Model.SetHeadProfile)",
				filepath.Base(m.path), filepath.Base(m.path), filepath.Base(beside))
		}
	}
	return m.heads.classes, m.heads.err
}

// SetHeadProfile sets the model's default head classes for "+heads"
// methods (nil restores the GGUF's recorded heads, if any).
func (m *Model) SetHeadProfile(c heads.Classes) {
	m.heads.mu.Lock()
	defer m.heads.mu.Unlock()
	m.heads.set = c != nil
	m.heads.classes, m.heads.err = c, nil
}

// ApplyHeadProfile sets m's default head profile from a command-line spec:
// a profile file, or "half" (see heads.Resolve); "" keeps the model's own.
func ApplyHeadProfile(m *Model, spec string) error {
	c, err := heads.Resolve(spec, m)
	if err != nil || c == nil {
		return err
	}
	m.SetHeadProfile(c)
	return nil
}

// PagedCache returns a cache factory for sessions whose KV cache is paged
// and attended under policy.
func PagedCache(o PolicyOptions) CacheFactory {
	return func(m *Model) (ollamakv.Cache, error) {
		pol, err := m.NewSelector(o)
		if err != nil {
			return nil, err
		}
		return m.newPaged(pol, m.opts.ContextLength, nil)
	}
}

func (m *Model) newPaged(pol paging.Selector, capacity int, prefix *kvcache.Store) (*kvcache.Paged, error) {
	if m.opts.FlashAttention {
		return nil, fmt.Errorf("the paged cache needs flash attention off")
	}
	if m.kvType != ml.DTypeF16 {
		return nil, fmt.Errorf("the paged cache stores f16 keys and values; open the model with KVType f16")
	}
	if w := m.cfg.SlidingWindow; w > 0 {
		// Windowed layers (gemma) keep only their window, whatever the
		// method: streaming layers with no budget and no selection.
		var err error
		if pol, err = paging.SlidingWindow(pol, m.cfg.Windowed, w); err != nil {
			return nil, err
		}
	}
	c, err := kvcache.NewPaged(kvcache.Options{
		Layout: m.Layout(), Heads: m.cfg.Heads, Selector: pol,
		Capacity: capacity, MaxBatch: m.opts.BatchSize, Prefix: prefix,
		AttnSoftcap: m.cfg.AttnSoftcap,
	})
	if err != nil {
		return nil, err
	}
	c.Init(m.backend, ml.DTypeF16, 1, capacity, m.opts.BatchSize)
	if err := m.net.CheckCache(c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}
