// Package haystack builds needle-in-a-haystack cases for the foundry's recall
// model: a haystack of filler words with needles "K V1 V2 V3" at chosen
// depths, and for each needle the question "q1 q2 q3 K" whose answer is
// "V1 V2 V3". The vocabulary roles are read from the model's GGUF metadata.
package haystack

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"

	"github.com/kvrecall/kvrecall/gguf"
)

// Vocab holds the recall model's token roles.
type Vocab struct {
	Keys, Values, Questions, Filler []int32
	AnswerLength                    int
	BOS                             int32
}

// LoadVocab reads the roles from a recall model's header.
func LoadVocab(f *gguf.File) (*Vocab, error) {
	a := f.Architecture()
	ids := func(key string) ([]int32, error) {
		v, ok := f.Get(a + "." + key)
		if !ok {
			return nil, fmt.Errorf("%s: metadata %s.%s is missing: not a kvrecall recall model (build one with `mkmodel recall`)", f.Path, a, key)
		}
		s, ok := v.([]int32)
		if !ok || len(s) == 0 {
			return nil, fmt.Errorf("%s: metadata %s.%s is not a list of token ids", f.Path, a, key)
		}
		return s, nil
	}
	v := &Vocab{BOS: 1}
	var err error
	if v.Keys, err = ids("kvrecall.recall.keys"); err != nil {
		return nil, err
	}
	if v.Values, err = ids("kvrecall.recall.values"); err != nil {
		return nil, err
	}
	if v.Questions, err = ids("kvrecall.recall.questions"); err != nil {
		return nil, err
	}
	if v.Filler, err = ids("kvrecall.recall.filler"); err != nil {
		return nil, err
	}
	n, ok := f.Uint(a + ".kvrecall.recall.answer_length")
	if !ok || n == 0 || n > 16 {
		return nil, fmt.Errorf("%s: metadata %s.kvrecall.recall.answer_length is missing or invalid", f.Path, a)
	}
	v.AnswerLength = int(n)
	if id, ok := f.Uint("tokenizer.ggml.bos_token_id"); ok {
		v.BOS = int32(id)
	}
	if len(v.Questions) < 3 || len(v.Values) < v.AnswerLength {
		return nil, fmt.Errorf("%s: recall vocabulary is too small", f.Path)
	}
	return v, nil
}

// Needle is one hidden fact.
type Needle struct {
	Key    int32
	Values []int32
	Depth  float64 // requested depth in [0, 1]
	Pos    int     // index of Key in Case.Tokens
}

// Case is a haystack with its needles. Tokens starts with BOS and does not
// include a question.
type Case struct {
	Tokens  []int32
	Needles []Needle
}

// NewCase builds a haystack of exactly length tokens (BOS included) with one
// needle per depth (each in [0, 1]; 0 puts a needle right after BOS, 1 at
// the very end). Keys and values are distinct across needles. seed fixes
// every choice.
func (v *Vocab) NewCase(length int, depths []float64, seed uint64) (*Case, error) {
	nlen := 1 + v.AnswerLength
	if len(depths) == 0 {
		return nil, fmt.Errorf("no needles")
	}
	if len(depths) > len(v.Keys) || len(depths)*v.AnswerLength > len(v.Values) {
		return nil, fmt.Errorf("%d needles are more than the vocabulary has keys and values for", len(depths))
	}
	if length < 1+len(depths)*nlen {
		return nil, fmt.Errorf("length %d cannot hold %d needles", length, len(depths))
	}
	for _, d := range depths {
		if d < 0 || d > 1 {
			return nil, fmt.Errorf("depth %v is outside [0, 1]", d)
		}
	}
	r := rand.New(rand.NewPCG(seed, uint64(length)))
	keys := pick(r, v.Keys, len(depths))
	vals := pick(r, v.Values, len(depths)*v.AnswerLength)
	fill := length - 1 - len(depths)*nlen
	// Needles go in depth order; each sits after round(depth*fill) filler words.
	order := make([]int, len(depths))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		switch {
		case depths[a] < depths[b]:
			return -1
		case depths[a] > depths[b]:
			return 1
		}
		return 0
	})
	c := &Case{Tokens: make([]int32, 0, length), Needles: make([]Needle, len(depths))}
	c.Tokens = append(c.Tokens, v.BOS)
	placed := 0
	for _, i := range order {
		at := int(depths[i]*float64(fill) + 0.5)
		for ; placed < at; placed++ {
			c.Tokens = append(c.Tokens, v.Filler[r.IntN(len(v.Filler))])
		}
		n := Needle{Key: keys[i], Values: vals[i*v.AnswerLength : (i+1)*v.AnswerLength], Depth: depths[i], Pos: len(c.Tokens)}
		c.Tokens = append(c.Tokens, n.Key)
		c.Tokens = append(c.Tokens, n.Values...)
		c.Needles[i] = n
	}
	for ; placed < fill; placed++ {
		c.Tokens = append(c.Tokens, v.Filler[r.IntN(len(v.Filler))])
	}
	return c, nil
}

// pick draws k distinct elements.
func pick(r *rand.Rand, from []int32, k int) []int32 {
	p := r.Perm(len(from))[:k]
	out := make([]int32, k)
	for i, j := range p {
		out[i] = from[j]
	}
	return out
}

// Question returns the tokens that ask for needle n: three question words
// and the key.
func (v *Vocab) Question(n Needle) []int32 {
	return []int32{v.Questions[0], v.Questions[1], v.Questions[2], n.Key}
}

// Cluster returns k depths spaced by gap around center, clamped to [0, 1]:
// several needles near one depth.
func Cluster(center float64, k int, gap float64) []float64 {
	out := make([]float64, k)
	for i := range out {
		d := center + (float64(i)-float64(k-1)/2)*gap
		out[i] = min(1, max(0, d))
	}
	return out
}

// Text joins token pieces into words (the recall vocabulary is word-level:
// every piece starts with SentencePiece's "▁").
func Text(pieces []string) string {
	return strings.TrimSpace(strings.ReplaceAll(strings.Join(pieces, ""), "▁", " "))
}
