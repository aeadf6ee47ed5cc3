package runtime_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

// jsonPrefix returns an error if text is not the beginning of a JSON
// value (a syntax error); text cut off inside a value is fine.
func jsonPrefix(text string) error {
	dec := json.NewDecoder(strings.NewReader(text))
	for {
		_, err := dec.Token()
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return err
		}
		if err != nil && strings.Contains(err.Error(), "unexpected EOF") {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func TestFormatGrammar(t *testing.T) {
	for _, tc := range []struct {
		name, format string
		empty        bool   // free text: no grammar
		err          string // "" for success
	}{
		{name: "absent", format: "", empty: true},
		{name: "null", format: "null", empty: true},
		{name: "empty string", format: `""`, empty: true},
		{name: "json", format: `"json"`},
		{name: "schema", format: `{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}`},
		{name: "ref", format: `{"$defs":{"n":{"type":"number"}},"type":"object","properties":{"x":{"$ref":"#/$defs/n"}}}`},
		{name: "unknown format name", format: `"xml"`, err: `must be "json" or a JSON Schema object (got "xml")`},
		{name: "array", format: `[1]`, err: `must be "json" or a JSON Schema object`},
		{name: "schema not JSON", format: `{"type": }`, err: "the schema is not valid JSON"},
		{name: "trailing text", format: `{"type":"object"} {}`, err: "text after the schema"},
		{name: "unknown type", format: `{"type":"object","properties":{"age":{"type":"int"}}}`, err: `properties.age.type: unknown type int`},
		{name: "type not a string", format: `{"type":3}`, err: "type must be a string or an array of strings"},
		{name: "remote ref", format: `{"$ref":"https://example.com/s.json"}`, err: `$ref: only local references`},
		{name: "empty pattern", format: `{"type":"string","pattern":""}`, err: "pattern must be a string that starts with ^"},
		{name: "pattern without anchors", format: `{"type":"string","pattern":"[a-z]+"}`, err: "pattern must be a string that starts with ^"},
		{name: "required not a list", format: `{"type":"object","required":"a"}`, err: "required must be an array"},
		{name: "properties not an object", format: `{"type":"object","properties":[]}`, err: "properties must be an object of schemas"},
		{name: "bad anyOf member", format: `{"anyOf":[{"type":"string"},{"type":"nope"}]}`, err: "anyOf[1].type: unknown type nope"},
		{name: "maxLength not a number", format: `{"type":"string","maxLength":"3"}`, err: "maxLength must be a number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := runtime.FormatGrammar(json.RawMessage(tc.format))
			if tc.err != "" {
				require.ErrorIs(t, err, runtime.ErrFormat)
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.empty, g == "", "grammar %q", g)
			if !tc.empty {
				require.Regexp(t, `(?m)^root\s+::=`, g)
			}
		})
	}
}

// person is the schema of the constrained tests, and the Go type that
// validates an answer against it (decoded with unknown fields refused,
// then every keyword of the schema checked).
const personSchema = `{"type":"object","properties":{
	"name":{"type":"string","minLength":1,"maxLength":12},
	"age":{"type":"integer","minimum":0,"maximum":120},
	"pet":{"enum":["cat","dog","none"]}},
	"required":["name","age","pet"],"additionalProperties":false}`

func validPerson(text string) error {
	var p struct {
		Name *string `json:"name"`
		Age  *int    `json:"age"`
		Pet  *string `json:"pet"`
	}
	dec := json.NewDecoder(strings.NewReader(text))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("text after the object")
	}
	switch {
	case p.Name == nil || p.Age == nil || p.Pet == nil:
		return errors.New("a required property is missing")
	case len([]rune(*p.Name)) < 1 || len([]rune(*p.Name)) > 12:
		return fmt.Errorf("name %q: length outside 1..12", *p.Name)
	case *p.Age < 0 || *p.Age > 120:
		return fmt.Errorf("age %d outside 0..120", *p.Age)
	case *p.Pet != "cat" && *p.Pet != "dog" && *p.Pet != "none":
		return fmt.Errorf("pet %q not in the enum", *p.Pet)
	}
	return nil
}

