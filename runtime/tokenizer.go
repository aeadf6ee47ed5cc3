package runtime

import (
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/tokenizer"
)

// Tokenizer converts text to token ids and back with ollama's tokenizer
// package, adding what llama.cpp does around it so that both engines see the
// same ids for the same text (SentencePiece's space prefix, see Encode).
type Tokenizer struct {
	tok         tokenizer.Tokenizer
	vocab       *tokenizer.Vocabulary
	spm         bool
	spacePrefix bool
	eog         map[int32]bool
	maxPiece    int // bytes of the longest token text: no token covers more input

	// Every token's text for grammars, built on first use (grammarVocab).
	gvOnce   sync.Once
	gvIDs    []uint32
	gvPieces []string
}

func newTokenizer(c fs.Config) (*Tokenizer, error) {
	values := c.Strings("tokenizer.ggml.tokens")
	if len(values) == 0 {
		return nil, fmt.Errorf("metadata tokenizer.ggml.tokens is missing")
	}
	types := c.Ints("tokenizer.ggml.token_type")
	if len(types) == 0 {
		types = make([]int32, len(values))
		for i := range types {
			types[i] = tokenizer.TOKEN_TYPE_NORMAL
		}
	}
	scores := c.Floats("tokenizer.ggml.scores")
	if len(scores) == 0 {
		scores = make([]float32, len(values))
	}
	if len(types) != len(values) || len(scores) != len(values) {
		return nil, fmt.Errorf("tokenizer arrays disagree: %d tokens, %d types, %d scores", len(values), len(types), len(scores))
	}
	eos := []int32{int32(c.Uint("tokenizer.ggml.eos_token_id"))}
	eos = append(eos, c.Ints("tokenizer.ggml.eos_token_ids")...)
	if id, ok := c.Value("tokenizer.ggml.eot_token_id").(uint32); ok {
		eos = append(eos, int32(id))
	}
	v := &tokenizer.Vocabulary{
		Values: values,
		Scores: scores,
		Types:  types,
		Merges: c.Strings("tokenizer.ggml.merges"),
		AddBOS: c.Bool("tokenizer.ggml.add_bos_token", true),
		BOS:    []int32{int32(c.Uint("tokenizer.ggml.bos_token_id"))},
		AddEOS: c.Bool("tokenizer.ggml.add_eos_token", false),
		EOS:    eos,
	}
	t := &Tokenizer{vocab: v, eog: map[int32]bool{}}
	for _, s := range values {
		t.maxPiece = max(t.maxPiece, len(s))
	}
	for _, id := range eos {
		if id >= 0 && int(id) < len(values) {
			t.eog[id] = true
		}
	}
	switch m := c.String("tokenizer.ggml.model"); m {
	case "llama":
		t.spm = true
		t.spacePrefix = c.Bool("tokenizer.ggml.add_space_prefix", true)
		t.tok = tokenizer.NewSentencePiece(v)
	case "gpt2":
		v.AddBOS = c.Bool("tokenizer.ggml.add_bos_token", false)
		t.tok = tokenizer.NewBytePairEncoding(v, pretokenizer(c.String("tokenizer.ggml.pre"))...)
	default:
		return nil, fmt.Errorf("tokenizer model %q is not supported (llama, gpt2)", m)
	}
	return t, nil
}

// pretokenizer returns the split regexes of a BPE vocabulary, as llama.cpp
// chooses them from tokenizer.ggml.pre.
func pretokenizer(pre string) []string {
	switch pre {
	case "qwen2":
		return []string{`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`}
	case "default", "":
		return nil // the gpt2 default of ollama's BPE
	default: // llama-bpe and friends
		return []string{`(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`}
	}
}

// Encode converts text to ids, adding BOS when addSpecial is set and the model
// asks for it. For SentencePiece vocabularies it applies llama.cpp's rule that
// ollama's tokenizer leaves out: a space is put before the first piece of raw
// text and before any raw text that follows a special token.
func (t *Tokenizer) Encode(text string, addSpecial bool) ([]int32, error) {
	if !t.spm {
		return t.tok.Encode(text, addSpecial)
	}
	var ids []int32
	if addSpecial && t.vocab.AddBOS && len(t.vocab.BOS) > 0 {
		ids = append(ids, t.vocab.BOS[0])
	}
	prevSpecial := true
	for _, f := range t.splitSpecial(text) {
		if f.special >= 0 {
			ids = append(ids, f.special)
			prevSpecial = true
			continue
		}
		s := f.text
		if t.spacePrefix && prevSpecial {
			s = " " + s
		}
		part, err := t.tok.Encode(s, false)
		if err != nil {
			return nil, err
		}
		ids = append(ids, part...)
		prevSpecial = false
	}
	return ids, nil
}

// TooManyTokensError is returned by EncodeLimit when text needs more tokens
// than the limit. AtLeast is a lower bound of the count (exact when the text
// was tokenized whole).
type TooManyTokensError struct {
	Limit, AtLeast int
}

