// Package speed measures prefill and decode throughput of kvrecall's engine
// against llama.cpp's dense graph on the same GGUF file, in one run, and
// reports ratios.
package speed

import (
	"context"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/kvrecall/kvrecall/llamaref"
	"github.com/kvrecall/kvrecall/runtime"
)

// DenseConfig selects a dense comparison.
type DenseConfig struct {
	Model        string // GGUF path
	Label        string // name in the table
	Contexts     []int  // prompt lengths to prefill before decoding
	Threads      []int
	DecodeTokens int    // decode steps timed after each prefill (default 32)
	KVType       string // f16 (default) or f32
	// Device and GPULayers place both engines' layers (runtime.Options;
	// llama.cpp offloads its last GPULayers to the same device, all of
	// them for 0, and uses no GPU when Device is the CPU).
	Device    string
	GPULayers int
	Log       io.Writer
}

// DenseRow is one (context, threads) measurement.
type DenseRow struct {
	Model   string  `json:"model"`
	Context int     `json:"context"`
	Threads int     `json:"threads"`
	Engine  Timings `json:"kvrecall"`
	Llama   Timings `json:"llamacpp"`
}

// Timings of one engine.
type Timings struct {
	PrefillTokensPerSec float64 `json:"prefill_tok_s"`
	DecodeMsPerToken    float64 `json:"decode_ms_token"` // median over the decode steps
}

// PrefillRatio is our prefill speed over llama.cpp's (>1 is faster).
func (r DenseRow) PrefillRatio() float64 {
	return r.Engine.PrefillTokensPerSec / r.Llama.PrefillTokensPerSec
}

// DecodeRatio is our decode time per token over llama.cpp's (<1 is faster).
func (r DenseRow) DecodeRatio() float64 { return r.Engine.DecodeMsPerToken / r.Llama.DecodeMsPerToken }

// prompt is a deterministic token sequence that avoids special tokens.
func prompt(n, vocab int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(3 + (i*7919)%(vocab-3))
	}
	return p
}

func median(d []time.Duration) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[len(s)/2]) / float64(time.Millisecond)
}

// RunDense measures every (context, threads) pair with both engines.
func RunDense(ctx context.Context, c DenseConfig) ([]DenseRow, error) {
	if c.DecodeTokens <= 0 {
		c.DecodeTokens = 32
	}
	if c.KVType == "" {
		c.KVType = "f16"
	}
	logf := func(format string, args ...any) {
		if c.Log != nil {
			fmt.Fprintf(c.Log, format+"\n", args...)
		}
	}
	var rows []DenseRow
	for _, th := range c.Threads {
		for _, n := range c.Contexts {
			row, err := denseOne(ctx, c, n, th)
			if err != nil {
				return rows, err
			}
			logf("%s ctx %d threads %d: prefill %.0f vs %.0f tok/s, decode %.2f vs %.2f ms/token (kvrecall vs llama.cpp)",
				c.Label, n, th, row.Engine.PrefillTokensPerSec, row.Llama.PrefillTokensPerSec, row.Engine.DecodeMsPerToken, row.Llama.DecodeMsPerToken)
			rows = append(rows, row)
		}
	}
	return rows, nil
}

// denseOne loads both engines side by side, times each prefill, then
// alternates single-token decode steps between them so that both see the
// same machine state.
func denseOne(ctx context.Context, c DenseConfig, n, th int) (DenseRow, error) {
	row := DenseRow{Model: c.Label, Context: n, Threads: th}
	capacity := n + c.DecodeTokens + 8
	m, err := runtime.Open(ctx, c.Model, runtime.Options{Threads: th, ContextLength: capacity, KVType: c.KVType, Device: c.Device, GPULayers: c.GPULayers})
	if err != nil {
		return row, err
	}
	defer m.Close()
	s, err := m.NewSession()
	if err != nil {
		return row, err
	}
	defer s.Close()
	use := m.Device()
	ref, err := llamaref.Load(c.Model, llamaref.Options{Threads: th, Context: capacity, KVType: c.KVType, Device: llamaDeviceName(use), GPULayers: llamaGPULayers(use, c.GPULayers)})
	if err != nil {
		return row, err
	}
	defer ref.Close()

	toks := prompt(n, m.Config().Vocab)
	t0 := time.Now()
	if _, err := s.Eval(ctx, toks, false, nil); err != nil {
		return row, err
	}
	row.Engine.PrefillTokensPerSec = float64(n) / time.Since(t0).Seconds()
	t0 = time.Now()
	if _, err := ref.Append(toks, false, nil); err != nil {
		return row, err
	}
	row.Llama.PrefillTokensPerSec = float64(n) / time.Since(t0).Seconds()

	ours := make([]time.Duration, 0, c.DecodeTokens)
	theirs := make([]time.Duration, 0, c.DecodeTokens)
	for i := 0; i < c.DecodeTokens; i++ {
		if err := ctx.Err(); err != nil {
			return row, err
		}
		t0 = time.Now()
		if _, err := s.Eval(ctx, []int32{toks[i]}, false, nil); err != nil {
			return row, err
		}
		ours = append(ours, time.Since(t0))
		t0 = time.Now()
		if _, err := ref.Append([]int32{toks[i]}, false, nil); err != nil {
			return row, err
		}
		theirs = append(theirs, time.Since(t0))
	}
	row.Engine.DecodeMsPerToken = median(ours)
	row.Llama.DecodeMsPerToken = median(theirs)
	return row, nil
}

// DenseTable formats rows as Markdown.
func DenseTable(rows []DenseRow) string {
	s := "| model | context | threads | prefill tok/s kvrecall | prefill tok/s llama.cpp | prefill ratio | decode ms/token kvrecall | decode ms/token llama.cpp | decode time ratio |\n"
	s += "|---|---|---|---|---|---|---|---|---|\n"
	for _, r := range rows {
		s += fmt.Sprintf("| %s | %d | %d | %.0f | %.0f | %.2f | %.2f | %.2f | %.2f |\n", r.Model, r.Context, r.Threads,
			r.Engine.PrefillTokensPerSec, r.Llama.PrefillTokensPerSec, r.PrefillRatio(),
			r.Engine.DecodeMsPerToken, r.Llama.DecodeMsPerToken, r.DecodeRatio())
	}
	return s
}

// llamaGPULayers is llama.cpp's n_gpu_layers when our layers are on use:
// none on the CPU, else the same count as ours (our 0 means all:
// llama.cpp's 999, as its CLI's -ngl 999).
func llamaGPULayers(use runtime.DeviceUse, n int) int {
	if !use.Device.IsGPU() {
		return 0
	}
	if n <= 0 {
		return 999
	}
	return n
}

// llamaDeviceName is the ggml device llama.cpp may use: ours when it is a
// GPU, none otherwise.
func llamaDeviceName(use runtime.DeviceUse) string {
	if !use.Device.IsGPU() {
		return ""
	}
	return use.Device.Name
}
