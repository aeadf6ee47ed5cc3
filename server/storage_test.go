package server

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/runtime"
)

// restart is a new model and server on the fixture's model file, after
// closing the fixture's model.
func (fx *fixture) restart(o runtime.Options) *fixture {
	fx.m.Close()
	o.Threads, o.ContextLength = 2, 4096
	m, err := runtime.Open(context.Background(), fx.m.Path(), o)
	require.NoError(fx.t, err)
	fx.t.Cleanup(m.Close)
	s := New(Config{ModelName: "recall"})
	require.NoError(fx.t, s.SetModel(m, time.Second))
	ts := httptest.NewServer(s)
	fx.t.Cleanup(ts.Close)
	out := *fx
	out.m, out.s, out.ts, out.dir = m, s, ts, o.DataDir
	return &out
}

// /metrics reports the documents' host memory and the evictions that keep
// it within MaxDocumentBytes; an evicted document answers after reloading.
func TestDocumentMemoryMetrics(t *testing.T) {
	fx := newFixture(t, Config{}, "").restart(runtime.Options{DataDir: t.TempDir(), MaxDocumentBytes: 1})

	var bytes float64
	for _, id := range []string{"a", "b"} {
		resp := fx.do("POST", "/v1/documents?id="+id, "text/plain", fx.text)
		require.Equal(t, http.StatusCreated, resp.StatusCode)
		bytes = decode[map[string]any](t, resp)["host_bytes"].(float64)
	}
	require.Equal(t, bytes, counter(t, fx, "kvrecall_documents_host_bytes"), "one document fits the bound")
	require.Equal(t, 1.0, counter(t, fx, "kvrecall_document_evictions_total"))
	resp := fx.do("POST", "/v1/completions", "", with(greedy(3), "prompt", fx.question, "document", "a"))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, " "+fx.answer, decode[map[string]any](t, resp)["choices"].([]any)[0].(map[string]any)["text"])
	// a reloaded and evicted b; with a bound below one document, a goes
	// too once its request no longer uses it.
	require.Equal(t, 3.0, counter(t, fx, "kvrecall_document_evictions_total"))
	require.Equal(t, 0.0, counter(t, fx, "kvrecall_documents_host_bytes"))
}

// GET /v1/documents/{id} checks the page file, not only the metadata, and
// DELETE removes a document whose metadata is gone.
func TestDocumentRouteChecksPages(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	resp := fx.do("POST", "/v1/documents?id=book", "text/plain", fx.text)
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp.Body.Close()
	fx = fx.restart(runtime.Options{DataDir: fx.dir}) // nothing in memory
	pages, err := filepath.Glob(filepath.Join(fx.dir, "book", "pages*.kvp"))
	require.NoError(t, err)
	require.Len(t, pages, 1)
	require.NoError(t, os.Remove(pages[0]))
	resp = fx.do("GET", "/v1/documents/book", "", nil)
	require.Equal(t, http.StatusInternalServerError, resp.StatusCode)
	require.Contains(t, decode[map[string]any](t, resp)["error"].(map[string]any)["message"], "page file is missing")

	require.NoError(t, os.Remove(filepath.Join(fx.dir, "book", "doc.json")))
	os.WriteFile(pages[0], []byte("orphan"), 0o600)
	resp = fx.do("DELETE", "/v1/documents/book", "", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode, "orphaned pages are deletable")
	resp.Body.Close()
	_, err = os.Stat(filepath.Join(fx.dir, "book"))
	require.True(t, os.IsNotExist(err))
}