func (e *TooManyTokensError) Error() string {
	return fmt.Sprintf("the text needs at least %d tokens, more than the limit of %d", e.AtLeast, e.Limit)
}

// EncodeLimit is Encode for untrusted text that may be far too long: it
// returns a *TooManyTokensError once the count passes limit, and its work is
// bounded by the limit, not by the text. No token covers more input bytes
// than the longest token text (a SentencePiece "▁" or a byte token like
// "<0x0A>" is longer than what it stands for), so text longer than
// (limit+1) x that is over the limit without tokenizing it at all; shorter
// text costs at most that many bytes of tokenization.
func (t *Tokenizer) EncodeLimit(text string, addSpecial bool, limit int) ([]int32, error) {
	if limit < 0 {
		return nil, fmt.Errorf("token limit %d is negative", limit)
	}
	// +1 token for BOS and +1 byte for SentencePiece's space prefix.
	if per := t.MaxTokenBytes(); len(text) > (limit+1)*per+1 {
		return nil, &TooManyTokensError{Limit: limit, AtLeast: (len(text) - 1) / per}
	}
	ids, err := t.Encode(text, addSpecial)
	if err != nil {
		return nil, err
	}
	if len(ids) > limit {
		return nil, &TooManyTokensError{Limit: limit, AtLeast: len(ids)}
	}
	return ids, nil
}

// MaxTokenBytes is the most input bytes one token can stand for: text of n
// bytes needs at least n/MaxTokenBytes tokens.
func (t *Tokenizer) MaxTokenBytes() int { return max(t.maxPiece, 1) }

type fragment struct {
	text    string
	special int32 // token id, or -1 for raw text
}

// splitSpecial cuts text around control and user-defined tokens, longest first.
func (t *Tokenizer) splitSpecial(text string) []fragment {
	specials := t.vocab.SpecialVocabulary()
	var out []fragment
	for len(text) > 0 {
		at, id, n := -1, int32(-1), 0
		for _, s := range specials {
			if s == "" {
				continue
			}
			if i := strings.Index(text, s); i >= 0 && (at < 0 || i < at || (i == at && len(s) > n)) {
				at, id, n = i, t.vocab.Encode(s), len(s)
			}
		}
		if at < 0 {
			out = append(out, fragment{text: text, special: -1})
			break
		}
		if at > 0 {
			out = append(out, fragment{text: text[:at], special: -1})
		}
		out = append(out, fragment{special: id})
		text = text[at+n:]
	}
	return out
}

// Decode converts ids to text. Invalid ids are an error, not a panic.
func (t *Tokenizer) Decode(ids []int32) (string, error) {
	for _, id := range ids {
		if id < 0 || int(id) >= len(t.vocab.Values) {
			return "", fmt.Errorf("token %d is outside the vocabulary of %d", id, len(t.vocab.Values))
		}
	}
	return t.tok.Decode(ids)
}

// Piece returns the text of one token; byte tokens of a multi-byte character
// give partial UTF-8, which streamDecoder reassembles.
func (t *Tokenizer) Piece(id int32) string {
	s, err := t.Decode([]int32{id})
	if err != nil {
		return ""
	}
	return s
}

// IsEOG reports whether id ends generation.
func (t *Tokenizer) IsEOG(id int32) bool { return t.eog[id] }

// BOS returns the beginning-of-sequence id and whether the model adds it.
func (t *Tokenizer) BOS() (int32, bool) {
	if len(t.vocab.BOS) == 0 {
		return -1, false
	}
	return t.vocab.BOS[0], t.vocab.AddBOS
}

// Lookup returns the id of a token string, or -1.
func (t *Tokenizer) Lookup(s string) int32 { return t.vocab.Encode(s) }

// Size is the number of tokens in the vocabulary.
func (t *Tokenizer) Size() int { return len(t.vocab.Values) }

// streamDecoder turns a stream of pieces into valid UTF-8 text, holding back
// the bytes of a character that is not complete yet.
type streamDecoder struct{ pending []byte }

func (d *streamDecoder) add(piece string) string {
	d.pending = append(d.pending, piece...)
	n := len(d.pending)
	// Hold back an incomplete trailing character (at most 3 bytes).
	for back := 1; back <= 3 && back <= n; back++ {
		b := d.pending[n-back]
		if b < 0x80 {
			break // ASCII: complete
		}
		if b >= 0xC0 { // a lead byte: complete only if the rest is there
			need := 2
			if b >= 0xF0 {
				need = 4
			} else if b >= 0xE0 {
				need = 3
			}
			if back < need {
				n -= back
			}
			break
		}
	}
	out := string(d.pending[:n])
	d.pending = append(d.pending[:0], d.pending[n:]...)
	if !utf8.ValidString(out) {
		out = strings.ToValidUTF8(out, "\uFFFD")
	}
	return out
}

// flush returns whatever is left, with invalid bytes replaced.
func (d *streamDecoder) flush() string {
	out := strings.ToValidUTF8(string(d.pending), "\uFFFD")
	d.pending = d.pending[:0]
	return out
}
