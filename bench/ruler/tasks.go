package ruler

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"

	"github.com/kvrecall/kvrecall/haystack"
)

// Tasks lists the task names in RULER's order.
var Tasks = []string{"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"}

// Sample is one generated test: a context ingested as a document, one or
// more questions asked after it (their answers are concatenated), and the
// references the answer is scored against.
type Sample struct {
	Task      string
	Context   []int32   // document tokens, BOS included
	Questions [][]int32 // asked in turn after the document
	Refs      []string
	MaxTokens int // per question
	Metric    Metric
}

// Encoder tokenizes text (addSpecial adds BOS).
type Encoder func(text string, addSpecial bool) ([]int32, error)

// noise is RULER's "noise" haystack for the needle tasks.
const noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

var (
	adjectives = []string{"hollow", "bright", "silent", "amber", "frozen", "gentle", "rapid", "crimson", "hidden", "lucky", "narrow", "olive"}
	nouns      = []string{"elevator", "harbor", "lantern", "meadow", "orchard", "pillow", "quarry", "saddle", "tunnel", "violin", "walnut", "zipper"}
)

// TextSample builds a sample in English with RULER's templates, about length
// tokens long.
func TextSample(task string, length int, seed uint64, enc Encoder) (*Sample, error) {
	r := rand.New(rand.NewPCG(seed, uint64(length)))
	key := func() string { return adjectives[r.IntN(len(adjectives))] + "-" + nouns[r.IntN(len(nouns))] }
	num := func() string { return fmt.Sprint(1000000 + r.IntN(9000000)) }
	needle := func(k, v string) string { return fmt.Sprintf("One of the special magic numbers for %s is: %s. ", k, v) }
	s := &Sample{Task: task, Metric: MatchAll, MaxTokens: 32}
	var pre, post string
	var needles []string
	switch task {
	case "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery":
		pre = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
		keys := []string{key()}
		for len(keys) < 4 {
			if k := key(); !slices.Contains(keys, k) {
				keys = append(keys, k)
			}
		}
		switch task {
		case "niah_single":
			v := num()
			needles, s.Refs = []string{needle(keys[0], v)}, []string{v}
		case "niah_multikey": // the first key is asked, the others distract
			for i, k := range keys {
				v := num()
				needles = append(needles, needle(k, v))
				if i == 0 {
					s.Refs = []string{v}
				}
			}
		case "niah_multivalue":
			for i := 0; i < 4; i++ {
				v := num()
				needles, s.Refs = append(needles, needle(keys[0], v)), append(s.Refs, v)
			}
		case "niah_multiquery":
			for _, k := range keys {
				v := num()
				needles, s.Refs = append(needles, needle(k, v)), append(s.Refs, v)
			}
		}
		switch task {
		case "niah_multivalue":
			post = fmt.Sprintf("\nWhat are all the special magic numbers for %s mentioned in the provided text? The special magic numbers for %s mentioned in the provided text are", keys[0], keys[0])
		case "niah_multiquery":
			q := strings.Join(keys[:3], ", ") + ", and " + keys[3]
			post = fmt.Sprintf("\nWhat are all the special magic numbers for %s mentioned in the provided text? The special magic numbers for %s mentioned in the provided text are", q, q)
		default:
			post = fmt.Sprintf("\nWhat is the special magic number for %s mentioned in the provided text? The special magic number for %s mentioned in the provided text is", keys[0], keys[0])
		}
		return s.fill(enc, pre, post, length, needles, func(int) string { return noise }, r)
	case "vt":
		pre = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
		vars := []string{}
		for len(vars) < 5 {
			v := randomCode(r, 5)
			if !slices.Contains(vars, v) {
				vars = append(vars, v)
			}
		}
		val := num()
		needles = append(needles, fmt.Sprintf("VAR %s = %s. ", vars[0], val))
		for i := 1; i < len(vars); i++ {
			needles = append(needles, fmt.Sprintf("VAR %s = VAR %s. ", vars[i], vars[i-1]))
		}
		s.Refs = vars
		post = fmt.Sprintf("\nQuestion: Find all variables that are assigned the value %s in the text above. Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value %s, they are:", val, val)
		return s.fill(enc, pre, post, length, needles, func(int) string { return noise }, r)
	case "cwe":
		pre = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
		post = "\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that appear most often in the list are:"
		common, rare := distinctCodes(r, 10, 6), distinctCodes(r, 4000, 7)
		s.Refs = common
		s.MaxTokens = 64
		// Rounds of the ten common words (shuffled) and ten rare words that
		// appear once: whatever the length, common words are the most frequent.
		var queue []string
		i, nextRare := 0, 0
		next := func(int) string {
			if len(queue) == 0 {
				queue = append(queue, common...)
				r.Shuffle(len(queue), func(a, b int) { queue[a], queue[b] = queue[b], queue[a] })
				for k := 0; k < 10; k++ {
					queue = append(queue, rare[nextRare%len(rare)])
					nextRare++
				}
			}
			w := queue[0]
			queue = queue[1:]
			i++
			return fmt.Sprintf("%d. %s ", i, w)
		}
		return s.fill(enc, pre, post, length, nil, next, r)
	case "fwe":
		pre = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. "
		post = "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text? Answer: According to the coded text above, the three most frequently appeared words are:"
		vocab := distinctCodes(r, 200, 5)
		// Zipf over the vocabulary: word i has weight 1/(i+1)^1.2.
		weights := make([]float64, len(vocab))
		total := 0.0
		for i := range weights {
			weights[i] = 1 / math.Pow(float64(i+1), 1.2)
			total += weights[i]
		}
		s.Refs = vocab[:3]
		next := func(int) string {
			x := r.Float64() * total
			for i, w := range weights {
				if x -= w; x <= 0 {
					return vocab[i] + " .... "
				}
			}
			return vocab[len(vocab)-1] + " .... "
		}
		return s.fill(enc, pre, post, length, nil, next, r)
	}
	return nil, fmt.Errorf("unknown RULER task %q (%s)", task, strings.Join(Tasks, ", "))
}

