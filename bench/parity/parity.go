// Package parity checks that a model computes the same on a device as on
// the CPU: the same GGUF opened twice in one process, once with every
// layer on the CPU and once on the device under test (a GPU from a loaded
// ggml-cuda; docs/gpu.md), then a dense prompt's logits, a paged document
// session's logits (quest under a budget smaller than the document, so
// pages are selected) and a greedy generation compared.
package parity

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kvrecall/kvrecall/runtime"
)

// Config says what to compare.
type Config struct {
	Models    []string // GGUF paths
	Device    string   // the device under test (runtime.Options.Device)
	GPULayers int      // 0: all
	Threads   int      // CPU threads of both models (0: all)
	// Tolerance bounds max |logit difference| as a fraction of the CPU's
	// max |logit| (default 1e-3: different kernels round differently).
	Tolerance float64
	Log       func(format string, args ...any)
}

// Row is one check of one model.
type Row struct {
	Model   string  `json:"model"`
	Device  string  `json:"device"` // name and description of the device under test
	Check   string  `json:"check"`  // dense, paged quest, greedy 32
	MaxDiff float64 `json:"max_diff"`
	Scale   float64 `json:"scale"` // max |logit| on the CPU
	Detail  string  `json:"detail,omitempty"`
	OK      bool    `json:"ok"`
}

// Run compares every model; the rows say what held. An error means a
// model could not be opened or run, not that a check failed.
func Run(ctx context.Context, c Config) ([]Row, error) {
	if c.Tolerance <= 0 {
		c.Tolerance = 1e-3
	}
	if c.Log == nil {
		c.Log = func(string, ...any) {}
	}
	var rows []Row
	for _, path := range c.Models {
		r, err := one(ctx, c, path)
		rows = append(rows, r...)
		if err != nil {
			return rows, fmt.Errorf("%s: %w", path, err)
		}
	}
	return rows, nil
}

// work is what one placement of a model computed.
type work struct {
	device string
	dense  [][]float32
	paged  [][]float32
	greedy []int32
	gaps   []float64 // at each greedy step, the largest logit minus the second
	scale  float64   // the largest |logit| of the greedy steps
}

func one(ctx context.Context, c Config, path string) ([]Row, error) {
	cpu, err := compute(ctx, path, runtime.Options{Threads: c.Threads}, c.Log)
	if err != nil {
		return nil, fmt.Errorf("on the CPU: %w", err)
	}
	dev, err := compute(ctx, path, runtime.Options{Threads: c.Threads, Device: c.Device, GPULayers: c.GPULayers}, c.Log)
	if err != nil {
		return nil, fmt.Errorf("on %s: %w", c.Device, err)
	}
	name := filepath.Base(path)
	row := func(check string, d, scale float64) Row {
		return Row{Model: name, Device: dev.device, Check: check, MaxDiff: d, Scale: scale,
			OK: scale > 0 && d <= c.Tolerance*scale && !math.IsNaN(d)}
	}
	dd, ds := maxDiff(dev.dense, cpu.dense)
	pd, ps := maxDiff(dev.paged, cpu.paged)
	g := Row{Model: name, Device: dev.device, Check: "greedy 32", OK: slices.Equal(dev.greedy, cpu.greedy)}
	if !g.OK {
		// Where the tokens part, a near tie on the CPU (its two best
		// logits closer than the logits' tolerance) may go either way.
		i := 0
		for i < min(len(dev.greedy), len(cpu.greedy)) && dev.greedy[i] == cpu.greedy[i] {
			i++
		}
		g.Detail = fmt.Sprintf("tokens part at step %d: device %v, CPU %v", i, dev.greedy[i:], cpu.greedy[i:])
		if i < len(cpu.gaps) && cpu.gaps[i] <= c.Tolerance*cpu.scale {
			g.OK = true
			g.Detail += fmt.Sprintf(", a near tie on the CPU (top two logits %.3g apart)", cpu.gaps[i])
		}
	}
	return []Row{row("dense", dd, ds), row("paged quest", pd, ps), g}, nil
}

func compute(ctx context.Context, path string, o runtime.Options, log func(string, ...any)) (*work, error) {
	data, err := os.MkdirTemp("", "kvrecall-parity-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(data)
	o.ContextLength, o.DataDir = 1024, data
	m, err := runtime.Open(ctx, path, o)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	use := m.Device()
	w := &work{device: fmt.Sprintf("%s (%s)", use.Device.Name, use.Device.Description)}
	log("%s on %s, %d of %d layers offloaded", path, w.device, use.GPULayers, use.Layers+1)
	vocab := m.Config().Vocab
	toks := make([]int32, 600)
	for i := range toks {
		toks[i] = int32(3 + (i*7919+13)%max(1, vocab-3))
	}
	s, err := m.NewSession()
	if err != nil {
		return nil, err
	}
	defer s.Close()
	if w.dense, err = s.Eval(ctx, toks[:128], true, nil); err != nil {
		return nil, err
	}
	doc, err := m.IngestTokens(ctx, "parity", toks, nil)
	if err != nil {
		return nil, err
	}
	ps, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: "quest", Budget: 160, Sinks: 16, Window: 32})
	if err != nil {
		return nil, err
	}
	defer ps.Close()
	if w.paged, err = ps.Eval(ctx, toks[100:108], true, nil); err != nil {
		return nil, err
	}
	gs, err := m.NewSession()
	if err != nil {
		return nil, err
	}
	defer gs.Close()
	// Greedy decoding by hand, to keep each step's top-two gap.
	in := toks[:8]
	for len(w.greedy) < 32 {
		logits, err := gs.Eval(ctx, in, false, nil)
		if err != nil {
			return nil, err
		}
		row := logits[len(logits)-1]
		best, second := 0, -1
		for j, v := range row {
			w.scale = math.Max(w.scale, math.Abs(float64(v)))
			switch {
			case v > row[best]:
				best, second = j, best
			case j != best && (second < 0 || v > row[second]):
				second = j
			}
		}
		w.gaps = append(w.gaps, float64(row[best]-row[second]))
		w.greedy = append(w.greedy, int32(best))
		in = []int32{int32(best)}
	}
	return w, nil
}

// maxDiff is the largest |a-b| over all logits and the largest |b|.
func maxDiff(a, b [][]float32) (diff, scale float64) {
	if len(a) != len(b) {
		return math.NaN(), 0
	}
	for i := range b {
		if len(a[i]) != len(b[i]) {
			return math.NaN(), 0
		}
		for j := range b[i] {
			diff = math.Max(diff, math.Abs(float64(a[i][j]-b[i][j])))
			scale = math.Max(scale, math.Abs(float64(b[i][j])))
		}
	}
	return diff, scale
}

// Table renders rows as Markdown.
func Table(rows []Row) string {
	var b strings.Builder
	b.WriteString("| model | device | check | max abs diff | max abs logit | ok |\n|---|---|---|---|---|---|\n")
	for _, r := range rows {
		ok := "yes"
		if !r.OK {
			ok = "**no**"
		}
		if r.Detail != "" {
			ok += " (" + r.Detail + ")"
		}
		if r.Check == "greedy 32" {
			fmt.Fprintf(&b, "| %s | %s | %s | — | — | %s |\n", r.Model, r.Device, r.Check, ok)
			continue
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %.3g | %.3g | %s |\n", r.Model, r.Device, r.Check, r.MaxDiff, r.Scale, ok)
	}
	return b.String()
}
