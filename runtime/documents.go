package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"time"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/squeezed"
)

// Document is text prefilled once: its keys and values live in pages in host
// memory and in a page file on disk, and every question reuses them.
// A Document is immutable and safe to share between goroutines.
type Document struct {
	Info
	tokens []int32
	store  *kvcache.Store
	// clusters are the document's Squeezed-Attention clusters (nil when it
	// was ingested without Options.Squeezed).
	clusters *squeezed.Index
}

// Clusters returns the document's Squeezed-Attention clusters, or nil.
func (d *Document) Clusters() *squeezed.Index { return d.clusters }

// Info describes an ingested document.
type Info struct {
	ID          string    `json:"id"`
	Tokens      int       `json:"tokens"`
	Pages       int       `json:"pages"`
	PageSize    int       `json:"page_size"`
	HostBytes   int64     `json:"host_bytes"`
	TextSHA256  string    `json:"text_sha256"`
	Fingerprint string    `json:"model_fingerprint"`
	Created     time.Time `json:"created"`
	// PrefillSeconds is the time the ingest's prefill took, UpkeepSeconds
	// the part of it spent writing host pages and their summaries.
	PrefillSeconds float64 `json:"prefill_seconds"`
	UpkeepSeconds  float64 `json:"upkeep_seconds"`
	// HasClusters says that clusters.kvs holds the document's Squeezed-Attention
	// clusters; ClusterSeconds is the time clustering and calibration took.
	HasClusters    bool    `json:"clusters,omitempty"`
	ClusterSeconds float64 `json:"cluster_seconds,omitempty"`
}

// TokenIDs returns the document's tokens (do not modify).
func (d *Document) TokenIDs() []int32 { return d.tokens }

// Store returns the document's host pages (read-only).
func (d *Document) Store() *kvcache.Store { return d.store }

// ErrNoDocument is returned for an unknown document id.
var ErrNoDocument = errors.New("no such document")

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidDocumentID reports whether id can name a document (it becomes a directory name).
func ValidDocumentID(id string) bool { return idPattern.MatchString(id) }

const (
	docMeta     = "doc.json"
	docPages    = "pages.kvp"
	docClusters = "clusters.kvs"
)

func (m *Model) docDir(id string) string { return filepath.Join(m.opts.DataDir, id) }

// Ingest tokenizes text (with BOS), prefills it once with dense attention and
// keeps its pages in memory and on disk under id. An empty id uses a hash of
// the text. Ingesting the same text under the same id again returns the
// stored document without prefilling; other text replaces it.
func (m *Model) Ingest(ctx context.Context, id, text string, progress Progress) (*Document, error) {
	sum := sha256.Sum256([]byte(text))
	toks, err := m.tok.Encode(text, true)
	if err != nil {
		return nil, err
	}
	return m.ingest(ctx, id, toks, hex.EncodeToString(sum[:]), progress)
}

// IngestTokens is Ingest for text already tokenized (BOS included if wanted).
func (m *Model) IngestTokens(ctx context.Context, id string, toks []int32, progress Progress) (*Document, error) {
	h := sha256.New()
	for _, t := range toks {
		fmt.Fprintf(h, "%d,", t)
	}
	return m.ingest(ctx, id, toks, "tokens:"+hex.EncodeToString(h.Sum(nil)), progress)
}