// fill grows the context with filler pieces until it is about length tokens,
// inserts the needles at random positions between pieces, and sets the
// question.
func (s *Sample) fill(enc Encoder, pre, post string, length int, needles []string, piece func(int) string, r *rand.Rand) (*Sample, error) {
	q, err := enc(post, false)
	if err != nil {
		return nil, err
	}
	fixed, err := enc(pre+strings.Join(needles, ""), true)
	if err != nil {
		return nil, err
	}
	room := length - len(fixed) - len(q) - s.MaxTokens
	if room < 16 {
		return nil, fmt.Errorf("%s: length %d is too short for the task", s.Task, length)
	}
	// Measure one piece to estimate how many fit, then check exactly.
	var pieces []string
	used := 0
	for i := 0; used < room; i++ {
		p := piece(i)
		ids, err := enc(p, false)
		if err != nil {
			return nil, err
		}
		if used+len(ids) > room {
			break
		}
		pieces = append(pieces, p)
		used += len(ids)
	}
	for _, nd := range needles {
		at := r.IntN(len(pieces) + 1)
		pieces = slices.Insert(pieces, at, nd)
	}
	ctx, err := enc(pre+strings.Join(pieces, ""), true)
	if err != nil {
		return nil, err
	}
	s.Context, s.Questions = ctx, [][]int32{q}
	return s, nil
}

func randomCode(r *rand.Rand, n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('A' + r.IntN(26))
	}
	return string(b)
}

