package serve

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/redistest"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

// needleCase is a haystack text with one needle, its question and answer
// on the recall model.
func needleCase(t testing.TB, model string, tokens int, seed uint64) (text, question, answer string) {
	f, err := gguf.Open(model)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(tokens, []float64{0.6}, seed)
	require.NoError(t, err)
	vocab := f.KVs[indexOf(f, "tokenizer.ggml.tokens")].Value.([]string)
	words := func(ids []int32) string {
		var parts []string
		for _, id := range ids {
			parts = append(parts, strings.TrimPrefix(vocab[id], "▁"))
		}
		return strings.Join(parts, " ")
	}
	n := c.Needles[0]
	return words(c.Tokens[1:]), words(voc.Question(n)), words(n.Values)
}

type completion struct {
	Choices []struct{ Text string }  `json:"choices"`
	Timings map[string]float64       `json:"timings"`
	Error   struct{ Message string } `json:"error"`
}

func ask(t testing.TB, p *proc, doc, question string) (int, completion) {
	t.Helper()
	status, body := post(t, p.url+"/v1/completions", "application/json",
		fmt.Sprintf(`{"document":%q,"prompt":%q,"max_tokens":3,"temperature":0}`, doc, question))
	var out completion
	require.NoError(t, json.Unmarshal([]byte(body), &out), body)
	return status, out
}

func ingestDoc(t testing.TB, p *proc, id, text string) map[string]any {
	t.Helper()
	status, body := post(t, p.url+"/v1/documents?id="+id, "text/plain", text)
	require.Equal(t, http.StatusCreated, status, body)
	var out map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &out))
	return out
}

type storeHealth struct {
	Store *struct {
		URL       string `json:"url"`
		Available bool   `json:"available"`
		Error     string `json:"error"`
	} `json:"store"`
}

func health(t *testing.T, p *proc) storeHealth {
	t.Helper()
	resp, err := http.Get(p.url + "/health")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "an unreachable store does not make the instance unhealthy")
	var h storeHealth
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&h))
	require.NotNil(t, h.Store, "/health describes the store")
	return h
}

