package foundry

import (
	"fmt"
	"math/rand/v2"
	"strings"
)

// Token types of GGUF vocabularies (llama.cpp's llama_token_type).
const (
	typeNormal  int32 = 1
	typeUnknown int32 = 2
	typeControl int32 = 3
	typeByte    int32 = 6
)

const spmSpace = "▁" // SentencePiece's visible space

// vocab is a SentencePiece-style ("llama") vocabulary.
type vocab struct {
	tokens []string
	scores []float32
	types  []int32
	index  map[string]int32
}

func (v *vocab) add(tok string, score float32, typ int32) int32 {
	if id, ok := v.index[tok]; ok {
		return id
	}
	id := int32(len(v.tokens))
	v.tokens = append(v.tokens, tok)
	v.scores = append(v.scores, score)
	v.types = append(v.types, typ)
	v.index[tok] = id
	return id
}

// newSPMBase starts a vocabulary with <unk>, <s>, </s> (ids 0, 1, 2) and the
// 256 byte tokens llama.cpp expects for byte fallback (it warns without <0x0A>).
func newSPMBase() *vocab {
	v := &vocab{index: map[string]int32{}}
	v.add("<unk>", 0, typeUnknown)
	v.add("<s>", 0, typeControl)
	v.add("</s>", 0, typeControl)
	for b := 0; b < 256; b++ {
		v.add(fmt.Sprintf("<0x%02X>", b), 0, typeByte)
	}
	return v
}

// spmVocab returns a SentencePiece vocabulary of exactly n tokens for random
// models: specials, bytes, then letters, "▁"-words and letter n-grams, with
// scores that make longer pieces merge later.
func spmVocab(n int) (*vocab, error) {
	v := newSPMBase()
	if n < len(v.tokens)+1 {
		return nil, fmt.Errorf("vocabulary of %d is too small (at least %d)", n, len(v.tokens)+1)
	}
	letters := "etaoinshrdlcumwfgypbvkjxqz"
	grams := []string{spmSpace}
	for _, c := range letters {
		grams = append(grams, string(c))
	}
	frontier := grams[1:]
	for len(v.tokens) < n {
		for _, g := range grams {
			if len(v.tokens) >= n {
				break
			}
			v.add(g, -float32(len(v.tokens)), typeNormal)
			if !strings.HasPrefix(g, spmSpace) && len(v.tokens) < n {
				v.add(spmSpace+g, -float32(len(v.tokens)), typeNormal)
			}
		}
		var next []string
		for _, g := range frontier {
			for _, c := range letters {
				next = append(next, g+string(c))
			}
		}
		grams, frontier = next, next
	}
	return v, nil
}

// bpeVocab returns a byte-level BPE ("gpt2") vocabulary of n tokens with the
// merges that build its multi-byte tokens, and the id of <|endoftext|>.
func bpeVocab(n int) (tokens []string, types []int32, merges []string, eos int32, err error) {
	if n < 256+2 {
		return nil, nil, nil, 0, fmt.Errorf("vocabulary of %d is too small (at least 258)", n)
	}
	b2u := bytesToUnicode()
	index := map[string]bool{}
	for b := 0; b < 256; b++ {
		tokens = append(tokens, string(b2u[byte(b)]))
		types = append(types, typeNormal)
		index[tokens[b]] = true
	}
	space := string(b2u[' '])
	letters := "etaoinshrdlcumwfgypbvkjxqz"
	addMerge := func(a, b string) {
		if len(tokens) >= n-2 || index[a+b] || !index[a] || !index[b] {
			return
		}
		merges = append(merges, a+" "+b)
		tokens = append(tokens, a+b)
		types = append(types, typeNormal)
		index[a+b] = true
	}
	for _, c := range letters {
		addMerge(space, string(c))
	}
	for _, a := range letters {
		for _, c := range letters {
			addMerge(string(a), string(c))
		}
	}
	for _, a := range letters {
		for _, c := range letters {
			addMerge(space+string(a), string(c))
		}
	}
	eos = int32(len(tokens))
	tokens = append(tokens, "<|endoftext|>", "<|im_end|>")
	types = append(types, typeControl, typeControl)
	for len(tokens) < n { // pad with unused control tokens
		tokens = append(tokens, fmt.Sprintf("<|extra_%d|>", len(tokens)))
		types = append(types, typeControl)
	}
	return tokens, types, merges, eos, nil
}

// bytesToUnicode is GPT-2's reversible map from bytes to printable runes.
func bytesToUnicode() map[byte]rune {
	m := map[byte]rune{}
	var bs []int
	for b := '!'; b <= '~'; b++ {
		bs = append(bs, int(b))
	}
	for b := 0xA1; b <= 0xAC; b++ {
		bs = append(bs, b)
	}
	for b := 0xAE; b <= 0xFF; b++ {
		bs = append(bs, b)
	}
	in := map[int]bool{}
	for _, b := range bs {
		in[b] = true
		m[byte(b)] = rune(b)
	}
	n := 0
	for b := 0; b < 256; b++ {
		if !in[b] {
			m[byte(b)] = rune(256 + n)
			n++
		}
	}
	return m
}

// RecallVocab is the word-level vocabulary of the recall model. Words are two
// consonant-vowel syllables ("kato", "mire"); each tokenizes to one token in
// both ollama's and llama.cpp's SentencePiece, because the vocabulary holds
// the whole merge chain: syllables ("ka"), "▁"+syllable ("▁ka") and "▁"+word
// ("▁kato"), and nothing else that could merge across them.
type RecallVocab struct {
	*vocab
	Keys      []int32 // needle keys
	Values    []int32 // needle values
	Questions []int32 // question words
	Filler    []int32 // haystack words
	Words     []int32 // every token that carries a code (all "▁" pieces)
}

// Syllable alphabet of the recall vocabulary.
const (
	recallConsonants = "bdfgklmnprstvz"
	recallVowels     = "aeiou"
)

// NewRecallVocab builds the vocabulary with the given role sizes; the role
// assignment is a seeded shuffle of all two-syllable words.
func NewRecallVocab(seed uint64, keys, values, questions, filler int) (*RecallVocab, error) {
	v := newSPMBase()
	for _, c := range recallConsonants + recallVowels {
		v.add(string(c), -1e6, typeNormal)
	}
	var syll []string
	for _, c := range recallConsonants {
		for _, w := range recallVowels {
			syll = append(syll, string(c)+string(w))
		}
	}
	rv := &RecallVocab{vocab: v}
	for _, s := range syll {
		v.add(s, -1e5, typeNormal)
	}
	for _, s := range syll {
		rv.Words = append(rv.Words, v.add(spmSpace+s, -1e4, typeNormal))
	}
	var words []string
	for _, a := range syll {
		for _, b := range syll {
			words = append(words, a+b)
		}
	}
	need := keys + values + questions + filler
	if need > len(words) {
		return nil, fmt.Errorf("recall vocabulary: %d words requested, %d available", need, len(words))
	}
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	r.Shuffle(len(words), func(i, j int) { words[i], words[j] = words[j], words[i] })
	words = words[:need]
	ids := make([]int32, need)
	for i, w := range words {
		ids[i] = v.add(spmSpace+w, -float32(len(v.tokens)), typeNormal)
	}
	rv.Words = append(rv.Words, ids...)
	rv.Keys, ids = ids[:keys], ids[keys:]
	rv.Values, ids = ids[:values], ids[values:]
	rv.Questions, rv.Filler = ids[:questions], ids[questions:]
	return rv, nil
}
