package server

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestPagingSettingsRejected: paging and probe settings out of range are
// 400s naming the setting, on the OpenAI and the Ollama routes, before
// anything runs. Model-dependent checks (block_size against the page
// size, exc_block_size against the window) need the document to exist.
func TestPagingSettingsRejected(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	resp := fx.do("POST", "/v1/documents", "", map[string]any{"id": "d", "text": fx.text})
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp.Body.Close()
	probeReq := func(kv ...any) map[string]any {
		return with(map[string]any{"prompt": fx.question, "document": "d", "policy": "probe", "max_tokens": 1}, kv...)
	}
	cases := []struct {
		name string
		body map[string]any
		want string
	}{
		{"negative budget", probeReq("budget", -5), "budget must be positive"},
		{"zero window", probeReq("window", 0), "window must be at least 1"},
		{"negative sinks", probeReq("sinks", -1), "sinks must be at least 1"},
		{"zero block size", probeReq("probe", map[string]any{"block_size": 0}), "probe.block_size must be at least 1"},
		{"negative repr_topk", probeReq("probe", map[string]any{"repr_topk": -2}), "probe.repr_topk"},
		{"zero exc_block_size", probeReq("probe", map[string]any{"exc_block_size": 0}), "probe.exc_block_size"},
		{"zero history", probeReq("probe", map[string]any{"history": 0}), "probe.history"},
		{"zero stat_cap", probeReq("probe", map[string]any{"stat_cap": 0}), "probe.stat_cap"},
		{"negative question_weight", probeReq("probe", map[string]any{"question_weight": -1}), "probe.question_weight"},
		{"min over max", probeReq("probe", map[string]any{"min_blocks": 9, "max_blocks": 3}), "probe.min_blocks 9 exceeds probe.max_blocks 3"},
		{"unknown setting", probeReq("probe", map[string]any{"blok_size": 64}), "unknown setting blok_size (known: block_size, repr_topk"},
		{"wrong type", probeReq("probe", map[string]any{"block_size": "big"}), "block_size"},
		{"probe settings, other method", probeReq("policy", "retro", "probe", map[string]any{"block_size": 128}), "probe settings apply to the probe method only"},
		// Checked against the model and the window when the selector is built.
		{"block size not whole pages", probeReq("probe", map[string]any{"block_size": 100}), "block_size 100 must be a positive multiple of the page size 64"},
		{"repr_topk past the block", probeReq("probe", map[string]any{"repr_topk": 65}), "repr_topk 65 must be in [1, block_size 64]"},
		{"exc_block_size past the window", probeReq("window", 128), "exc_block_size 256 exceeds the window 128"},
		{"budget below one block", probeReq("budget", 384, "probe", map[string]any{"block_size": 128}), "budget 384 leaves 64 tokens after sinks 64 and window 256, less than one block of 128"},
	}
	for _, c := range cases {
		for _, route := range []string{"/v1/completions", "/api/generate"} {
			t.Run(c.name+" "+route, func(t *testing.T) {
				resp := fx.do("POST", route, "", c.body)
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				require.NoError(t, err)
				require.Equal(t, http.StatusBadRequest, resp.StatusCode, string(b))
				require.Contains(t, string(b), c.want)
			})
		}
	}
}

