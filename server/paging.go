package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/probe"
	"github.com/kvrecall/kvrecall/runtime"
)

// pagingJSON are a request's paging overrides, the same on the OpenAI and
// the Ollama routes. They apply to requests that name a document; unset
// fields keep the server's defaults (serve --kv-policy, --kv-budget).
type pagingJSON struct {
	Policy string `json:"policy"`
	Budget int    `json:"budget"`
	// Sinks and Window are the first and most recent tokens every paged
	// method attends to (pointers: an explicit 0 is an error, not the
	// default).
	Sinks  *int `json:"sinks"`
	Window *int `json:"window"`
	// HeadsProfile names a head profile the server loaded (serve
	// --heads-profiles DIR: DIR/NAME.heads.json) for a "+heads" policy.
	HeadsProfile string `json:"heads_profile"`
	// Probe holds the probe method's settings (probe.Settings).
	Probe *probeJSON `json:"probe"`
}

// probeJSON is probe.Settings in a request: {"probe": {"block_size": 128,
// "question_weight": 4}}. Unset fields keep probe's defaults; an unknown
// field is an error naming it (a typo must not silently run the defaults).
type probeJSON struct {
	BlockSize      *int     `json:"block_size"`
	RepTopK        *int     `json:"repr_topk"`
	ExcBlockSize   *int     `json:"exc_block_size"`
	QuestionWeight *float64 `json:"question_weight"`
	MinBlocks      *int     `json:"min_blocks"`
	MaxBlocks      *int     `json:"max_blocks"`
	History        *int     `json:"history"`
	StatCap        *int     `json:"stat_cap"`
	Neighbors      *int     `json:"neighbors"`
	Uniform        bool     `json:"uniform"`
}

// probeFields lists probeJSON's JSON names, for the unknown-field message.
const probeFields = "block_size, repr_topk, exc_block_size, question_weight, min_blocks, max_blocks, history, stat_cap, neighbors, uniform"

func (p *probeJSON) UnmarshalJSON(b []byte) error {
	type plain probeJSON // without this method
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var v plain
	if err := dec.Decode(&v); err != nil {
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			if u, err := strconv.Unquote(f); err == nil {
				f = u
			}
			return fmt.Errorf("probe: unknown setting %s (known: %s)", f, probeFields)
		}
		return fmt.Errorf("probe: %w", err)
	}
	*p = probeJSON(v)
	return nil
}

// settings checks the fields that need no model (each at least 1 where it
// is a count, question_weight finite and >= 0) and returns probe.Settings.
// What depends on the model or the budget (block_size a multiple of the
// page size, repr_topk within the block, exc_block_size within the window,
// min_blocks <= max_blocks after defaults) is checked when the request's
// selector is built, in prepare, with errors naming the setting too.
func (p *probeJSON) settings() (probe.Settings, error) {
	var s probe.Settings
	for _, f := range []struct {
		name string
		v    *int
		dst  *int
	}{
		{"block_size", p.BlockSize, &s.BlockSize}, {"repr_topk", p.RepTopK, &s.RepTopK},
		{"exc_block_size", p.ExcBlockSize, &s.ExcBlockSize}, {"min_blocks", p.MinBlocks, &s.MinBlocks},
		{"max_blocks", p.MaxBlocks, &s.MaxBlocks}, {"history", p.History, &s.History}, {"stat_cap", p.StatCap, &s.StatCap},
	} {
		if f.v == nil {
			continue
		}
		if *f.v < 1 {
			return s, badRequest("probe.%s must be at least 1 (got %d; omit it for the default)", f.name, *f.v)
		}
		*f.dst = *f.v
	}
	if w := p.QuestionWeight; w != nil {
		if math.IsNaN(*w) || math.IsInf(*w, 0) || *w < 0 {
			return s, badRequest("probe.question_weight must be a finite number >= 0 (got %v)", *w)
		}
		s.QuestionWeight = *w
	}
	if p.MinBlocks != nil && p.MaxBlocks != nil && *p.MinBlocks > *p.MaxBlocks {
		return s, badRequest("probe.min_blocks %d exceeds probe.max_blocks %d", *p.MinBlocks, *p.MaxBlocks)
	}
	if n := p.Neighbors; n != nil {
		switch {
		case *n < 0:
			return s, badRequest("probe.neighbors must be >= 0 (got %d; omit it for the default)", *n)
		case *n == 0:
			s.Neighbors = -1 // none; 0 in Settings means the default
		default:
			s.Neighbors = *n
		}
	}
	s.Uniform = p.Uniform
	return s, nil
}

// policy applies a request's paging overrides to the server's default
// policy: the method, the budget, sinks and window, a named head profile
// and probe's settings. Errors are 400s naming the field.
func (s *Server) policy(r pagingJSON) (runtime.PolicyOptions, error) {
	p := s.cfg.Policy
	if r.Policy != "" {
		if _, _, err := paging.Parse(r.Policy); err != nil {
			return p, badRequest("unknown policy %q (known: %s)", r.Policy, paging.Known())
		}
		p.Policy = r.Policy
	}
	if r.Budget < 0 {
		return p, badRequest("budget must be positive (0: the server's default)")
	}
	if r.Budget > 0 {
		p.Budget = r.Budget
	}
	for _, f := range []struct {
		name string
		v    *int
		dst  *int
	}{{"sinks", r.Sinks, &p.Sinks}, {"window", r.Window, &p.Window}} {
		if f.v == nil {
			continue
		}
		if *f.v < 1 {
			return p, badRequest("%s must be at least 1 (got %d; omit it for the default)", f.name, *f.v)
		}
		*f.dst = *f.v
	}
	// The request's Extra is its own: the server's default map is shared.
	p.Extra = maps.Clone(p.Extra)
	if r.HeadsProfile != "" {
		s.profilesMu.RLock()
		c, ok := s.profiles[r.HeadsProfile]
		names := slices.Sorted(maps.Keys(s.profiles))
		s.profilesMu.RUnlock()
		if !ok {
			return p, badRequest("heads_profile %q is not loaded (loaded: %s; start serve with --heads-profiles DIR)", r.HeadsProfile, strings.Join(names, ", "))
		}
		if p.Extra == nil {
			p.Extra = map[string]any{}
		}
		p.Extra[heads.OptionKey] = c
	}
	if r.Probe != nil {
		method, _, err := paging.Parse(orRetro(p.Policy))
		if err != nil {
			return p, badRequest("policy: %v", err)
		}
		if method != "probe" {
			return p, badRequest("probe settings apply to the probe method only, and the policy is %q (set \"policy\": \"probe\")", orRetro(p.Policy))
		}
		ps, err := r.Probe.settings()
		if err != nil {
			return p, err
		}
		if p.Extra == nil {
			p.Extra = map[string]any{}
		}
		p.Extra[probe.OptionKey] = ps
	}
	return p, nil
}

// orRetro is the runtime's default method.
func orRetro(policy string) string {
	if policy == "" {
		return "retro"
	}
	return policy
}
