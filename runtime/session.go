package runtime

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/ollama/ollama/kvcache"

	pagedkv "github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// ErrContextFull is returned when a session cannot hold more tokens.
var ErrContextFull = errors.New("context is full")

// Session is one sequence: the tokens evaluated so far and their KV cache.
// It is not safe for concurrent use.
type Session struct {
	m        *Model
	cache    kvcache.Cache
	tokens   []int32
	capacity int
	// scratch for the batch description, reused between forward passes
	positions []int32
	outputs   []int32
	// release unpins the document the session started from (documents.go).
	release func()
	// pstep is the kept decode-step graph of a Paged cache (pagedstep.go);
	// nil: steps build their graphs.
	pstep *pagedStep
}

// NewSession starts an empty sequence with a fresh cache from the model's
// cache factory.
func (m *Model) NewSession() (*Session, error) {
	return m.NewSessionWith(m.opts.NewCache)
}

// NewSessionWith starts an empty sequence with a cache from f.
func (m *Model) NewSessionWith(f CacheFactory) (*Session, error) {
	done, err := m.use()
	if err != nil {
		return nil, err
	}
	c, err := f(m)
	if err == nil {
		if err = m.net.CheckCache(c); err != nil {
			c.Close()
		}
	}
	done()
	if err != nil {
		return nil, err
	}
	return &Session{m: m, cache: c, capacity: m.opts.ContextLength, pstep: newPagedStep(c)}, nil
}

// Close frees the session's cache.
func (s *Session) Close() {
	if s.pstep != nil {
		// Before the cache: the graph reads its pools.
		s.m.life.RLock()
		s.pstep.close()
		s.m.life.RUnlock()
		s.pstep = nil
	}
	if s.cache != nil {
		// Not while Model.Close frees the backend (after it is fine: the
		// cache's buffers are its own).
		s.m.life.RLock()
		s.cache.Close()
		s.m.life.RUnlock()
		s.cache = nil
	}
	if s.release != nil {
		s.release()
		s.release = nil
	}
}

// Len is the number of tokens in the session.
func (s *Session) Len() int { return len(s.tokens) }

// Tokens returns the tokens in the session (do not modify).
func (s *Session) Tokens() []int32 { return s.tokens }

// Cache returns the session's KV cache.
func (s *Session) Cache() kvcache.Cache { return s.cache }

// Model returns the model the session runs.
func (s *Session) Model() *Model { return s.m }

// Truncate drops every token after the first n.
func (s *Session) Truncate(n int) error {
	if n < 0 || n > len(s.tokens) {
		return fmt.Errorf("truncate to %d of %d tokens", n, len(s.tokens))
	}
	if n == len(s.tokens) {
		return nil
	}
	if err := s.cache.Remove(0, int32(n), math.MaxInt32); err != nil {
		return err
	}
	s.tokens = s.tokens[:n]
	return nil
}

// Progress reports prefill progress: done of total tokens.
type Progress func(done, total int)

// Eval appends tokens to the session in batches of the model's batch size and
// returns logits: one row per appended token when all is set, otherwise only
// the last token's row. ctx is checked between batches.
func (s *Session) Eval(ctx context.Context, tokens []int32, all bool, progress Progress) ([][]float32, error) {
	if len(tokens) == 0 {
		return nil, errors.New("no tokens to evaluate")
	}
	if n := len(s.tokens) + len(tokens); n > s.capacity {
		return nil, fmt.Errorf("%w: %d tokens exceed the context length of %d", ErrContextFull, n, s.capacity)
	}
	vocab := s.m.tok.Size()
	for _, t := range tokens {
		if t < 0 || int(t) >= vocab {
			return nil, fmt.Errorf("token %d is outside the vocabulary of %d", t, vocab)
		}
	}
	bs := s.m.opts.BatchSize
	if dc, ok := s.cache.(*denseCache); ok && len(tokens) > 1 {
		// A prefill: size the compute buffer once for all its batches
		// instead of reallocating it batch by batch (reserve.go).
		if err := s.m.reserveDense(dc, len(s.tokens), len(s.tokens)+len(tokens), bs, all); err != nil {
			return nil, err
		}
	}
	var out [][]float32
	for start := 0; start < len(tokens); start += bs {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		end := min(start+bs, len(tokens))
		wantAll := all
		rows, err := s.forward(tokens[start:end], wantAll || end == len(tokens), wantAll)
		if err != nil {
			return out, err
		}
		out = append(out, rows...)
		if progress != nil {
			progress(end, len(tokens))
		}
	}
	return out, nil
}

// forward runs one batch. If any is false no logits are computed; if every
// is false only the last position's logits are.
func (s *Session) forward(tokens []int32, any, every bool) (rows [][]float32, err error) {
	m := s.m
	n := len(tokens)
	base := int32(len(s.tokens))
	s.positions = s.positions[:0]
	for i := range n {
		s.positions = append(s.positions, base+int32(i))
	}
	s.outputs = s.outputs[:0]
	switch {
	case every:
		for i := range n {
			s.outputs = append(s.outputs, int32(i))
		}
	default:
		// The graph always needs one output row; it is dropped when !any.
		s.outputs = append(s.outputs, int32(n-1))
	}

	// Hold the backend for the whole pass: Model.Close waits for it.
	done, err := m.use()
	if err != nil {
		return nil, err
	}
	defer done()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("forward pass: %v", r)
		}
		if err != nil {
			// Forget whatever this batch put in the cache so the session stays consistent.
			s.cache.Remove(0, base, math.MaxInt32)
		}
	}()
	var flat []float32
	var vocab int
	kept := false
	if dc, ok := s.cache.(*denseCache); ok && dc.keepGraph && n == 1 {
		// A decode step on DenseCache's own cache: its kept graph
		// (densestep.go) instead of a graph built for the step, unless
		// the graph cannot be kept (not all in host memory).
		flat, vocab, err = dc.decodeStep(m.net, tokens[0], base)
		kept = !errors.Is(err, errStepGraphBackends)
	}
	if pc, ok := s.cache.(*pagedkv.Paged); ok && !kept && n == 1 && s.pstep != nil && s.pstep.keep {
		// A decode step on a Paged cache: its kept graph when the cache
		// allows one for this step (pagedstep.go); it builds the step's
		// graph itself when not.
		flat, vocab, err = s.decodePaged(pc, tokens[0], base)
		kept = true
	}
	if !kept {
		flat, vocab, err = m.net.Run(m.backend, arch.Step{Tokens: tokens, Positions: s.positions, Outputs: s.outputs}, s.cache)
	}
	if err != nil {
		return nil, err
	}
	s.tokens = append(s.tokens, tokens...)
	if !any {
		return nil, nil
	}
	rows = make([][]float32, len(s.outputs))
	for i := range rows {
		rows[i] = flat[i*vocab : (i+1)*vocab : (i+1)*vocab]
	}
	return rows, nil
}
