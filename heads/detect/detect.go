package detect

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"

	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/runtime"
)

// Options configure NIAH and Ablation. Zero values pick the defaults.
type Options struct {
	Lengths   []int     // haystack lengths in tokens (default 256, 1024, 4096)
	Depths    []float64 // needle depths in [0, 1] (default 0, 0.25, 0.5, 0.75, 1)
	Seeds     int       // prompts per length and depth (default 1)
	Seed      uint64    // first seed
	Threshold float64   // retrieval head cut (default heads.DefaultThreshold)
	// Progress, if set, is called after each prompt with the prompts done.
	Progress func(done, total int)
}

func (o *Options) fill() {
	if len(o.Lengths) == 0 {
		o.Lengths = []int{256, 1024, 4096}
	}
	if len(o.Depths) == 0 {
		o.Depths = []float64{0, 0.25, 0.5, 0.75, 1}
	}
	if o.Seeds <= 0 {
		o.Seeds = 1
	}
	if o.Threshold == 0 {
		o.Threshold = heads.DefaultThreshold
	}
}

// NIAH scores every query head of m as in the Retrieval Head paper. Each
// prompt is a haystack with one needle "K V1 .. Vn" and the question for it;
// the answer is decoded greedily. At each decoding step, a head whose
// top-1 attended position lies inside the needle and holds the token just
// generated gains 1/n (n = answer length, so a head that copies every answer
// token scores 1 on that prompt). Scores average over the prompts answered
// exactly; a head above the threshold is a retrieval head.
//
// The prompts need the roles of a recall model's vocabulary (its GGUF
// metadata, see haystack.LoadVocab); other models are profiled with DataFree.
func NIAH(ctx context.Context, m *runtime.Model, o Options) (*heads.Profile, error) {
	o.fill()
	v, err := haystack.LoadVocab(m.File())
	if err != nil {
		return nil, fmt.Errorf("heads: NIAH detection needs a recall model (or use the data-free score): %w", err)
	}
	for _, l := range o.Lengths {
		if l+len(v.Question(haystack.Needle{}))+v.AnswerLength > m.Options().ContextLength {
			return nil, fmt.Errorf("heads: length %d does not fit the context of %d tokens", l, m.Options().ContextLength)
		}
	}
	p := heads.NewProfile(m, heads.MethodNIAH, o.Threshold)
	p.InNeedle = heads.Grid(p.Layers, p.Heads)
	total := len(o.Lengths) * len(o.Depths) * o.Seeds
	for _, length := range o.Lengths {
		for _, depth := range o.Depths {
			for s := range o.Seeds {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				c, err := v.NewCase(length, []float64{depth}, o.Seed+uint64(s))
				if err != nil {
					return nil, err
				}
				score, in, ok, err := sample(ctx, m, v, c)
				if err != nil {
					return nil, err
				}
				p.Samples++
				if ok {
					p.Correct++
					for l := range p.Scores {
						for h := range p.Scores[l] {
							p.Scores[l][h] += score[l][h]
							p.InNeedle[l][h] += in[l][h]
						}
					}
				}
				if o.Progress != nil {
					o.Progress(p.Samples, total)
				}
			}
		}
	}
	if p.Correct == 0 {
		return nil, fmt.Errorf("heads: %s answered none of %d NIAH prompts, so no head can be scored", m.Path(), p.Samples)
	}
	for l := range p.Scores {
		for h := range p.Scores[l] {
			p.Scores[l][h] /= float64(p.Correct)
			p.InNeedle[l][h] /= float64(p.Correct)
		}
	}
	p.Classify()
	return p, nil
}

// sample runs one prompt and returns its per-head copy scores, the share of
// steps each head's top-1 was in the needle, and whether the answer was exact.
func sample(ctx context.Context, m *runtime.Model, v *haystack.Vocab, c *haystack.Case) (score, in [][]float64, ok bool, err error) {
	s, a, err := NewSession(m)
	if err != nil {
		return nil, nil, false, err
	}
	defer s.Close()
	n := c.Needles[0]
	prompt := append(slices.Clone(c.Tokens), v.Question(n)...)
	// Prefill without the argmax; only the decoding steps are scored.
	if _, err := s.Eval(ctx, prompt[:len(prompt)-1], false, nil); err != nil {
		return nil, nil, false, err
	}
	a.Record = true
	cfg := m.Config()
	score, in = heads.Grid(cfg.Layers, cfg.Heads), heads.Grid(cfg.Layers, cfg.Heads)
	lo, hi := int32(n.Pos), int32(n.Pos+1+len(n.Values)) // the needle's positions
	var answer []int32
	next := prompt[len(prompt)-1]
	for len(answer) < v.AnswerLength {
		pos := int32(s.Len()) // position of the query
		rows, err := s.Eval(ctx, []int32{next}, false, nil)
		if err != nil {
			return nil, nil, false, err
		}
		gen := argmax(rows[0])
		toks := s.Tokens()
		for l := range score {
			for h := range score[l] {
				at := a.Top(pos, l, h)
				if at >= lo && at < hi {
					in[l][h] += 1 / float64(v.AnswerLength)
					if toks[at] == gen {
						score[l][h] += 1 / float64(v.AnswerLength)
					}
				}
			}
		}
		answer = append(answer, gen)
		next = gen
	}
	return score, in, slices.Equal(answer, n.Values), nil
}

func argmax(x []float32) int32 {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return int32(best)
}

// DataFreeOptions configure DataFree. Zero values pick the defaults.
type DataFreeOptions struct {
	Period    int     // random tokens per repeat (default 256)
	Samples   int     // random sequences (default 4)
	Seed      uint64  // draws the tokens
	Threshold float64 // retrieval head cut (default heads.DefaultThreshold)
	// Tokens to draw from (default: every token that is not a control or
	// end-of-generation token and decodes to a non-empty piece).
	Tokens []int32
}

