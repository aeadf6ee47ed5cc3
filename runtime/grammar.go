package runtime

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"

	"github.com/ollama/ollama/llama"
	"github.com/ollama/ollama/tokenizer"
)

// Constrained output uses llama.cpp's grammar sampler and its JSON Schema
// converter as the pinned ollama module wraps them (package
// github.com/ollama/ollama/llama, the same code ollama's runner uses for
// `format`): kvrecall writes no grammar engine of its own.

// ErrFormat marks an output format the grammar cannot be built from: a
// format that is neither "json" nor a JSON Schema object, a schema that is
// not JSON, or one llama.cpp's converter cannot handle.
var ErrFormat = errors.New("bad output format")

// JSONGrammar is the GBNF grammar of JSON mode: one JSON object. It is
// llama.cpp's grammars/json.gbnf, whose white space is bounded (at most a
// newline and 20 indents between tokens), so that a model cannot spend its
// whole budget on white space; strings and nesting are unbounded, as in
// any JSON. (ollama's copy allows unbounded white space.)
const JSONGrammar = `root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
`

// FormatGrammar returns the grammar of an output format as Ollama's
// `format` field gives it: nil, `null` or `""` for free text (grammar ""),
// `"json"` for any JSON object (JSONGrammar), or a JSON Schema object,
// converted by llama.cpp's json_schema_to_grammar. Errors wrap ErrFormat
// and say what is wrong, with the schema path of the offending keyword
// where the converter would fail on it.
func FormatGrammar(format json.RawMessage) (string, error) {
	f := bytes.TrimSpace(format)
	switch string(f) {
	case "", "null", `""`:
		return "", nil
	case `"json"`:
		return JSONGrammar, nil
	}
	if f[0] != '{' {
		if len(f) > 60 {
			f = append(f[:60:60], "..."...)
		}
		return "", fmt.Errorf(`%w: must be "json" or a JSON Schema object (got %s)`, ErrFormat, f)
	}
	var schema map[string]any
	dec := json.NewDecoder(bytes.NewReader(f))
	dec.UseNumber()
	if err := dec.Decode(&schema); err != nil {
		return "", fmt.Errorf("%w: the schema is not valid JSON: %v", ErrFormat, err)
	}
	if dec.More() {
		return "", fmt.Errorf("%w: text after the schema's JSON object", ErrFormat)
	}
	if err := checkSchema("", schema); err != nil {
		return "", fmt.Errorf("%w: schema %v", ErrFormat, err)
	}
	g := llama.SchemaToGrammar(f)
	if g == nil {
		// The converter's C++ error message does not cross the cgo
		// boundary (ollama's wrapper returns nothing); checkSchema catches
		// the common causes first.
		return "", fmt.Errorf("%w: llama.cpp's JSON Schema converter cannot handle this schema (unsupported keyword or combination)", ErrFormat)
	}
	return string(g), nil
}

// schemaTypes are the JSON Schema types the converter knows.
var schemaTypes = []string{"string", "number", "integer", "boolean", "object", "array", "null"}

