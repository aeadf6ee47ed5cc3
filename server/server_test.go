package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	// Which backends load must not depend on the caller's environment.
	testmodels.NoBackendLibraries()
	os.Exit(m.Run())
}

// fixture is a server over the recall model with one haystack.
type fixture struct {
	t        *testing.T
	m        *runtime.Model
	s        *Server
	ts       *httptest.Server
	voc      *haystack.Vocab
	c        *haystack.Case
	text     string // the haystack as text (no BOS)
	question string
	answer   string
	dir      string
}

func newFixture(t *testing.T, cfg Config, dir string) *fixture {
	t.Helper()
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	if dir == "" {
		dir = t.TempDir()
	}
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 2, ContextLength: 4096, DataDir: dir})
	require.NoError(t, err)
	t.Cleanup(m.Close)
	if cfg.ModelName == "" {
		cfg.ModelName = "recall"
	}
	s := New(cfg)
	require.NoError(t, s.SetModel(m, time.Second))
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	c, err := voc.NewCase(1500, []float64{0.4}, 11)
	require.NoError(t, err)
	fx := &fixture{t: t, m: m, s: s, ts: ts, voc: voc, c: c, dir: dir}
	fx.text = fx.words(c.Tokens[1:])
	n := c.Needles[0]
	fx.question = fx.words(voc.Question(n))
	fx.answer = fx.words(n.Values)
	return fx
}

func (fx *fixture) words(ids []int32) string {
	s, err := fx.m.Tokenizer().Decode(ids)
	require.NoError(fx.t, err)
	return strings.TrimPrefix(s, " ")
}

func (fx *fixture) do(method, path, contentType string, body any, header ...string) *http.Response {
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		require.NoError(fx.t, err)
		r = bytes.NewReader(j)
		if contentType == "" {
			contentType = "application/json"
		}
	}
	req, err := http.NewRequest(method, fx.ts.URL+path, r)
	require.NoError(fx.t, err)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(fx.t, err)
	return resp
}

func decode[T any](t *testing.T, resp *http.Response) T {
	t.Helper()
	defer resp.Body.Close()
	var v T
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&v))
	return v
}

// sseLines returns the data payloads of an event stream, checking framing.
func sseLines(t *testing.T, resp *http.Response) []string {
	t.Helper()
	defer resp.Body.Close()
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	var out []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		require.True(t, strings.HasPrefix(line, "data: "), "line %q", line)
		out = append(out, strings.TrimPrefix(line, "data: "))
	}
	require.NoError(t, sc.Err())
	require.Equal(t, "[DONE]", out[len(out)-1], "a stream ends with [DONE]")
	return out
}

func greedy(n int) map[string]any {
	return map[string]any{"temperature": 0, "max_tokens": n}
}

func with(m map[string]any, kv ...any) map[string]any {
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	return m
}

func TestHealthWhileLoading(t *testing.T) {
	s := New(Config{})
	ts := httptest.NewServer(s)
	defer ts.Close()
	resp, err := http.Get(ts.URL + "/health")
	require.NoError(t, err)
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	body := decode[map[string]map[string]any](t, resp)
	require.Equal(t, "Loading model", body["error"]["message"])
	resp, err = http.Get(ts.URL + "/v1/models")
	require.NoError(t, err)
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	require.NotEmpty(t, resp.Header.Get("Retry-After"))
	resp.Body.Close()

	fx := newFixture(t, Config{}, "")
	resp = fx.do("GET", "/health", "", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "ok", decode[map[string]string](t, resp)["status"])
}

