package runtime

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// pagedStepGraphs makes sessions made afterwards on a Paged cache keep
// the graph of their one-token decode steps across steps (pagedStep).
// Tests turn it off to compare against a graph built for every step.
var pagedStepGraphs = true

// pagedStepFault, when set (tests), makes a kept build fail at its end
// (stage "build") or a kept step fail after its inputs were written
// (stage "step") with the error it returns.
var pagedStepFault func(stage string) error

// pagedStep is a session's kept one-token step graph on a Paged cache
// (issue 14, "Graph reuse across decode steps"), as stepGraph is the
// dense engine's. The cache says, after its StartForward, whether the
// step can be computed by a kept graph and what the graph's shape is
// (kvcache.Paged.PrepareKeptStep: its key); a graph built for the same
// key computes the step once the cache has written the step's inputs
// (its cells, masks; kvcache/keptstep.go) and this writes the token and
// position. A new key (a new page attended, a pool resized, quest's
// padded rows crossing a multiple of 16, ...) builds the graph again.
// What is saved is building the graph through cgo: each layer's Put,
// readback copies, mask inputs, quest's in-graph bound, and the logits.
//
// As for stepGraph, the graph's intermediate tensors are released before
// each compute (ollama resets the shared scheduler after each graph;
// other sessions' graphs may move the compute buffer), and a graph that
// reads a tensor outside host memory is not kept (errStepGraphBackends):
// the session then builds each step's graph as before, and stops trying.
type pagedStep struct {
	keep   bool // false once a graph could not be kept
	builds int  // graphs built (tests)
	ctx    ml.Context
	key    []uint64
	tokens ml.Tensor // I32 [1]
	pos    ml.Tensor // I32 [1]
	logits ml.Tensor // F32 [vocab, 1]
	in     *kvcache.KeptInputs
	placed []*cTensor
}

// newPagedStep returns the kept-step state of a new session on cache: nil
// unless it is a Paged cache and pagedStepGraphs is on.
func newPagedStep(cache any) *pagedStep {
	if _, ok := cache.(*kvcache.Paged); ok && pagedStepGraphs {
		return &pagedStep{keep: true}
	}
	return nil
}

func (g *pagedStep) close() {
	if g != nil && g.ctx != nil {
		g.ctx.Close()
		g.ctx = nil
		g.key, g.in, g.placed = nil, nil, nil
	}
}

// decodePaged computes a one-token step of token at pos on the session's
// Paged cache c, through the kept graph when the cache allows it, else
// through a graph built for the step (arch.Model.Run). Returns the
// logits, row-major [1][vocab].
func (s *Session) decodePaged(c *kvcache.Paged, token, pos int32) (logits []float32, vocab int, err error) {
	g := s.pstep
	m := s.m
	batch := input.Batch{Positions: []int32{pos}, Sequences: []int{0}}
	if err := c.StartForward(nil, batch, false); err != nil {
		return nil, 0, err
	}
	fresh := func() ([]float32, int, error) {
		return m.net.Run(m.backend, arch.Step{Tokens: []int32{token}, Positions: []int32{pos}, Outputs: []int32{0}, Started: true}, c)
	}
	key, ok := c.PrepareKeptStep()
	if !ok {
		return fresh()
	}
	if g.ctx == nil || !slices.Equal(g.key, key) {
		g.close()
		if err := g.build(m.net, m.backend, c, key); err != nil {
			// Not kept from now on: the session's steps are built one by
			// one, as before this graph existed. A failed build leaves
			// nothing behind (build aborts it), and its host work is what
			// the fresh build would do (PrepareKeptStep), so this step
			// goes on fresh. Anything but a graph off host memory (which
			// GPUs cause by design) is unexpected: said once, not hidden.
			g.keep = false
			if !errors.Is(err, errStepGraphBackends) {
				slog.Warn("paged cache: decode steps no longer keep their graph", "error", err)
			}
			return fresh()
		}
	}
	// A step that fails or panics from here on (a compute failure, a
	// read-back that does not fit) closes the kept graph, so that the
	// next step builds a new one instead of reusing a graph whose
	// tensors were released, and drops the outputs this step registered.
	defer func() {
		r := recover()
		if r != nil || err != nil {
			c.AbortKeptBuild(g.ctx)
			g.close()
		}
		if r != nil {
			panic(r)
		}
	}()
	if err := c.WriteKeptStep(g.in); err != nil {
		return nil, 0, err
	}
	if pagedStepFault != nil {
		if err := pagedStepFault("step"); err != nil {
			return nil, 0, err
		}
	}
	g.tokens.FromInts([]int32{token})
	g.pos.FromInts([]int32{pos})
	releasePlaced(g.placed)
	g.ctx.Compute(append([]ml.Tensor{g.logits}, c.Outputs(g.ctx)...)...)
	if err := c.Computed(g.ctx); err != nil {
		return nil, 0, err
	}
	return g.logits.Floats(), g.logits.Dim(0), nil
}

// build builds the kept graph of the step c has prepared, with shape key.
func (g *pagedStep) build(net *arch.Model, b ml.Backend, c *kvcache.Paged, key []uint64) (err error) {
	ctx := b.NewContext()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("paged cache: building the step graph: %v", r)
		}
		if err != nil {
			c.AbortKeptBuild(ctx)
			ctx.Close()
		}
	}()
	in := ctx.Input()
	tokens := in.Empty(ml.DTypeI32, 1)
	pos := in.Empty(ml.DTypeI32, 1)
	if err := checkContextLayout(ctx, tokens); err != nil {
		return err
	}
	if err := c.BeginKeptBuild(ctx); err != nil {
		return err
	}
	out, err := net.StepGraph(ctx, tokens, pos, c)
	if err != nil {
		return err
	}
	logits := in.Empty(ml.DTypeF32, out.Dim(0), out.Dim(1))
	ctx.Forward(out.Copy(ctx, logits))
	ctx.Forward(c.Outputs(ctx)...)
	if pagedStepFault != nil {
		if err := pagedStepFault("build"); err != nil {
			return err
		}
	}
	kin, err := c.EndKeptBuild(ctx)
	if err != nil {
		return err
	}
	placed, err := placedTensors(ctx)
	if err != nil {
		return err
	}
	*g = pagedStep{keep: g.keep, builds: g.builds + 1, ctx: ctx, key: slices.Clone(key),
		tokens: tokens, pos: pos, logits: logits, in: kin, placed: placed}
	return nil
}
