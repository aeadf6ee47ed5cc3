package runtime

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"math"
	"strings"
	"time"

	"github.com/ollama/ollama/sample"
)

// Sampling chooses the next token from the logits. The zero value is greedy.
type Sampling struct {
	Temperature   float32 // 0 picks the most likely token
	TopK          int     // keep the k most likely tokens; 0 keeps all
	TopP          float32 // nucleus sampling; 0 or 1 disables
	MinP          float32 // drop tokens below MinP x the top probability; 0 disables
	Seed          int     // random seed; -1 draws one
	RepeatPenalty float32 // >1 discourages tokens seen in the last RepeatLastN; 0 or 1 disables
	RepeatLastN   int     // window for RepeatPenalty (default 64)
}

// GenerateOptions control one generation.
type GenerateOptions struct {
	// MaxTokens caps the generated tokens; 0 means until the context is full.
	MaxTokens int
	Sampling  Sampling
	// Stop ends generation when the text contains one of these strings; the
	// stop string itself is not returned.
	Stop []string
	// OnToken receives each generated token with the text it releases (text
	// that might begin a stop string is held back, and bytes of an incomplete
	// UTF-8 character wait for the rest). Returning an error stops generation
	// and Generate returns that error.
	OnToken func(Token) error
	// OnPrefill reports prompt evaluation progress.
	OnPrefill Progress
	// Grammar, if not "", constrains every generated token to this GBNF
	// grammar (llama.cpp's grammar sampler; see FormatGrammar for JSON
	// and JSON Schema): the model may end only where the grammar is
	// complete. A MaxTokens or stop string that cuts the answer short
	// leaves it incomplete (StopLength, StopString).
	Grammar string
}

// Token is one generated token and the text it released.
type Token struct {
	ID   int32
	Text string
}

// StopReason says why generation ended.
type StopReason string

const (
	StopEOG       StopReason = "eog"       // the model produced an end-of-generation token
	StopString    StopReason = "stop"      // a stop string appeared
	StopLength    StopReason = "length"    // MaxTokens reached
	StopContext   StopReason = "context"   // the context is full
	StopCancelled StopReason = "cancelled" // the caller's context was cancelled
)

// Result summarises a generation.
type Result struct {
	Text            string
	Tokens          []int32
	PromptTokens    int // tokens evaluated for the prompt
	CachedTokens    int // tokens already in the session (reused, not evaluated)
	GeneratedTokens int
	StopReason      StopReason
	PrefillDuration time.Duration
	DecodeDuration  time.Duration
	// LayerBudgets are the tokens each layer attended to at the end, for
	// methods whose per-layer budgets change per request (probe); nil for
	// the others.
	LayerBudgets []int
}

// PrefillTokensPerSecond is the prompt evaluation speed.
func (r *Result) PrefillTokensPerSecond() float64 {
	return perSecond(r.PromptTokens, r.PrefillDuration)
}

// DecodeTokensPerSecond is the generation speed.
func (r *Result) DecodeTokensPerSecond() float64 {
	return perSecond(r.GeneratedTokens, r.DecodeDuration)
}