// Two serve processes share one real redis-server: one ingests, the other
// answers without prefill; damaged chunks are detected and the document
// re-ingested; two ingests of one document keep one copy; with Redis killed
// local documents still answer, others get a clear 503, never a wrong
// answer, and /health says so.
func TestSharedStoreAcrossInstances(t *testing.T) {
	model := testmodels.Recall(t)
	r := redistest.Start(t)
	rc := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer rc.Close()
	ctx := context.Background()
	text, question, answer := needleCase(t, model, 2000, 3)

	a := start(t, model, t.TempDir(), "--store", r.URL)
	b := start(t, model, t.TempDir(), "--store", r.URL)
	require.True(t, health(t, a).Store.Available)

	doc := ingestDoc(t, a, "book", text)
	require.Nil(t, doc["source"], "the first instance prefilled it")
	key := doc["content_key"].(string)
	require.Len(t, key, 64)

	// b never saw the document: it fetches the pages and evaluates only
	// the question (the 2000-token document would be prompt_n 2004).
	status, out := ask(t, b, "book", question)
	require.Equal(t, http.StatusOK, status, out.Error.Message)
	require.Equal(t, " "+answer, out.Choices[0].Text)
	require.EqualValues(t, 4, out.Timings["prompt_n"], "no prefill on the second instance")
	resp, err := http.Get(b.url + "/v1/documents/book")
	require.NoError(t, err)
	var info map[string]any
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&info))
	resp.Body.Close()
	require.Equal(t, "shared", info["source"])

	// The same text ingested on b under another id: fetched by content,
	// not prefilled.
	again := ingestDoc(t, b, "book-again", text)
	require.Equal(t, "shared", again["source"])
	require.Equal(t, key, again["content_key"])

	chunkKeys := func(content string) []string {
		keys, err := rc.Keys(ctx, "kvrecall:chunk:"+content+":*").Result()
		require.NoError(t, err)
		return keys
	}

	// A chunk evicted, a chunk with one flipped byte: a fresh instance
	// reports the document missing (404, naming the damage), an ingest of
	// the text prefills it again and stores it again.
	for _, fault := range []string{"evicted", "flipped"} {
		t.Run(fault, func(t *testing.T) {
			keys := chunkKeys(key)
			require.NotEmpty(t, keys)
			if fault == "evicted" {
				require.NoError(t, rc.Del(ctx, keys[0]).Err())
			} else {
				v, err := rc.Get(ctx, keys[0]).Bytes()
				require.NoError(t, err)
				v[len(v)/2] ^= 0x10
				require.NoError(t, rc.Set(ctx, keys[0], v, 0).Err())
			}
			c := start(t, model, t.TempDir(), "--store", r.URL)
			status, out := ask(t, c, "book", question)
			require.Equal(t, http.StatusNotFound, status)
			require.Contains(t, out.Error.Message, "damaged")
			require.Empty(t, out.Choices, "no answer from a damaged copy")
			doc := ingestDoc(t, c, "book", text)
			require.Nil(t, doc["source"], "re-ingested (prefilled), not fetched")
			n, err := rc.Exists(ctx, "kvrecall:doc:"+key).Result()
			require.NoError(t, err)
			require.EqualValues(t, 1, n, "stored again")
		})
	}

	// a and b ingest a new document at once: both answer, one copy stays.
	text2, question2, answer2 := needleCase(t, model, 1500, 11)
	var wg sync.WaitGroup
	docs := make([]map[string]any, 2)
	for i, p := range []*proc{a, b} {
		wg.Add(1)
		go func() { defer wg.Done(); docs[i] = ingestDoc(t, p, "race", text2) }()
	}
	wg.Wait()
	key2 := docs[0]["content_key"].(string)
	require.Equal(t, key2, docs[1]["content_key"])
	writers := map[string]bool{}
	for _, k := range chunkKeys(key2) {
		writers[strings.Split(k, ":")[3]] = true // kvrecall:chunk:<content>:<writer>:...
	}
	require.Len(t, writers, 1, "one copy kept")
	for _, p := range []*proc{a, b} {
		status, out := ask(t, p, "race", question2)
		require.Equal(t, http.StatusOK, status, out.Error.Message)
		require.Equal(t, " "+answer2, out.Choices[0].Text)
	}

	// a replaces "book" with other text: b, which holds the old version
	// locally, answers from the new one (its answer is the new needle's).
	ingestDoc(t, a, "book", text2)
	status, out = ask(t, b, "book", question2)
	require.Equal(t, http.StatusOK, status, out.Error.Message)
	require.Equal(t, " "+answer2, out.Choices[0].Text, "not the replaced version")
	// And back: the name points at the first text again (fetched on a by
	// content), and b follows.
	back := ingestDoc(t, a, "book", text)
	require.Equal(t, key, back["content_key"])
	status, out = ask(t, b, "book", question)
	require.Equal(t, http.StatusOK, status, out.Error.Message)
	require.Equal(t, " "+answer, out.Choices[0].Text)

	// Redis dies.
	r.Kill()
	h := health(t, b)
	require.False(t, h.Store.Available)
	require.Contains(t, h.Store.Error, "local tier")
	// b's local copy answers (the local fallback), correctly.
	status, out = ask(t, b, "book", question)
	require.Equal(t, http.StatusOK, status, out.Error.Message)
	require.Equal(t, " "+answer, out.Choices[0].Text)
	// An instance started while Redis is down serves its local tier; a
	// document it does not have is a clear 503, not a 404 or an answer.
	d := start(t, model, t.TempDir(), "--store", r.URL)
	require.False(t, health(t, d).Store.Available)
	status, out = ask(t, d, "book", question)
	require.Equal(t, http.StatusServiceUnavailable, status)
	require.Contains(t, out.Error.Message, "shared document store is unavailable")
	require.Empty(t, out.Choices)
	// Ingests still work there: prefilled locally.
	doc = ingestDoc(t, d, "local", text2)
	require.Nil(t, doc["source"])
	status, out = ask(t, d, "local", question2)
	require.Equal(t, http.StatusOK, status, out.Error.Message)
	require.Equal(t, " "+answer2, out.Choices[0].Text)
}

func TestStoreFlag(t *testing.T) {
	t.Setenv("KVRECALL_STORE", "redis://127.0.0.1:6399/0")
	s, err := parse(nil)
	require.NoError(t, err)
	require.Equal(t, "redis://127.0.0.1:6399/0", s.store)
	for _, bad := range []string{"memcached://x", "file://relative"} {
		_, err := parse([]string{"--store", bad})
		require.ErrorContains(t, err, "--store")
	}
}