func TestOpenAICompletions(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	prompt := fx.text + " " + fx.question
	resp := fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", prompt, "model", "recall"))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body := decode[map[string]any](t, resp)
	require.Equal(t, "text_completion", body["object"])
	choice := body["choices"].([]any)[0].(map[string]any)
	require.Equal(t, " "+fx.answer, choice["text"])
	require.Equal(t, "length", choice["finish_reason"])
	u := body["usage"].(map[string]any)
	require.EqualValues(t, 3, u["completion_tokens"])
	require.EqualValues(t, len(fx.c.Tokens)+4, u["prompt_tokens"])
	require.EqualValues(t, len(fx.c.Tokens)+7, u["total_tokens"])

	// Streaming, line by line.
	resp = fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", prompt, "stream", true,
		"stream_options", map[string]any{"include_usage": true}))
	lines := sseLines(t, resp)
	var text strings.Builder
	var finish, usageSeen int
	for _, l := range lines[:len(lines)-1] {
		var c struct {
			Object  string `json:"object"`
			Choices []struct {
				Text         string  `json:"text"`
				FinishReason *string `json:"finish_reason"`
			} `json:"choices"`
			Usage *struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		require.NoError(t, json.Unmarshal([]byte(l), &c), l)
		require.Equal(t, "text_completion", c.Object)
		if c.Usage != nil {
			usageSeen++
			require.Empty(t, c.Choices, "the usage chunk has no choices")
			require.Equal(t, 3, c.Usage.CompletionTokens)
			continue
		}
		require.Len(t, c.Choices, 1)
		text.WriteString(c.Choices[0].Text)
		if c.Choices[0].FinishReason != nil {
			finish++
			require.Equal(t, "length", *c.Choices[0].FinishReason)
		}
	}
	require.Equal(t, " "+fx.answer, text.String())
	require.Equal(t, 1, finish)
	require.Equal(t, 1, usageSeen)
}

func TestOpenAIChat(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	msgs := []map[string]string{{"role": "system", "content": fx.text}, {"role": "user", "content": fx.question}}
	resp := fx.do("POST", "/v1/chat/completions", "", with(greedy(3), "messages", msgs))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body := decode[map[string]any](t, resp)
	require.Equal(t, "chat.completion", body["object"])
	msg := body["choices"].([]any)[0].(map[string]any)["message"].(map[string]any)
	require.Equal(t, "assistant", msg["role"])
	require.Equal(t, " "+fx.answer, msg["content"])

	resp = fx.do("POST", "/v1/chat/completions", "", with(greedy(3), "messages", msgs, "stream", true))
	lines := sseLines(t, resp)
	var first struct {
		Object  string `json:"object"`
		Choices []struct {
			Delta map[string]string `json:"delta"`
		} `json:"choices"`
	}
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &first))
	require.Equal(t, "chat.completion.chunk", first.Object)
	require.Equal(t, "assistant", first.Choices[0].Delta["role"], "the first chunk carries the role")
	var text strings.Builder
	for _, l := range lines[1 : len(lines)-1] {
		var c struct {
			Choices []struct {
				Delta        map[string]string `json:"delta"`
				FinishReason *string           `json:"finish_reason"`
			} `json:"choices"`
		}
		require.NoError(t, json.Unmarshal([]byte(l), &c))
		text.WriteString(c.Choices[0].Delta["content"])
	}
	require.Equal(t, " "+fx.answer, text.String())
}

func TestOllamaRoutes(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	opts := map[string]any{"temperature": 0, "num_predict": 3}
	prompt := fx.text + " " + fx.question

	resp := fx.do("POST", "/api/generate", "", map[string]any{"model": "recall", "prompt": prompt, "options": opts})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))
	sc := bufio.NewScanner(resp.Body)
	var text strings.Builder
	var last map[string]any
	for sc.Scan() {
		var obj map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &obj), sc.Text())
		text.WriteString(obj["response"].(string))
		last = obj
	}
	resp.Body.Close()
	require.Equal(t, " "+fx.answer, text.String())
	require.Equal(t, true, last["done"])
	require.Equal(t, "length", last["done_reason"])
	require.EqualValues(t, 3, last["eval_count"])
	require.EqualValues(t, len(fx.c.Tokens)+4, last["prompt_eval_count"])
	for _, k := range []string{"total_duration", "prompt_eval_duration", "eval_duration"} {
		require.Greater(t, last[k].(float64), 0.0, k)
	}

	resp = fx.do("POST", "/api/chat", "", map[string]any{"model": "recall:latest", "stream": false, "options": opts,
		"messages": []map[string]string{{"role": "user", "content": prompt}}})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	chat := decode[map[string]any](t, resp)
	require.Equal(t, " "+fx.answer, chat["message"].(map[string]any)["content"])
	require.Equal(t, true, chat["done"])

	tags := decode[map[string][]map[string]any](t, fx.do("GET", "/api/tags", "", nil))
	require.Len(t, tags["models"], 1)
	require.Equal(t, "recall:latest", tags["models"][0]["name"])
	require.Equal(t, "gguf", tags["models"][0]["details"].(map[string]any)["format"])

	show := decode[map[string]any](t, fx.do("POST", "/api/show", "", map[string]string{"model": "recall"}))
	info := show["model_info"].(map[string]any)
	require.Equal(t, "llama", info["general.architecture"])
	require.Contains(t, show["capabilities"], "completion")
	// Where the model runs: the CPU here (docs/gpu.md).
	use := fx.m.Device()
	require.Equal(t, "CPU", info["kvrecall.device"])
	require.Equal(t, use.Device.Description, info["kvrecall.device.description"])
	require.Equal(t, "CPU", info["kvrecall.device.backend"])
	require.Equal(t, "cpu", info["kvrecall.device.kind"])
	require.Equal(t, false, info["kvrecall.device.loaded"])
	require.EqualValues(t, 0, info["kvrecall.gpu_layers"])
	require.EqualValues(t, fx.m.Config().Layers+1, info["kvrecall.layers"])

	require.Equal(t, Version, decode[map[string]string](t, fx.do("GET", "/api/version", "", nil))["version"])
}