func (m *Model) ingest(ctx context.Context, id string, toks []int32, textHash string, progress Progress) (*Document, error) {
	if id == "" {
		id = "doc-" + textHash[len(textHash)-16:]
	}
	if !ValidDocumentID(id) {
		return nil, fmt.Errorf("invalid document id %q: use letters, digits, '.', '_' and '-' (at most 128)", id)
	}
	// A stored document of the same text is reused, unless clusters are
	// wanted and it has none (an older ingest): then it is ingested again.
	if d, err := m.OpenDocument(id); err == nil && d.TextSHA256 == textHash && (m.opts.Squeezed == nil || d.clusters != nil) {
		return d, nil
	}
	if len(toks) == 0 {
		return nil, errors.New("empty document")
	}
	if len(toks) >= m.opts.ContextLength {
		return nil, fmt.Errorf("%w: the document has %d tokens; the context length is %d (raise ContextLength)", ErrContextFull, len(toks), m.opts.ContextLength)
	}
	pol, err := paging.New("dense", paging.Config{PageSize: m.opts.PageSize})
	if err != nil {
		return nil, err
	}
	var rec *squeezed.Recorder
	if so := m.opts.Squeezed; so != nil {
		// Record the observation window's queries on the way (they
		// calibrate the clusters' threshold).
		if rec, err = squeezed.NewRecorder(pol, m.cfg.Layers, len(toks), so.Window); err != nil {
			return nil, err
		}
		pol = rec
	}
	cache, err := m.newPaged(pol, len(toks), nil)
	if err != nil {
		return nil, err
	}
	s := &Session{m: m, cache: cache, capacity: len(toks)}
	t0 := time.Now()
	_, err = s.Eval(ctx, toks, false, progress)
	prefill := time.Since(t0)
	s.Close()
	if err != nil {
		return nil, err
	}
	d := &Document{
		Info: Info{
			ID: id, Tokens: len(toks), Pages: cache.Store().Pages(), PageSize: m.opts.PageSize,
			HostBytes: cache.Store().Bytes(), TextSHA256: textHash, Fingerprint: hex.EncodeToString(m.fp[:]),
			Created: time.Now().UTC(), PrefillSeconds: prefill.Seconds(), UpkeepSeconds: cache.Stats().Upkeep.Seconds(),
		},
		tokens: toks, store: cache.Store(),
	}
	if rec != nil {
		t0 := time.Now()
		ix, err := squeezed.Build(squeezed.StoreKeys(d.store), m.cfg.Layers, m.cfg.KVHeads, m.cfg.HeadDim, len(toks), *m.opts.Squeezed)
		if err != nil {
			return nil, fmt.Errorf("document %s: %w", id, err)
		}
		if err := ix.Calibrate(rec.Queries(), m.cfg.Heads); err != nil {
			return nil, fmt.Errorf("document %s: %w", id, err)
		}
		d.clusters, d.HasClusters, d.ClusterSeconds = ix, true, time.Since(t0).Seconds()
	}
	if err := m.saveDocument(d); err != nil {
		return nil, err
	}
	m.docMu.Lock()
	m.docs[id] = d
	m.docMu.Unlock()
	return d, nil
}