// TestProbeSettingsAndLayerBudgets: a request's probe settings reach the
// method (a layer's budget is sinks + window + whole blocks of the
// request's block size), and every route reports the per-layer budgets;
// methods with fixed budgets report none.
func TestProbeSettingsAndLayerBudgets(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	resp := fx.do("POST", "/v1/documents", "", map[string]any{"id": "d", "text": fx.text})
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp.Body.Close()
	layers := fx.m.Config().Layers

	type result struct {
		Timings struct {
			LayerBudgets []int `json:"layer_budgets"`
		} `json:"timings"`
		LayerBudgets []int `json:"layer_budgets"` // Ollama's routes
	}
	openai := func(body map[string]any) []int {
		resp := fx.do("POST", "/v1/completions", "", with(body, "prompt", fx.question))
		require.Equal(t, http.StatusOK, resp.StatusCode)
		return decode[result](t, resp).Timings.LayerBudgets
	}
	chat := func(body map[string]any) []int {
		resp := fx.do("POST", "/v1/chat/completions", "", with(body, "messages", []map[string]string{{"role": "user", "content": fx.question}}))
		require.Equal(t, http.StatusOK, resp.StatusCode)
		return decode[result](t, resp).Timings.LayerBudgets
	}
	ollama := func(body map[string]any) []int {
		resp := fx.do("POST", "/api/generate", "", with(body, "prompt", fx.question, "stream", false))
		require.Equal(t, http.StatusOK, resp.StatusCode)
		return decode[result](t, resp).LayerBudgets
	}
	// Streamed: only the final (done) line carries the budgets.
	ollamaChat := func(body map[string]any) []int {
		resp := fx.do("POST", "/api/chat", "", with(body, "messages", []map[string]string{{"role": "user", "content": fx.question}}))
		require.Equal(t, http.StatusOK, resp.StatusCode)
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		var out []int
		for i, l := range lines {
			var r struct {
				Done         bool  `json:"done"`
				LayerBudgets []int `json:"layer_budgets"`
			}
			require.NoError(t, json.Unmarshal([]byte(l), &r))
			require.Equal(t, i == len(lines)-1, r.Done)
			if !r.Done {
				require.Nil(t, r.LayerBudgets, "only the final line reports budgets")
			}
			out = r.LayerBudgets
		}
		return out
	}
	routes := map[string]func(map[string]any) []int{"completions": openai, "chat": chat, "generate": ollama, "ollama chat": ollamaChat}

	cases := []struct {
		name                 string
		body                 map[string]any
		fixed, block, budget int // a layer's budget: fixed + k·block
		reported             bool
		// The exact split where it is known: the recall model's entropies
		// are all close to 1, so each layer gets the average share,
		// floor((budget − fixed)/block) blocks.
		want []int
	}{
		{"probe defaults", map[string]any{"policy": "probe", "budget": 1024}, 64 + 256, 64, 1024, true, []int{1024, 1024}},
		{"probe, block 128", map[string]any{"policy": "probe", "budget": 1024, "probe": map[string]any{"block_size": 128}}, 64 + 256, 128, 1024, true,
			[]int{320 + 5*128, 320 + 5*128}},
		{"probe, window and sinks", map[string]any{"policy": "probe", "budget": 768, "sinks": 32, "window": 128,
			"probe": map[string]any{"block_size": 128, "exc_block_size": 64, "question_weight": 4, "repr_topk": 8}}, 32 + 128, 128, 768, true,
			[]int{160 + 4*128, 160 + 4*128}},
		// Streaming heads free their share of the pool for the others.
		{"probe+heads", map[string]any{"policy": "probe+heads", "budget": 1024}, 64 + 256, 64, 1024, true, nil},
		{"retro", map[string]any{"policy": "retro", "budget": 1024}, 0, 0, 0, false, nil},
	}
	for _, c := range cases {
		for name, ask := range routes {
			t.Run(c.name+" "+name, func(t *testing.T) {
				body := with(map[string]any{"document": "d", "max_tokens": 2, "temperature": 0}, flatten(c.body)...)
				if strings.HasPrefix(name, "generate") || strings.HasPrefix(name, "ollama") {
					delete(body, "max_tokens")
					delete(body, "temperature")
					body["options"] = map[string]any{"num_predict": 2, "temperature": 0}
				}
				lb := ask(body)
				if !c.reported {
					require.Nil(t, lb)
					return
				}
				require.Len(t, lb, layers)
				if c.want != nil {
					require.Equal(t, c.want, lb)
				}
				for l, b := range lb {
					require.GreaterOrEqual(t, b, c.fixed+c.block, "layer %d: at least one block", l)
					require.LessOrEqual(t, b, c.budget*2, "layer %d: within the clamp", l)
					require.Zero(t, (b-c.fixed)%c.block, "layer %d budget %d: sinks + window + whole blocks of %d", l, b, c.block)
				}
			})
		}
	}
}

// flatten turns a map into with's key, value list.
func flatten(m map[string]any) []any {
	var kv []any
	for k, v := range m {
		kv = append(kv, k, v)
	}
	return kv
}