func TestDocuments(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	// Streamed ingest: progress events, then the document.
	resp := fx.do("POST", "/v1/documents?id=book&stream=true", "text/plain", fx.text)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	lines := sseLines(t, resp)
	var progress []float64
	for _, l := range lines[:len(lines)-2] {
		var ev map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &ev))
		require.Equal(t, "document.progress", ev["object"])
		progress = append(progress, ev["done"].(float64))
	}
	require.NotEmpty(t, progress)
	require.EqualValues(t, len(fx.c.Tokens), progress[len(progress)-1])
	var doc map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-2]), &doc))
	require.Equal(t, "book", doc["id"])
	require.EqualValues(t, len(fx.c.Tokens), doc["tokens"])

	// JSON ingest, not streamed.
	resp = fx.do("POST", "/v1/documents", "", map[string]any{"id": "copy", "text": fx.text})
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp.Body.Close()

	// HyperAttention ingest (the paper's defaults: exact below 4096 tokens),
	// answered with exact decode.
	resp = fx.do("POST", "/v1/documents", "", map[string]any{"id": "hyper", "text": fx.text, "hyper": map[string]any{"layers": []int{1}}})
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp.Body.Close()
	resp = fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", fx.question, "document", "hyper", "policy", "dense"))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, " "+fx.answer, decode[map[string]any](t, resp)["choices"].([]any)[0].(map[string]any)["text"])
	resp = fx.do("DELETE", "/v1/documents/hyper", "", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	resp.Body.Close()

	list := decode[struct{ Data []map[string]any }](t, fx.do("GET", "/v1/documents", "", nil))
	require.Len(t, list.Data, 2)
	one := decode[map[string]any](t, fx.do("GET", "/v1/documents/book", "", nil))
	require.EqualValues(t, len(fx.c.Tokens), one["tokens"])

	// Questions about the document: only the question is evaluated.
	// "+heads": the recall model's recorded retrieval heads are its default profile.
	for _, policy := range []string{"retro", "quest", "dense", "retro+heads"} {
		resp = fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", fx.question, "document", "book", "policy", policy, "budget", 1024))
		require.Equal(t, http.StatusOK, resp.StatusCode)
		body := decode[map[string]any](t, resp)
		require.Equal(t, " "+fx.answer, body["choices"].([]any)[0].(map[string]any)["text"], policy)
		u := body["usage"].(map[string]any)
		require.EqualValues(t, len(fx.c.Tokens), u["prompt_tokens_details"].(map[string]any)["cached_tokens"])
		require.EqualValues(t, len(fx.c.Tokens)+4, u["prompt_tokens"])
	}
	// A request names a head profile the server loaded: the ablation (the
	// retrieval KV head streaming) loses the needle, the recorded one finds it.
	fx.s.SetHeadProfiles(map[string]heads.Classes{
		"recorded": heads.Mask{{true, true}, {false, true}},
		"ablation": heads.Mask{{false, false}, {true, false}},
	})
	for _, c := range []struct {
		profile string
		found   bool
	}{{"recorded", true}, {"ablation", false}} {
		resp = fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", fx.question, "document", "book",
			"policy", "retro+heads", "budget", 1024, "heads_profile", c.profile))
		require.Equal(t, http.StatusOK, resp.StatusCode)
		text := decode[map[string]any](t, resp)["choices"].([]any)[0].(map[string]any)["text"]
		require.Equal(t, c.found, text == " "+fx.answer, "%s: %q", c.profile, text)
	}
	resp = fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", fx.question, "document", "book",
		"policy", "retro+heads", "heads_profile", "nope"))
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, decode[map[string]any](t, resp)["error"].(map[string]any)["message"], "loaded: ablation, recorded")
	resp = fx.do("POST", "/api/generate", "", map[string]any{"prompt": fx.question, "document": "book", "stream": false,
		"options": map[string]any{"temperature": 0, "num_predict": 3}})
	require.Equal(t, " "+fx.answer, decode[map[string]any](t, resp)["response"])

	resp = fx.do("DELETE", "/v1/documents/book", "", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, true, decode[map[string]any](t, resp)["deleted"])
	for _, r := range []*http.Response{
		fx.do("GET", "/v1/documents/book", "", nil),
		fx.do("DELETE", "/v1/documents/book", "", nil),
		fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", "x", "document", "book")),
	} {
		require.Equal(t, http.StatusNotFound, r.StatusCode)
		r.Body.Close()
	}
}