func perSecond(n int, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

// Generate tokenizes prompt (with BOS when the model wants it), evaluates it
// in a new session and generates a continuation.
func (m *Model) Generate(ctx context.Context, prompt string, opts GenerateOptions) (*Result, error) {
	toks, err := m.tok.Encode(prompt, true)
	if err != nil {
		return nil, err
	}
	s, err := m.NewSession()
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return s.Generate(ctx, toks, opts)
}

// Stream is Generate as an iterator of tokens. A final error, if any, is
// yielded with an empty token. Breaking out of the loop stops generation.
func (m *Model) Stream(ctx context.Context, prompt string, opts GenerateOptions) iter.Seq2[Token, error] {
	return func(yield func(Token, error) bool) {
		stopped := false
		opts.OnToken = func(t Token) error {
			if !yield(t, nil) {
				stopped = true
				return errStopIteration
			}
			return nil
		}
		_, err := m.Generate(ctx, prompt, opts)
		if err != nil && !stopped {
			yield(Token{}, err)
		}
	}
}

var errStopIteration = errors.New("iteration stopped")

// Generate appends prompt to the session and generates a continuation; the
// generated tokens stay in the session. prompt may be empty if the session
// already holds tokens.
func (s *Session) Generate(ctx context.Context, prompt []int32, opts GenerateOptions) (*Result, error) {
	res := &Result{CachedTokens: len(s.tokens), PromptTokens: len(prompt)}
	defer func() { res.LayerBudgets = s.LayerBudgets() }()
	if len(prompt) == 0 && len(s.tokens) == 0 {
		return res, errors.New("empty prompt")
	}
	for _, st := range opts.Stop {
		if st == "" {
			return res, errors.New("empty stop string")
		}
	}
	var gr *grammar
	if opts.Grammar != "" {
		// Built before the prefill, so that a bad grammar costs nothing.
		var err error
		if gr, err = newGrammar(s.m.tok, opts.Grammar); err != nil {
			return res, err
		}
		defer gr.free()
	}
	start := time.Now()
	var logits []float32
	if len(prompt) > 0 {
		rows, err := s.Eval(ctx, prompt, false, opts.OnPrefill)
		res.PrefillDuration = time.Since(start)
		if err != nil {
			if ctx.Err() != nil {
				res.StopReason = StopCancelled
			}
			return res, err
		}
		logits = rows[len(rows)-1]
	} else {
		// Re-evaluate the last token to get its logits.
		last := s.tokens[len(s.tokens)-1]
		if err := s.Truncate(len(s.tokens) - 1); err != nil {
			return res, err
		}
		rows, err := s.Eval(ctx, []int32{last}, false, nil)
		if err != nil {
			return res, err
		}
		logits = rows[0]
	}

	sampler := newTokenSampler(opts.Sampling, s.tokens)
	sampler.g = gr
	out := &textOut{stop: opts.Stop}
	decodeStart := time.Now()
	defer func() { res.DecodeDuration = time.Since(decodeStart) }()
	var sb strings.Builder
	for {
		if err := ctx.Err(); err != nil {
			res.StopReason = StopCancelled
			res.Text = sb.String()
			return res, err
		}
		id, err := sampler.next(logits)
		if err != nil {
			return res, err
		}
		if s.m.tok.IsEOG(id) {
			res.StopReason = StopEOG
			break
		}
		res.Tokens = append(res.Tokens, id)
		res.GeneratedTokens++
		text, hit := out.add(s.m.tok.Piece(id))
		sb.WriteString(text)
		if opts.OnToken != nil {
			if err := opts.OnToken(Token{ID: id, Text: text}); err != nil {
				res.Text = sb.String()
				return res, err
			}
		}
		if hit {
			res.StopReason = StopString
			res.Text = sb.String()
			return res, nil
		}
		if opts.MaxTokens > 0 && res.GeneratedTokens >= opts.MaxTokens {
			res.StopReason = StopLength
			break
		}
		if len(s.tokens) >= s.capacity {
			res.StopReason = StopContext
			break
		}
		rows, err := s.Eval(ctx, []int32{id}, false, nil)
		if err != nil {
			if ctx.Err() != nil {
				res.StopReason = StopCancelled
				res.Text = sb.String()
				return res, err
			}
			return res, fmt.Errorf("decode: %w", err)
		}
		logits = rows[0]
		sampler.accept(id)
	}
	if rest := out.flush(); rest != "" {
		sb.WriteString(rest)
		if opts.OnToken != nil {
			if err := opts.OnToken(Token{ID: -1, Text: rest}); err != nil {
				res.Text = sb.String()
				return res, err
			}
		}
	}
	res.Text = sb.String()
	return res, nil
}

// tokenSampler applies the repeat penalty, then ollama's sampler.
type tokenSampler struct {
	cfg     Sampling
	s       sample.Sampler
	history []int32
	g       *grammar // nil: unconstrained
}

func newTokenSampler(cfg Sampling, history []int32) *tokenSampler {
	if cfg.RepeatLastN <= 0 {
		cfg.RepeatLastN = 64
	}
	topP := cfg.TopP
	if topP <= 0 {
		// Sampling documents 0 as "disabled"; ollama's sampler reads it as
		// "keep only the most likely token", which made every sampled call
		// without a TopP greedy.
		topP = 1
	}
	t := &tokenSampler{cfg: cfg, s: sample.NewSampler(cfg.Temperature, cfg.TopK, topP, cfg.MinP, cfg.Seed, nil)}
	if cfg.RepeatPenalty > 0 && cfg.RepeatPenalty != 1 {
		t.history = append(t.history, history[max(0, len(history)-cfg.RepeatLastN):]...)
	}
	return t
}

func (t *tokenSampler) next(logits []float32) (int32, error) {
	if p := t.cfg.RepeatPenalty; p > 0 && p != 1 {
		// llama.cpp's rule: shrink positive logits, push negative ones further down.
		for _, id := range t.history {
			if l := logits[id]; l > 0 {
				logits[id] = l / p
			} else {
				logits[id] = l * p
			}
		}
	}
	if t.g == nil {
		return t.s.Sample(logits)
	}
	// As ollama's sampler does with a grammar: sample freely and keep the
	// token if the grammar allows it, else mask the rejected tokens and
	// sample again. Both paths give each allowed token its probability
	// renormalised over the allowed ones, and the cheap one (one token
	// checked instead of the vocabulary) is the common case.
	id, err := t.s.Sample(logits)
	if err != nil {
		return -1, err
	}
	if t.g.allowed(id) {
		t.g.accept(id)
		return id, nil
	}
	if !t.g.mask(logits) {
		return -1, errors.New("the grammar allows no token of the vocabulary here")
	}
	if id, err = t.s.Sample(logits); err != nil {
		return -1, err
	}
	if math.IsInf(float64(logits[id]), -1) {
		// Unreachable while the sampler keeps the best finite token, but
		// accepting a rejected token would abort the process in llama.cpp.
		return -1, fmt.Errorf("the sampler chose token %d, which the grammar rejects", id)
	}
	t.g.accept(id)
	return id, nil
}

func (t *tokenSampler) accept(id int32) {
	if t.cfg.RepeatPenalty > 0 && t.cfg.RepeatPenalty != 1 {
		t.history = append(t.history, id)
		if len(t.history) > t.cfg.RepeatLastN {
			t.history = t.history[1:]
		}
	}
}

// textOut releases generated text, holding back what might start a stop
// string and the bytes of incomplete UTF-8 characters.
type textOut struct {
	stop    []string
	dec     streamDecoder
	pending string
}

// add takes a token's piece and returns the text that is safe to release,
// and whether a stop string was found (the text then ends before it).
func (o *textOut) add(piece string) (string, bool) {
	o.pending += o.dec.add(piece)
	first := -1
	for _, st := range o.stop {
		if i := strings.Index(o.pending, st); i >= 0 && (first < 0 || i < first) {
			first = i
		}
	}
	if first >= 0 {
		out := o.pending[:first]
		o.pending = ""
		return out, true
	}
	hold := 0
	for _, st := range o.stop {
		for k := min(len(st)-1, len(o.pending)); k > hold; k-- {
			if strings.HasSuffix(o.pending, st[:k]) {
				hold = k
				break
			}
		}
	}
	out := o.pending[:len(o.pending)-hold]
	o.pending = o.pending[len(o.pending)-hold:]
	return out, false
}

func (o *textOut) flush() string {
	out := o.pending + o.dec.flush()
	o.pending = ""
	return out
}
