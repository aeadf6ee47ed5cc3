package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/runtime"
)

// ingest answers POST /v1/documents. The body is plain text (id and stream
// in the query string) or JSON {"id", "text", "stream"}. With stream, the
// prefill's progress comes as server-sent events, then the document.
func (s *Server) ingest(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var req struct {
		ID     string     `json:"id"`
		Text   string     `json:"text"`
		Stream bool       `json:"stream"`
		Hyper  *hyperJSON `json:"hyper"`
	}
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	switch ct {
	case "application/json":
		if !decodeJSON(w, r, &req) {
			return
		}
	case "", "text/plain", "text/markdown":
		b, err := io.ReadAll(r.Body)
		if err != nil {
			bodyError(w, r, err, "reading the body: ")
			return
		}
		req.Text = string(b)
		req.ID = r.URL.Query().Get("id")
		req.Stream = r.URL.Query().Get("stream") == "true"
	default:
		writeError(w, r, http.StatusUnsupportedMediaType, "send text/plain or application/json")
		return
	}
	if req.Stream || strings.Contains(r.Header.Get("Accept"), "text/event-stream") {
		req.Stream = true
	}
	if strings.TrimSpace(req.Text) == "" {
		writeError(w, r, http.StatusBadRequest, "the document text is empty")
		return
	}
	if req.ID != "" && !runtime.ValidDocumentID(req.ID) {
		writeError(w, r, http.StatusBadRequest, "invalid document id: use letters, digits, '.', '_' and '-' (at most 128)")
		return
	}
	// A text that cannot fit the context whatever its tokens is refused
	// before it takes the slot (tokenizing it would cost seconds there).
	if n, ctxLen := len(req.Text)/m.Tokenizer().MaxTokenBytes(), m.Options().ContextLength; n >= ctxLen {
		writeError(w, r, http.StatusBadRequest, fmt.Sprintf("%v: the document needs at least %d tokens; the context length is %d", runtime.ErrContextFull, n, ctxLen))
		return
	}
	e := &sse{w: w}
	release, err := s.admit(w, r)
	if err != nil {
		s.metrics.outcome("ingest", outcomeOf(err, r))
		s.sseFail(e, r, err)
		return
	}
	defer release()
	// One ingest at a time writes documents, so two requests for one id
	// cannot interleave their files.
	s.ingestMu.Lock()
	defer s.ingestMu.Unlock()

	// A progress event that cannot be written (the client stopped reading or
	// left) cancels the prefill at its next batch.
	ctx, cancel := context.WithCancelCause(r.Context())
	defer cancel(nil)
	last, target := 0, 0
	progress := func(done, total int) {
		s.metrics.ingestDone.Add(float64(done - last))
		if target == 0 {
			target = total
			s.metrics.ingestTotal.Add(float64(total))
		}
		last = done
		if req.Stream {
			if err := e.send(map[string]any{"object": "document.progress", "done": done, "total": total}); err != nil {
				cancel(err)
			}
		}
	}
	var opts runtime.IngestOptions
	if req.Hyper != nil {
		opts.Hyper = req.Hyper.options()
	}
	doc, err := m.IngestWith(ctx, req.ID, req.Text, opts, progress)
	if cause := context.Cause(ctx); err != nil && ctx.Err() != nil && r.Context().Err() == nil {
		err = cause
	}
	s.metrics.ingestDone.Sub(float64(last))
	s.metrics.ingestTotal.Sub(float64(target))
	if err != nil {
		err = badRequestIfInput(err)
		s.metrics.outcome("ingest", outcomeOf(err, r))
		s.sseFail(e, r, err)
		return
	}
	s.metrics.outcome("ingest", outcomeOK)
	s.metrics.ingestTokens.Add(float64(last))
	out := documentJSON(doc.Info)
	if req.Stream {
		if e.send(out) == nil {
			e.send("[DONE]")
		}
		return
	}
	writeJSON(w, http.StatusCreated, out)
}

// hyperJSON turns on HyperAttention for an ingest ({"hyper": {}} for the
// paper's defaults on every layer); unset fields keep hyper.Default's.
type hyperJSON struct {
	Layers      []int   `json:"layers"`
	Projections int     `json:"projections"`
	BlockSize   int     `json:"block_size"`
	Samples     *int    `json:"samples"` // 0 is a setting: blocks only
	MinSeqLen   int     `json:"min_seq_len"`
	Seed        *uint64 `json:"seed"`
}

func (h *hyperJSON) options() *runtime.HyperOptions {
	c := hyper.Default()
	if h.Projections != 0 {
		c.Projections = h.Projections
	}
	if h.BlockSize != 0 {
		c.BlockSize = h.BlockSize
	}
	if h.Samples != nil {
		c.Samples = *h.Samples
	}
	if h.MinSeqLen != 0 {
		c.MinSeqLen = h.MinSeqLen
	}
	if h.Seed != nil {
		c.Seed = *h.Seed
	}
	return &runtime.HyperOptions{Config: c, Layers: h.Layers}
}

// badRequestIfInput maps errors about the request's content to 400.
func badRequestIfInput(err error) error {
	if errors.Is(err, runtime.ErrContextFull) || strings.HasPrefix(err.Error(), "hyper:") || strings.Contains(err.Error(), "invalid document id") || strings.Contains(err.Error(), "empty document") {
		return badRequest("%v", err)
	}
	return err
}

func documentJSON(in runtime.Info) map[string]any {
	out := map[string]any{
		"object": "document", "id": in.ID, "tokens": in.Tokens, "pages": in.Pages, "page_size": in.PageSize,
		"host_bytes": in.HostBytes, "text_sha256": in.TextSHA256, "created": in.Created.Unix(),
		"prefill_seconds": in.PrefillSeconds,
	}
	// With a shared store: its address, and "shared" when this instance
	// fetched the pages instead of prefilling them.
	if in.ContentKey != "" {
		out["content_key"] = in.ContentKey
	}
	if in.Source != "" {
		out["source"] = in.Source
	}
	return out
}

func (s *Server) listDocuments(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	infos, err := m.Documents()
	if err != nil {
		writeError(w, r, http.StatusInternalServerError, redact(err.Error()))
		return
	}
	data := make([]any, len(infos))
	for i, in := range infos {
		data[i] = documentJSON(in)
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

func (s *Server) getDocument(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	in, err := m.DocumentInfo(r.PathValue("id"))
	if err != nil {
		status, msg := statusOf(err)
		writeError(w, r, status, msg)
		return
	}
	writeJSON(w, http.StatusOK, documentJSON(in))
}

func (s *Server) deleteDocument(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	id := r.PathValue("id")
	s.ingestMu.Lock()
	err := m.DeleteDocument(id)
	s.ingestMu.Unlock()
	if err != nil {
		status, msg := statusOf(err)
		writeError(w, r, status, msg)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "document", "id": id, "deleted": true})
}