func TestBadInput(t *testing.T) {
	fx := newFixture(t, Config{MaxBodyBytes: 4096}, "")
	cases := []struct {
		name, method, path, ctype string
		body                      any
		status                    int
		want                      string
	}{
		{"malformed JSON", "POST", "/v1/chat/completions", "application/json", `{"messages": [`, 400, "malformed JSON"},
		{"malformed JSON (ollama)", "POST", "/api/generate", "application/json", `{"prompt": }`, 400, "malformed JSON"},
		{"oversized body", "POST", "/v1/completions", "application/json", `{"prompt": "` + strings.Repeat("a", 5000) + `"}`, 413, "exceeds"},
		{"oversized document", "POST", "/v1/documents", "text/plain", strings.Repeat("pako ", 2000), 413, "limit"},
		{"unknown model", "POST", "/v1/completions", "", map[string]any{"model": "gpt-9", "prompt": "x"}, 404, "gpt-9"},
		{"unknown model (ollama)", "POST", "/api/chat", "", map[string]any{"model": "gpt-9", "messages": []map[string]string{{"role": "user", "content": "x"}}}, 404, "gpt-9"},
		{"unknown document", "POST", "/v1/chat/completions", "", map[string]any{"document": "nope", "messages": []map[string]string{{"role": "user", "content": "x"}}}, 404, "no such document"},
		{"bad temperature", "POST", "/v1/completions", "", map[string]any{"prompt": "x", "temperature": 7}, 400, "temperature"},
		{"bad hyper setting", "POST", "/v1/documents", "", map[string]any{"text": "pako", "hyper": map[string]any{"block_size": -1}}, 400, "block size"},
		{"hyper layer out of range", "POST", "/v1/documents", "", map[string]any{"text": "pako", "hyper": map[string]any{"layers": []int{99}}}, 400, "layer 99"},
		{"bad role", "POST", "/v1/chat/completions", "", map[string]any{"messages": []map[string]string{{"role": "wizard", "content": "x"}}}, 400, "role"},
		{"empty messages", "POST", "/v1/chat/completions", "", map[string]any{"messages": []any{}}, 400, "empty"},
		{"n > 1", "POST", "/v1/completions", "", map[string]any{"prompt": "x", "n": 2}, 400, "n must be 1"},
		{"unknown policy", "POST", "/v1/completions", "", map[string]any{"prompt": "x", "document": "d", "policy": "magic"}, 400, "unknown policy"},
		{"unknown modifier", "POST", "/v1/completions", "", map[string]any{"prompt": "x", "document": "d", "policy": "retro+magic"}, 400, "+heads"},
		{"bad document id", "POST", "/v1/documents?id=../x", "text/plain", "pako tafo", 400, "invalid document id"},
		{"empty document", "POST", "/v1/documents", "text/plain", "   ", 400, "empty"},
		{"wrong content type", "POST", "/v1/documents", "image/png", "x", 415, "text/plain"},
		{"no such route", "GET", "/v2/nothing", "", nil, 404, "no route"},
		{"wrong method", "GET", "/v1/completions", "", nil, 405, "not allowed"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp := fx.do(c.method, c.path, c.ctype, c.body)
			require.Equal(t, c.status, resp.StatusCode)
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			require.Contains(t, string(b), c.want)
			if strings.HasPrefix(c.path, "/api/") {
				var e map[string]string
				require.NoError(t, json.Unmarshal(b, &e), "Ollama errors are {\"error\": \"...\"}")
				require.NotEmpty(t, e["error"])
			} else {
				var e map[string]map[string]any
				require.NoError(t, json.Unmarshal(b, &e), "OpenAI errors are {\"error\": {...}}")
				require.NotEmpty(t, e["error"]["message"])
				require.NotEmpty(t, e["error"]["type"])
			}
		})
	}
}