func distinctCodes(r *rand.Rand, n, size int) []string {
	seen := map[string]bool{}
	var out []string
	for len(out) < n {
		c := strings.ToLower(randomCode(r, size))
		if !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	return out
}

// RecallSample builds the task in the recall model's word vocabulary. The
// needle tasks map directly onto its one mechanism (a key word recalls the
// three words after it; several queries are asked one after another). The
// others (variable tracking, common and frequent words) are posed in its
// words too, but need counting or several hops, which the recall model
// cannot do: they show what a method keeps, not what this model knows.
func RecallSample(task string, length int, seed uint64, v *haystack.Vocab, words func([]int32) string) (*Sample, error) {
	r := rand.New(rand.NewPCG(seed, uint64(length)+7))
	s := &Sample{Task: task, Metric: MatchAll, MaxTokens: v.AnswerLength}
	triple := func(n haystack.Needle) string { return words(n.Values) }
	switch task {
	case "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery":
		k := 1
		if task != "niah_single" {
			k = 4
		}
		depths := make([]float64, k)
		for i := range depths {
			depths[i] = r.Float64()
		}
		c, err := v.NewCase(length-16, depths, seed+uint64(length))
		if err != nil {
			return nil, err
		}
		s.Context = c.Tokens
		switch task {
		case "niah_single", "niah_multikey":
			s.Questions = [][]int32{v.Question(c.Needles[0])}
			s.Refs = []string{triple(c.Needles[0])}
		case "niah_multiquery":
			for _, n := range c.Needles {
				s.Questions = append(s.Questions, v.Question(n))
				s.Refs = append(s.Refs, triple(n))
			}
		case "niah_multivalue": // one key, four value triples
			key := c.Needles[0].Key
			for _, n := range c.Needles {
				s.Context[n.Pos] = key
				s.Refs = append(s.Refs, triple(n))
			}
			s.Questions = [][]int32{v.Question(c.Needles[0])}
			s.MaxTokens = 4 * v.AnswerLength
		}
		return s, nil
	case "vt", "cwe", "fwe":
		c, err := v.NewCase(length-32, []float64{0.5}, seed+uint64(length))
		if err != nil {
			return nil, err
		}
		s.Context = c.Tokens
		switch task {
		case "vt": // a chain: K1 v1 v2 v3, K2 K1, K3 K2, ... asked by value
			n := c.Needles[0]
			keys := pickFrom(r, v.Keys, 5, []int32{n.Key})
			s.Context[n.Pos] = keys[0]
			for i := 1; i < len(keys); i++ {
				at := 1 + r.IntN(len(s.Context)-3)
				s.Context = slices.Insert(s.Context, at, keys[i], keys[i-1])
			}
			s.Questions = [][]int32{{v.Questions[0], v.Questions[1], v.Questions[2], n.Values[0]}}
			for _, k := range keys {
				s.Refs = append(s.Refs, words([]int32{k}))
			}
			s.MaxTokens = 2 * len(keys)
		default: // cwe, fwe: some filler words made much more frequent
			top := 10
			if task == "fwe" {
				top = 3
			}
			common := pickFrom(r, v.Filler, top, nil)
			for i := 1; i < len(s.Context); i++ {
				if r.IntN(100) < 20 {
					s.Context[i] = common[r.IntN(len(common))]
				}
			}
			counts := map[int32]int{}
			for _, t := range s.Context[1:] {
				counts[t]++
			}
			ids := make([]int32, 0, len(counts))
			for t := range counts {
				ids = append(ids, t)
			}
			sort.Slice(ids, func(i, j int) bool {
				return counts[ids[i]] > counts[ids[j]] || (counts[ids[i]] == counts[ids[j]] && ids[i] < ids[j])
			})
			for _, t := range ids[:top] {
				s.Refs = append(s.Refs, words([]int32{t}))
			}
			s.Questions = [][]int32{{v.Questions[0], v.Questions[1], v.Questions[2]}}
			s.MaxTokens = 2 * top
		}
		return s, nil
	}
	return nil, fmt.Errorf("unknown RULER task %q (%s)", task, strings.Join(Tasks, ", "))
}

func pickFrom(r *rand.Rand, from []int32, n int, avoid []int32) []int32 {
	var out []int32
	for len(out) < n {
		t := from[r.IntN(len(from))]
		if !slices.Contains(out, t) && !slices.Contains(avoid, t) {
			out = append(out, t)
		}
	}
	return out
}