// checkSchema finds, before the converter sees the schema, the mistakes
// that make it fail without a message (or, for an empty pattern, read out
// of bounds): unknown types, non-local $refs, patterns without ^...$,
// properties/required/enum of the wrong JSON type. path names where.
func checkSchema(path string, s map[string]any) error {
	at := func(k string) string {
		if path == "" {
			return k
		}
		return path + "." + k
	}
	if t, ok := s["type"]; ok {
		var names []any
		switch v := t.(type) {
		case string:
			names = []any{v}
		case []any:
			names = v
		default:
			return fmt.Errorf("%s must be a string or an array of strings", at("type"))
		}
		for _, n := range names {
			str, ok := n.(string)
			if !ok || !slices.Contains(schemaTypes, str) {
				return fmt.Errorf("%s: unknown type %v (%s)", at("type"), n, strings.Join(schemaTypes, ", "))
			}
		}
	}
	if r, ok := s["$ref"]; ok {
		str, ok := r.(string)
		if !ok || !strings.HasPrefix(str, "#/") {
			return fmt.Errorf(`%s: only local references ("#/$defs/...") are supported (got %v)`, at("$ref"), r)
		}
	}
	if p, ok := s["pattern"]; ok {
		str, ok := p.(string)
		if !ok || len(str) < 2 || str[0] != '^' || str[len(str)-1] != '$' {
			return fmt.Errorf("%s must be a string that starts with ^ and ends with $ (got %v)", at("pattern"), p)
		}
	}
	if r, ok := s["required"]; ok {
		list, ok := r.([]any)
		if !ok {
			return fmt.Errorf("%s must be an array of property names", at("required"))
		}
		for _, x := range list {
			if _, ok := x.(string); !ok {
				return fmt.Errorf("%s must be an array of property names (got %v)", at("required"), x)
			}
		}
	}
	if e, ok := s["enum"]; ok {
		if _, ok := e.([]any); !ok {
			return fmt.Errorf("%s must be an array", at("enum"))
		}
	}
	for _, k := range []string{"minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum"} {
		if v, ok := s[k]; ok {
			if _, ok := v.(json.Number); !ok {
				return fmt.Errorf("%s must be a number (got %v)", at(k), v)
			}
		}
	}
	// Sub-schemas: maps of them, lists of them and single ones.
	for _, k := range []string{"properties", "$defs", "definitions", "patternProperties"} {
		if v, ok := s[k]; ok {
			m, ok := v.(map[string]any)
			if !ok {
				return fmt.Errorf("%s must be an object of schemas", at(k))
			}
			keys := make([]string, 0, len(m))
			for name := range m {
				keys = append(keys, name)
			}
			sort.Strings(keys) // the first error is the same every time
			for _, name := range keys {
				sub, ok := m[name].(map[string]any)
				if !ok {
					if b, isBool := m[name].(bool); isBool && b {
						continue
					}
					return fmt.Errorf("%s must be a schema object", at(k+"."+name))
				}
				if err := checkSchema(at(k+"."+name), sub); err != nil {
					return err
				}
			}
		}
	}
	for _, k := range []string{"anyOf", "oneOf", "allOf", "prefixItems"} {
		if v, ok := s[k]; ok {
			list, ok := v.([]any)
			if !ok {
				return fmt.Errorf("%s must be an array of schemas", at(k))
			}
			for i, x := range list {
				sub, ok := x.(map[string]any)
				if !ok {
					return fmt.Errorf("%s[%d] must be a schema object", at(k), i)
				}
				if err := checkSchema(fmt.Sprintf("%s[%d]", at(k), i), sub); err != nil {
					return err
				}
			}
		}
	}
	for _, k := range []string{"items", "additionalProperties", "not"} {
		switch v := s[k].(type) {
		case nil, bool:
		case map[string]any:
			if err := checkSchema(at(k), v); err != nil {
				return err
			}
		default:
			if k == "items" {
				if _, ok := v.([]any); ok {
					continue // draft-4 tuple items: the converter reads them
				}
			}
			return fmt.Errorf("%s must be a schema object or a boolean", at(k))
		}
	}
	return nil
}

// grammarVocab is what llama.cpp's grammar needs of the vocabulary: every
// token's text, built once per model (151k Decode calls for Qwen). Control,
// unknown and unused tokens get "" so the grammar rejects them: a JSON
// string must not be able to hold <|im_start|>. EOG tokens are passed
// separately, and allowed exactly when the grammar is complete.
func (t *Tokenizer) grammarVocab() ([]uint32, []string) {
	t.gvOnce.Do(func() {
		n := len(t.vocab.Values)
		t.gvIDs, t.gvPieces = make([]uint32, n), make([]string, n)
		for i := range n {
			t.gvIDs[i] = uint32(i)
			if i < len(t.vocab.Types) {
				switch t.vocab.Types[i] {
				case tokenizer.TOKEN_TYPE_CONTROL, tokenizer.TOKEN_TYPE_UNKNOWN, tokenizer.TOKEN_TYPE_UNUSED:
					continue
				}
			}
			t.gvPieces[i] = t.Piece(int32(i))
		}
	})
	return t.gvIDs, t.gvPieces
}

// grammar constrains sampling to a GBNF grammar through llama.cpp's
// sampler. It is not safe for concurrent use (each generation has its own).
type grammar struct {
	g   *llama.Grammar
	tds []llama.TokenData // scratch of the vocabulary's size
}

func newGrammar(t *Tokenizer, gbnf string) (*grammar, error) {
	ids, pieces := t.grammarVocab()
	eog := make([]int32, 0, len(t.eog))
	for id := range t.eog {
		eog = append(eog, id)
	}
	g := llama.NewGrammar(gbnf, ids, pieces, eog)
	if g == nil {
		return nil, fmt.Errorf("%w: llama.cpp cannot parse the grammar", ErrFormat)
	}
	return &grammar{g: g}, nil
}

// allowed reports whether the grammar accepts id next.
func (g *grammar) allowed(id int32) bool {
	one := []llama.TokenData{{ID: id, Logit: 0}}
	g.g.Apply(one)
	return !math.IsInf(float64(one[0].Logit), -1)
}

// mask sets the logits of the tokens the grammar rejects to -inf and
// reports whether any token is left.
func (g *grammar) mask(logits []float32) bool {
	if cap(g.tds) < len(logits) {
		g.tds = make([]llama.TokenData, len(logits))
	}
	g.tds = g.tds[:len(logits)]
	for i, l := range logits {
		g.tds[i] = llama.TokenData{ID: int32(i), Logit: l}
	}
	g.g.Apply(g.tds)
	left := false
	for i := range logits {
		logits[i] = g.tds[i].Logit
		if !math.IsInf(float64(logits[i]), -1) {
			left = true
		}
	}
	return left
}

// accept advances the grammar past id, which must be allowed (llama.cpp
// aborts the process on a rejected token).
func (g *grammar) accept(id int32) { g.g.Accept(id) }

func (g *grammar) free() { g.g.Free() }