// saveDocument writes the page file, then the metadata: a document is
// visible only when both are complete.
func (m *Model) saveDocument(d *Document) error {
	dir := m.docDir(d.ID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	os.Remove(filepath.Join(dir, docMeta)) // a replaced document is invisible while its pages change
	if err := kvcache.WritePageFile(filepath.Join(dir, docPages), d.store, d.tokens, m.fp); err != nil {
		return fmt.Errorf("save document %s: %w", d.ID, err)
	}
	os.Remove(filepath.Join(dir, docClusters)) // a replaced document's clusters are not its own
	if d.clusters != nil {
		if err := d.clusters.WriteFile(filepath.Join(dir, docClusters)); err != nil {
			return fmt.Errorf("save document %s: %w", d.ID, err)
		}
	}
	b, err := json.MarshalIndent(d.Info, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteBytes(filepath.Join(dir, docMeta), b, 0o644); err != nil {
		return fmt.Errorf("save document %s: %w", d.ID, err)
	}
	return nil
}

// OpenDocument returns an ingested document, loading it from disk (and
// verifying every page checksum) if this process has not seen it yet.
func (m *Model) OpenDocument(id string) (*Document, error) {
	if !ValidDocumentID(id) {
		return nil, fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	m.docMu.Lock()
	d, ok := m.docs[id]
	m.docMu.Unlock()
	if ok {
		return d, nil
	}
	dir := m.docDir(id)
	b, err := os.ReadFile(filepath.Join(dir, docMeta))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	if err != nil {
		return nil, err
	}
	d = &Document{}
	if err := json.Unmarshal(b, &d.Info); err != nil {
		return nil, fmt.Errorf("document %s: %w: metadata: %v", id, kvcache.ErrCorrupt, err)
	}
	if d.Fingerprint != hex.EncodeToString(m.fp[:]) {
		return nil, fmt.Errorf("document %s was ingested with another model", id)
	}
	want := m.Layout()
	want.PageSize = d.PageSize
	store, toks, info, err := kvcache.ReadPageFile(filepath.Join(dir, docPages), &want)
	if err != nil {
		return nil, fmt.Errorf("document %s: %w", id, err)
	}
	if info.Fingerprint != m.fp || info.Tokens != d.Tokens {
		return nil, fmt.Errorf("document %s: %w: pages do not match the metadata", id, kvcache.ErrCorrupt)
	}
	d.tokens, d.store = toks, store
	if d.HasClusters {
		ix, err := squeezed.ReadFile(filepath.Join(dir, docClusters), m.cfg.Layers, m.cfg.KVHeads, m.cfg.HeadDim, d.Tokens)
		if err != nil {
			return nil, fmt.Errorf("document %s: %w", id, err)
		}
		d.clusters = ix
	}
	m.docMu.Lock()
	if cached, ok := m.docs[id]; ok {
		d = cached
	} else {
		m.docs[id] = d
	}
	m.docMu.Unlock()
	return d, nil
}

// Documents lists the documents stored for this model.
func (m *Model) Documents() ([]Info, error) {
	entries, err := os.ReadDir(m.opts.DataDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(m.opts.DataDir, e.Name(), docMeta))
		if err != nil {
			continue // not a (complete) document
		}
		var in Info
		if json.Unmarshal(b, &in) == nil && in.ID == e.Name() {
			out = append(out, in)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// DeleteDocument removes a document from memory and disk.
func (m *Model) DeleteDocument(id string) error {
	if !ValidDocumentID(id) {
		return fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	m.docMu.Lock()
	delete(m.docs, id)
	m.docMu.Unlock()
	dir := m.docDir(id)
	if _, err := os.Stat(filepath.Join(dir, docMeta)); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	// Metadata first: a half-deleted document is never visible.
	if err := os.Remove(filepath.Join(dir, docMeta)); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

// AskOptions choose the paging policy and the generation of an answer.
type AskOptions struct {
	PolicyOptions
	GenerateOptions
}

// Ask appends question (tokenized without BOS) after doc's pages and
// generates an answer under the chosen paging policy, without prefilling the
// document again. Many Asks on one document can run at once.
func (m *Model) Ask(ctx context.Context, doc *Document, question string, opts AskOptions) (*Result, error) {
	q, err := m.tok.Encode(question, false)
	if err != nil {
		return nil, err
	}
	s, err := m.DocumentSession(doc, opts.PolicyOptions)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return s.Generate(ctx, q, opts.GenerateOptions)
}

// DocumentSession returns a session that starts with doc's tokens and pages
// and attends under the given policy.
func (m *Model) DocumentSession(doc *Document, o PolicyOptions) (*Session, error) {
	if method, _, err := paging.Parse(o.Policy); err == nil && method == "squeezed" && o.Extra[squeezed.OptionKey] == nil {
		if doc.clusters == nil {
			return nil, fmt.Errorf("document %s has no Squeezed-Attention clusters: ingest it again with runtime Options.Squeezed set", doc.ID)
		}
		o.Extra = maps.Clone(o.Extra)
		if o.Extra == nil {
			o.Extra = map[string]any{}
		}
		o.Extra[squeezed.OptionKey] = doc.clusters
	}
	pol, err := m.NewSelector(o)
	if err != nil {
		return nil, err
	}
	if doc.PageSize != m.opts.PageSize {
		return nil, fmt.Errorf("document %s has %d-token pages; the model was opened with %d", doc.ID, doc.PageSize, m.opts.PageSize)
	}
	capacity := m.opts.ContextLength
	if capacity <= doc.Tokens {
		return nil, fmt.Errorf("%w: document %s has %d tokens; the context length is %d", ErrContextFull, doc.ID, doc.Tokens, capacity)
	}
	cache, err := m.newPaged(pol, capacity, doc.store)
	if err != nil {
		return nil, err
	}
	return &Session{m: m, cache: cache, tokens: slices.Clone(doc.tokens), capacity: capacity}, nil
}

// LoadedDocuments describes the documents this process holds in host memory.
func (m *Model) LoadedDocuments() []Info {
	m.docMu.Lock()
	defer m.docMu.Unlock()
	out := make([]Info, 0, len(m.docs))
	for _, d := range m.docs {
		out = append(out, d.Info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// DocumentInfo reads a stored document's metadata without loading its pages.
func (m *Model) DocumentInfo(id string) (Info, error) {
	if !ValidDocumentID(id) {
		return Info{}, fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	b, err := os.ReadFile(filepath.Join(m.docDir(id), docMeta))
	if errors.Is(err, os.ErrNotExist) {
		return Info{}, fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	if err != nil {
		return Info{}, err
	}
	var in Info
	if err := json.Unmarshal(b, &in); err != nil {
		return Info{}, fmt.Errorf("document %s: %w: metadata: %v", id, kvcache.ErrCorrupt, err)
	}
	return in, nil
}