// TestGrammarConstrains generates from the stories model, which only
// knows children's stories: with the grammar every answer (greedy and
// sampled with several seeds) is JSON, or validates against the schema;
// the same requests without the grammar give prose, so the test fails if
// the grammar is not applied.
func TestGrammarConstrains(t *testing.T) {
	m := openStories(t, runtime.Options{})
	ctx := context.Background()
	jsonMode, err := runtime.FormatGrammar(json.RawMessage(`"json"`))
	require.NoError(t, err)
	schema, err := runtime.FormatGrammar(json.RawMessage(personSchema))
	require.NoError(t, err)
	isJSON := func(s string) error {
		if !json.Valid([]byte(s)) || !strings.HasPrefix(strings.TrimSpace(s), "{") {
			return fmt.Errorf("not a JSON object: %q", s)
		}
		return nil
	}
	samplings := []runtime.Sampling{{}} // greedy, then sampled
	for seed := range 4 {
		samplings = append(samplings, runtime.Sampling{Temperature: 1, Seed: seed})
	}
	for _, tc := range []struct {
		name    string
		grammar string
		valid   func(string) error
		// complete: every answer ends within the limit. The schema bounds
		// its strings; JSON mode cannot, and this model, once inside a
		// string, tells a story there until the limit: then the answer
		// must still be a prefix of valid JSON.
		complete bool
	}{
		{"json", jsonMode, isJSON, false},
		{"schema", schema, validPerson, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, sm := range samplings {
				// The prompt asks for JSON in words the model cannot follow.
				prompt := "Once upon a time, a girl wrote her name, age and pet as JSON:"
				res, err := m.Generate(ctx, prompt, runtime.GenerateOptions{MaxTokens: 200, Sampling: sm, Grammar: tc.grammar})
				require.NoError(t, err)
				if tc.complete {
					require.Equal(t, runtime.StopEOG, res.StopReason, "the grammar completes before the limit: %q", res.Text)
				}
				if res.StopReason == runtime.StopEOG {
					require.NoError(t, tc.valid(res.Text), "sampling %+v", sm)
				} else {
					require.NoError(t, jsonPrefix(res.Text), "sampling %+v", sm)
				}

				free, err := m.Generate(ctx, prompt, runtime.GenerateOptions{MaxTokens: 60, Sampling: sm})
				require.NoError(t, err)
				require.Error(t, tc.valid(free.Text), "without the grammar the model writes prose: %q", free.Text)
				require.Error(t, jsonPrefix(free.Text), "without the grammar the model writes prose: %q", free.Text)
			}
		})
	}

	t.Run("bad grammar", func(t *testing.T) {
		_, err := m.Generate(ctx, "Once", runtime.GenerateOptions{Grammar: `root ::= "unterminated`})
		require.ErrorIs(t, err, runtime.ErrFormat)
	})
	t.Run("stream matches text", func(t *testing.T) {
		var b bytes.Buffer
		res, err := m.Generate(ctx, "Once upon a time", runtime.GenerateOptions{MaxTokens: 200, Grammar: schema,
			OnToken: func(tok runtime.Token) error { b.WriteString(tok.Text); return nil }})
		require.NoError(t, err)
		require.Equal(t, res.Text, b.String())
		require.NoError(t, validPerson(b.String()))
	})
}

// A byte-level BPE vocabulary (qwen2's, on a random model whose every
// token is about as likely): the grammar sees the same text the
// detokenizer writes, so every answer validates, and the same requests
// without it do not.
func TestGrammarBPE(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "qwen2", "tiny", foundry.F32, 1, false),
		runtime.Options{Threads: 1, ContextLength: 512, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	schema, err := runtime.FormatGrammar(json.RawMessage(personSchema))
	require.NoError(t, err)
	for seed := range 4 {
		sm := runtime.Sampling{Temperature: 1, Seed: seed}
		res, err := m.Generate(context.Background(), "hello", runtime.GenerateOptions{MaxTokens: 200, Sampling: sm, Grammar: schema})
		require.NoError(t, err)
		require.Equal(t, runtime.StopEOG, res.StopReason, "%q", res.Text)
		require.NoError(t, validPerson(res.Text), "seed %d", seed)
		free, err := m.Generate(context.Background(), "hello", runtime.GenerateOptions{MaxTokens: 60, Sampling: sm})
		require.NoError(t, err)
		require.Error(t, validPerson(free.Text), "%q", free.Text)
	}
}
