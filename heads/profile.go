package heads

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// Model is what a profile belongs to; *runtime.Model is one. (heads cannot
// import runtime, which imports heads for the "+heads" modifier.)
type Model interface {
	Path() string
	Fingerprint() kvcache.Fingerprint
	Config() arch.Config
}

var _ Classes = (*Profile)(nil)

// Head classes of a KV head.
const (
	Retrieval = "retrieval" // keeps what the inner method selects
	Streaming = "streaming" // keeps only sinks and the recent window
)

// Methods that make profiles.
const (
	MethodNIAH      = "niah"      // Retrieval Head paper scores on needle prompts
	MethodDataFree  = "datafree"  // echo/induction scores on repeated random tokens
	MethodSynthetic = "synthetic" // a fixed split, for benchmarks
)

// DefaultThreshold is the Retrieval Head paper's cut: a head scoring above
// it is a retrieval head.
const DefaultThreshold = 0.1

// FormatVersion is written into every profile; Load refuses others.
const FormatVersion = 1

// Profile is the result of a detection for one model file (heads/detect
// makes them; cmd/heads writes them). A KV head is
// retrieval if any of the query heads sharing it scores above Threshold
// (heads Group*g .. Group*g+Group-1 share KV head g).
type Profile struct {
	Version     int     `json:"version"`
	Model       string  `json:"model"`       // file name the profile was made from (informational)
	Fingerprint string  `json:"fingerprint"` // hex sha256 of the file's header, size and data samples (runtime.Model.Fingerprint)
	Method      string  `json:"method"`      // niah, datafree or synthetic
	Threshold   float64 `json:"threshold"`
	Layers      int     `json:"layers"`
	Heads       int     `json:"heads"`    // query heads per layer
	KVHeads     int     `json:"kv_heads"` // KV heads per layer

	// Scores[layer][head] is the retrieval score of each query head: for
	// niah the mean copy score over correctly answered samples, for
	// datafree max(Echo, Induction).
	Scores    [][]float64 `json:"scores"`
	Echo      [][]float64 `json:"echo,omitempty"`      // datafree: share of queries attending to the previous occurrence of their token
	Induction [][]float64 `json:"induction,omitempty"` // datafree: share attending to the token after it
	// InNeedle (niah) is the share of decoding steps, over the prompts
	// answered exactly, whose top-1 position lies anywhere in the needle,
	// whatever the token there: an echo head scores here but not in Scores.
	InNeedle [][]float64 `json:"in_needle,omitempty"`

	// Classes[layer][kvHead] is Retrieval or Streaming.
	Classes [][]string `json:"classes"`

	Samples int `json:"samples,omitempty"` // niah: prompts run
	Correct int `json:"correct,omitempty"` // niah: prompts answered exactly (the scores average over these)
}

// NewProfile makes a profile of m with zero scores and no classes (call
// Classify once the scores are in).
func NewProfile(m Model, method string, threshold float64) *Profile {
	cfg := m.Config()
	fp := m.Fingerprint()
	p := &Profile{Version: FormatVersion, Model: filepath.Base(m.Path()), Fingerprint: hex.EncodeToString(fp[:]),
		Method: method, Threshold: threshold, Layers: cfg.Layers, Heads: cfg.Heads, KVHeads: cfg.KVHeads}
	p.Scores = Grid(cfg.Layers, cfg.Heads)
	return p
}

// Grid returns rows x cols zeros.
func Grid(rows, cols int) [][]float64 {
	g := make([][]float64, rows)
	for i := range g {
		g[i] = make([]float64, cols)
	}
	return g
}

// Classify sets Classes from Scores and Threshold.
func (p *Profile) Classify() {
	group := p.Heads / p.KVHeads
	p.Classes = make([][]string, p.Layers)
	for l := range p.Classes {
		p.Classes[l] = make([]string, p.KVHeads)
		for g := range p.Classes[l] {
			p.Classes[l][g] = Streaming
			for h := g * group; h < (g+1)*group; h++ {
				if p.Scores[l][h] > p.Threshold {
					p.Classes[l][g] = Retrieval
				}
			}
		}
	}
}

// Synthetic returns a profile of m that marks the given fraction of each
// layer's KV heads streaming (the last ones, rounded down) and the rest
// retrieval, whatever the model does: for speed benchmarks of head masks.
func Synthetic(m Model, streaming float64) (*Profile, error) {
	if streaming < 0 || streaming > 1 {
		return nil, fmt.Errorf("heads: streaming fraction %v is outside [0, 1]", streaming)
	}
	p := NewProfile(m, MethodSynthetic, DefaultThreshold)
	n := int(streaming * float64(p.KVHeads))
	group := p.Heads / p.KVHeads
	for l := range p.Scores {
		for h := range p.Scores[l] {
			if h/group < p.KVHeads-n {
				p.Scores[l][h] = 1
			}
		}
	}
	p.Classify()
	return p, nil
}