// DataFree scores heads without a NIAH set, in the manner of RazorAttention:
// each sample is BOS followed by the same Period random distinct tokens
// twice. For every query in the second copy, at position i with the same
// token at j = i - Period, an echo head's top-1 position is j and an
// induction head's is j+1. Echo and Induction are the shares of those
// queries, and a head's score is the larger of the two.
func DataFree(ctx context.Context, m *runtime.Model, o DataFreeOptions) (*heads.Profile, error) {
	if o.Period <= 0 {
		o.Period = 256
	}
	if o.Samples <= 0 {
		o.Samples = 4
	}
	if o.Threshold == 0 {
		o.Threshold = heads.DefaultThreshold
	}
	tok := m.Tokenizer()
	bos, hasBOS := tok.BOS()
	if len(o.Tokens) == 0 {
		for id := range int32(tok.Size()) {
			if (hasBOS && id == bos) || tok.IsEOG(id) || tok.Piece(id) == "" {
				continue
			}
			o.Tokens = append(o.Tokens, id)
		}
	}
	if len(o.Tokens) < o.Period {
		return nil, fmt.Errorf("heads: %s has %d usable tokens, fewer than the period of %d", m.Path(), len(o.Tokens), o.Period)
	}
	if n := 1 + 2*o.Period; n > m.Options().ContextLength {
		return nil, fmt.Errorf("heads: %d tokens do not fit the context of %d", n, m.Options().ContextLength)
	}
	p := heads.NewProfile(m, heads.MethodDataFree, o.Threshold)
	p.Echo, p.Induction = heads.Grid(p.Layers, p.Heads), heads.Grid(p.Layers, p.Heads)
	r := rand.New(rand.NewPCG(o.Seed, 0xda7af4ee))
	queries := 0
	for range o.Samples {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		x := make([]int32, o.Period)
		for i, j := range r.Perm(len(o.Tokens))[:o.Period] {
			x[i] = o.Tokens[j]
		}
		var seq []int32
		if hasBOS {
			seq = append(seq, bos)
		}
		start := len(seq)
		seq = append(append(seq, x...), x...)
		s, a, err := NewSession(m)
		if err != nil {
			return nil, err
		}
		a.Record = true
		_, err = s.Eval(ctx, seq, false, nil)
		s.Close()
		if err != nil {
			return nil, err
		}
		for i := start + o.Period; i < len(seq); i++ {
			j := int32(i - o.Period)
			queries++
			for l := range p.Layers {
				for h := range p.Heads {
					switch a.Top(int32(i), l, h) {
					case j:
						p.Echo[l][h]++
					case j + 1:
						p.Induction[l][h]++
					}
				}
			}
		}
	}
	for l := range p.Layers {
		for h := range p.Heads {
			p.Echo[l][h] /= float64(queries)
			p.Induction[l][h] /= float64(queries)
			p.Scores[l][h] = max(p.Echo[l][h], p.Induction[l][h])
		}
	}
	p.Classify()
	return p, nil
}

// Ablation is the Retrieval Head paper's causal check: it answers NIAH
// prompts (o.Lengths x o.Depths x o.Seeds, as NIAH makes them) with the
// KV heads marked in streaming ([layer][kvHead]) restricted to the window w
// from the question on (the haystack itself is prefilled densely), and
// returns how many were answered exactly. Marking the detected retrieval
// heads streaming should break NIAH; marking every other head should not.
func Ablation(ctx context.Context, m *runtime.Model, streaming [][]bool, w Window, o Options) (correct, total int, err error) {
	o.fill()
	cfg := m.Config()
	if len(streaming) != cfg.Layers {
		return 0, 0, fmt.Errorf("heads: ablation mask has %d layers, %s has %d", len(streaming), m.Path(), cfg.Layers)
	}
	for l, row := range streaming {
		if len(row) != cfg.KVHeads {
			return 0, 0, fmt.Errorf("heads: ablation mask layer %d has %d KV heads, %s has %d", l, len(row), m.Path(), cfg.KVHeads)
		}
	}
	v, err := haystack.LoadVocab(m.File())
	if err != nil {
		return 0, 0, fmt.Errorf("heads: NIAH ablation needs a recall model: %w", err)
	}
	for _, length := range o.Lengths {
		for _, depth := range o.Depths {
			for s := range o.Seeds {
				c, err := v.NewCase(length, []float64{depth}, o.Seed+uint64(s))
				if err != nil {
					return correct, total, err
				}
				ok, err := ablated(ctx, m, v, c, streaming, w)
				if err != nil {
					return correct, total, err
				}
				total++
				if ok {
					correct++
				}
			}
		}
	}
	return correct, total, nil
}

func ablated(ctx context.Context, m *runtime.Model, v *haystack.Vocab, c *haystack.Case, streaming [][]bool, w Window) (bool, error) {
	s, a, err := NewSession(m)
	if err != nil {
		return false, err
	}
	defer s.Close()
	if _, err := s.Eval(ctx, c.Tokens, false, nil); err != nil {
		return false, err
	}
	a.Streaming, a.Window = streaming, w
	n := c.Needles[0]
	rows, err := s.Eval(ctx, v.Question(n), false, nil)
	if err != nil {
		return false, err
	}
	var answer []int32
	for {
		answer = append(answer, argmax(rows[len(rows)-1]))
		if len(answer) == v.AnswerLength {
			break
		}
		if rows, err = s.Eval(ctx, answer[len(answer)-1:], false, nil); err != nil {
			return false, err
		}
	}
	return slices.Equal(answer, n.Values), nil
}
