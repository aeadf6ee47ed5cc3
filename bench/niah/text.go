package niah

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"unicode"
)

// Text mode is for pretrained models: an English haystack (a file the user
// gives, or generated sentences), a needle sentence placed at a sentence
// boundary, a question appended after the haystack, and string-match
// scoring of the answer.

// TextNeedle is the fact hidden in the haystack.
type TextNeedle struct {
	Needle   string // the sentence inserted, e.g. "The special magic number is 7342."
	Question string // asked after the haystack
	Answer   string // scored by case-insensitive substring match
}

// DefaultNeedle is RULER-like: a number no haystack contains.
var DefaultNeedle = TextNeedle{
	Needle:   "The special magic number for the blue lighthouse is 8172943.",
	Question: "What is the special magic number for the blue lighthouse?",
	Answer:   "8172943",
}

// Sentences splits text into sentences, keeping each one's terminator and
// the space after it, so that joining them gives the text back.
func Sentences(text string) []string {
	var out []string
	start := 0
	rs := []rune(text)
	for i := 0; i < len(rs); i++ {
		if rs[i] != '.' && rs[i] != '!' && rs[i] != '?' && rs[i] != '\n' {
			continue
		}
		j := i + 1
		for j < len(rs) && (rs[j] == '"' || rs[j] == '\'' || rs[j] == ')') {
			j++
		}
		if rs[i] != '\n' && j < len(rs) && !unicode.IsSpace(rs[j]) {
			continue // "3.14", "e.g."
		}
		for j < len(rs) && unicode.IsSpace(rs[j]) {
			j++
		}
		out = append(out, string(rs[start:j]))
		start = j
		i = j - 1
	}
	if start < len(rs) {
		out = append(out, string(rs[start:]))
	}
	return out
}

// Counter counts tokens of a piece of text (a tokenizer, in practice).
type Counter func(string) int

// Place builds a haystack of about length tokens from sentences (reused in
// order, wrapping around) and inserts the needle at depth (0..1) of it,
// moved back to the start of the sentence it would fall in, so that no
// sentence is cut. It returns the text and the needle's depth as placed.
func Place(sentences []string, needle string, length int, depth float64, count Counter) (string, float64, error) {
	if len(sentences) == 0 {
		return "", 0, fmt.Errorf("the haystack has no sentences")
	}
	budget := length - count(needle+" ")
	if budget <= 0 {
		return "", 0, fmt.Errorf("length %d cannot hold the needle", length)
	}
	var chosen []string
	var sizes []int
	total := 0
	for i := 0; ; i++ {
		s := sentences[i%len(sentences)]
		n := count(s)
		if total+n > budget {
			break
		}
		if n == 0 {
			if i > 10*len(sentences) {
				return "", 0, fmt.Errorf("the haystack sentences count as no tokens")
			}
			continue
		}
		chosen = append(chosen, s)
		sizes = append(sizes, n)
		total += n
	}
	if len(chosen) == 0 {
		return "", 0, fmt.Errorf("length %d is shorter than one haystack sentence", length)
	}
	target := depth * float64(total)
	at, seen := 0, 0
	for at < len(chosen) && float64(seen+sizes[at]) <= target {
		seen += sizes[at]
		at++
	}
	if depth >= 1 {
		at, seen = len(chosen), total
	}
	var b strings.Builder
	for i, s := range chosen {
		if i == at {
			b.WriteString(needle + " ")
		}
		b.WriteString(s)
	}
	if at == len(chosen) {
		if !strings.HasSuffix(b.String(), " ") && !strings.HasSuffix(b.String(), "\n") {
			b.WriteString(" ")
		}
		b.WriteString(needle)
	}
	return b.String(), float64(seen) / float64(total), nil
}

// StringMatch scores a response 100 if it contains the answer (case- and
// space-insensitive), else 0.
func StringMatch(response, answer string) float64 {
	norm := func(s string) string { return strings.Join(strings.Fields(strings.ToLower(s)), " ") }
	if answer != "" && strings.Contains(norm(response), norm(answer)) {
		return 100
	}
	return 0
}

// GeneratedHaystack returns plain English sentences (subject, verb, object,
// place) from fixed word lists: a haystack with sentence boundaries when the
// user gives no text. seed fixes the draw.
func GeneratedHaystack(sentences int, seed uint64) []string {
	r := rand.New(rand.NewPCG(seed, 0x4a1))
	subjects := []string{"The old farmer", "A quiet student", "The harbour master", "My neighbour", "The baker", "A travelling musician",
		"The young painter", "The librarian", "An engineer", "The gardener", "A tired pilot", "The shopkeeper"}
	verbs := []string{"carried", "repaired", "painted", "found", "sold", "described", "borrowed", "measured", "cleaned", "forgot"}
	objects := []string{"a wooden chair", "the red bicycle", "an old map", "a basket of apples", "the broken clock", "a letter",
		"the kitchen window", "a small boat", "the garden gate", "a green umbrella", "the winter coat", "a box of nails"}
	places := []string{"near the river", "before lunch", "in the market", "after the storm", "at the station", "behind the school",
		"on a quiet street", "during the festival", "by the old mill", "in the afternoon"}
	out := make([]string, sentences)
	for i := range out {
		out[i] = fmt.Sprintf("%s %s %s %s. ", subjects[r.IntN(len(subjects))], verbs[r.IntN(len(verbs))],
			objects[r.IntN(len(objects))], places[r.IntN(len(places))])
	}
	return out
}