// Streaming reports whether KV head kvHead of layer is a streaming head
// (Classes: the "+heads" modifier takes a *Profile).
func (p *Profile) Streaming(layer, kvHead int) bool { return p.Classes[layer][kvHead] == Streaming }

// KVClasses returns [layer][kvHead], true for streaming heads.
func (p *Profile) KVClasses() [][]bool {
	out := make([][]bool, p.Layers)
	for l := range out {
		out[l] = make([]bool, p.KVHeads)
		for g := range out[l] {
			out[l][g] = p.Streaming(l, g)
		}
	}
	return out
}

// RetrievalHeads lists the query heads scoring above the threshold, in
// layer and head order.
func (p *Profile) RetrievalHeads() []Head {
	var out []Head
	for l, row := range p.Scores {
		for h, s := range row {
			if s > p.Threshold {
				out = append(out, Head{l, h})
			}
		}
	}
	return out
}

// StreamingKVHeads counts the streaming KV heads over all layers.
func (p *Profile) StreamingKVHeads() int {
	n := 0
	for _, row := range p.Classes {
		for _, c := range row {
			if c == Streaming {
				n++
			}
		}
	}
	return n
}

// DefaultPath is where a model's profile goes unless told otherwise: beside
// the model file, model.gguf -> model.heads.json (cmd/heads writes there, and
// a server can look there for a model's default profile).
func DefaultPath(modelPath string) string {
	return strings.TrimSuffix(modelPath, ".gguf") + ".heads.json"
}

// Save writes the profile as indented JSON (atomically).
func (p *Profile) Save(path string) error {
	if err := p.validate(); err != nil {
		return fmt.Errorf("heads: save %s: %w", path, err)
	}
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteBytes(path, append(b, '\n'), 0o644)
}

// Load reads a profile and checks that it was made for m's file and shape.
// Every problem is an error naming the profile file.
func Load(path string, m Model) (*Profile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("heads: profile %s: %w", path, err)
	}
	p, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("heads: profile %s: %w", path, err)
	}
	fp := m.Fingerprint()
	if want := hex.EncodeToString(fp[:]); p.Fingerprint != want {
		return nil, fmt.Errorf("heads: profile %s was made for another model file (%s, fingerprint %.16s…), not %s (fingerprint %.16s…)",
			path, p.Model, p.Fingerprint, m.Path(), want)
	}
	cfg := m.Config()
	if p.Layers != cfg.Layers || p.Heads != cfg.Heads || p.KVHeads != cfg.KVHeads {
		return nil, fmt.Errorf("heads: profile %s has %d layers x %d heads (%d KV), but %s has %d x %d (%d KV)",
			path, p.Layers, p.Heads, p.KVHeads, m.Path(), cfg.Layers, cfg.Heads, cfg.KVHeads)
	}
	return p, nil
}

// Parse decodes and validates a profile without checking its model.
func Parse(b []byte) (*Profile, error) {
	var p Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("malformed JSON: %w", err)
	}
	if err := p.validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

func (p *Profile) validate() error {
	switch {
	case p.Version != FormatVersion:
		return fmt.Errorf("format version %d, want %d", p.Version, FormatVersion)
	case len(p.Fingerprint) != 64:
		return errors.New("fingerprint is not a hex sha256")
	case p.Layers <= 0 || p.Heads <= 0 || p.KVHeads <= 0 || p.Heads%p.KVHeads != 0:
		return fmt.Errorf("bad shape: %d layers, %d heads, %d KV heads", p.Layers, p.Heads, p.KVHeads)
	case len(p.Scores) != p.Layers || len(p.Classes) != p.Layers:
		return fmt.Errorf("scores have %d layers and classes %d, want %d", len(p.Scores), len(p.Classes), p.Layers)
	}
	if _, err := hex.DecodeString(p.Fingerprint); err != nil {
		return errors.New("fingerprint is not a hex sha256")
	}
	for l := range p.Layers {
		if len(p.Scores[l]) != p.Heads {
			return fmt.Errorf("layer %d has %d scores, want %d", l, len(p.Scores[l]), p.Heads)
		}
		if len(p.Classes[l]) != p.KVHeads {
			return fmt.Errorf("layer %d has %d KV head classes, want %d", l, len(p.Classes[l]), p.KVHeads)
		}
		for g, c := range p.Classes[l] {
			if c != Retrieval && c != Streaming {
				return fmt.Errorf("layer %d KV head %d has class %q, want %q or %q", l, g, c, Retrieval, Streaming)
			}
		}
	}
	return nil
}