func TestContextOverflowIsAnError(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	resp := fx.do("POST", "/v1/completions", "", map[string]any{"prompt": strings.Repeat("pako ", 5000)})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Contains(t, string(b), "nothing was truncated")
	resp = fx.do("POST", "/api/generate", "", map[string]any{"prompt": "pako", "options": map[string]any{"num_ctx": 100000}})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	resp.Body.Close()
}

func TestAPIKey(t *testing.T) {
	fx := newFixture(t, Config{APIKey: "s3cret"}, "")
	for _, h := range [][]string{nil, {"Authorization", "Bearer wrong"}, {"x-api-key", "nope"}} {
		resp := fx.do("GET", "/v1/models", "", nil, h...)
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
		resp.Body.Close()
	}
	for _, h := range [][]string{{"Authorization", "Bearer s3cret"}, {"x-api-key", "s3cret"}, {"Authorization", "bearer s3cret"}, {"Authorization", "BEARER  s3cret"}} {
		resp := fx.do("GET", "/v1/models", "", nil, h...)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		resp.Body.Close()
	}
	resp := fx.do("GET", "/metrics", "", nil)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "metrics are protected too")
	resp.Body.Close()
	resp = fx.do("GET", "/health", "", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode, "health stays open for probes")
	resp.Body.Close()
}

// Beyond the queue, requests are refused at once with Retry-After.
func TestQueueFull(t *testing.T) {
	fx := newFixture(t, Config{MaxConcurrent: 1, QueueLength: 1}, "")
	release, err := fx.s.acquire(context.Background()) // hold the only slot
	require.NoError(t, err)
	queued := make(chan *http.Response, 1)
	go func() { queued <- fx.do("POST", "/v1/completions", "", with(greedy(2), "prompt", "pako")) }()
	require.Eventually(t, func() bool { return fx.s.queued.Load() == 1 }, 5*time.Second, 10*time.Millisecond)
	resp := fx.do("POST", "/v1/completions", "", with(greedy(2), "prompt", "pako"))
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	require.Equal(t, "1", resp.Header.Get("Retry-After"))
	resp.Body.Close()
	release()
	r := <-queued
	require.Equal(t, http.StatusOK, r.StatusCode, "the queued request runs once the slot frees")
	r.Body.Close()
}

// A client that disconnects cancels its generation.
func TestDisconnectCancels(t *testing.T) {
	fx := newFixture(t, Config{MaxTokens: 100000}, "")
	ctx, cancel := context.WithCancel(context.Background())
	body, _ := json.Marshal(map[string]any{"prompt": fx.text, "stream": true, "max_tokens": 2000})
	req, _ := http.NewRequestWithContext(ctx, "POST", fx.ts.URL+"/v1/completions", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	rd := bufio.NewReader(resp.Body)
	_, err = rd.ReadString('\n')
	require.NoError(t, err)
	start := time.Now()
	cancel()
	resp.Body.Close()
	require.Eventually(t, func() bool { return len(fx.s.slots) == 0 }, 10*time.Second, 20*time.Millisecond,
		"the generation must stop and free its slot")
	require.Less(t, time.Since(start), 10*time.Second)
	got := counter(t, fx, "kvrecall_tokens_predicted_total")
	require.Less(t, got, 2000.0, "generation stopped early")
	require.Eventually(t, func() bool { return outcomes(t, fx, "completions")["cancelled"] == 1 }, 5*time.Second, 10*time.Millisecond,
		"a disconnect is counted as cancelled, not as an error")
}

func counter(t *testing.T, fx *fixture, name string) float64 {
	resp := fx.do("GET", "/metrics", "", nil)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, name+" ") {
			var v float64
			fmt.Sscan(strings.TrimPrefix(line, name+" "), &v)
			return v
		}
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

func TestMetrics(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	resp := fx.do("POST", "/v1/documents?id=m", "text/plain", fx.text)
	resp.Body.Close()
	resp = fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", fx.question, "document", "m"))
	resp.Body.Close()
	resp = fx.do("GET", "/metrics", "", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, name := range []string{"kvrecall_prompt_tokens_total 4", "kvrecall_tokens_predicted_total 3",
		"kvrecall_prompt_tokens_cached_total", "kvrecall_requests_processing 0", "kvrecall_requests_deferred 0",
		"kvrecall_kv_resident_bytes", "kvrecall_kv_pages_host", "kvrecall_kv_pages_disk", "kvrecall_ingest_tokens_total",
		"kvrecall_predicted_tokens_seconds", "kvrecall_ingest_progress_tokens 0"} {
		require.Contains(t, string(b), name)
	}
	require.Greater(t, counter(t, fx, "kvrecall_kv_resident_bytes"), 0.0)
	// The device: the CPU, no layer offloaded.
	d := fx.m.Device().Device
	require.Contains(t, string(b), fmt.Sprintf(`kvrecall_device_info{backend="CPU",description=%q,device="CPU",kind="cpu",loaded="false"} 1`, d.Description))
	require.Zero(t, counter(t, fx, "kvrecall_gpu_layers"))
	require.EqualValues(t, fx.m.Config().Layers+1, counter(t, fx, "kvrecall_model_layers"))
}

// Parallel clients (run under -race by make test) all get their answers.
func TestParallelClients(t *testing.T) {
	fx := newFixture(t, Config{MaxConcurrent: 2, QueueLength: 16}, "")
	resp := fx.do("POST", "/v1/documents?id=p", "text/plain", fx.text)
	resp.Body.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			req := with(greedy(3), "prompt", fx.question, "document", "p", "stream", i%2 == 0)
			b, _ := json.Marshal(req)
			r, err := http.Post(fx.ts.URL+"/v1/completions", "application/json", bytes.NewReader(b))
			if err != nil {
				errs <- err
				return
			}
			out, _ := io.ReadAll(r.Body)
			r.Body.Close()
			if r.StatusCode != 200 {
				errs <- fmt.Errorf("client %d: %d %s", i, r.StatusCode, out)
				return
			}
			text := string(out)
			for _, w := range strings.Fields(fx.answer) {
				if !strings.Contains(text, w) {
					errs <- fmt.Errorf("client %d: answer %q lacks %q", i, text, w)
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Documents survive a restart: a new model and server answer from the pages
// the first one stored, without prefilling again.
func TestRestartKeepsDocuments(t *testing.T) {
	dir := t.TempDir()
	fx := newFixture(t, Config{}, dir)
	resp := fx.do("POST", "/v1/documents?id=kept", "text/plain", fx.text)
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp.Body.Close()
	fx.ts.Close()
	fx.m.Close()

	fx2 := newFixture(t, Config{}, dir)
	list := decode[struct{ Data []map[string]any }](t, fx2.do("GET", "/v1/documents", "", nil))
	require.Len(t, list.Data, 1)
	resp = fx2.do("POST", "/v1/completions", "", with(greedy(3), "prompt", fx2.question, "document", "kept"))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body := decode[map[string]any](t, resp)
	require.Equal(t, " "+fx.answer, body["choices"].([]any)[0].(map[string]any)["text"])
	require.EqualValues(t, 4, body["timings"].(map[string]any)["prompt_n"], "only the question was evaluated")
}
