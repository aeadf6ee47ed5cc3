package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"regexp"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/probe"
	"github.com/kvrecall/kvrecall/squeezed"
	"github.com/kvrecall/kvrecall/store"
)

// Document is text prefilled once: its keys and values live in pages in host
// memory and in a page file on disk, and every question reuses them.
// A Document is immutable and safe to share between goroutines. Documents
// in memory are bounded by Options.MaxDocumentBytes: the least recently used
// ones not in use by a session are dropped and reload from disk on their
// next OpenDocument.
type Document struct {
	Info
	tokens []int32
	store  *kvcache.Store

	// probe's block representatives, by settings, computed or loaded on
	// first use (see Model.probeReps).
	probeMu sync.Mutex
	probe   map[string]*probe.Reps
	st      docState // memory bookkeeping, guarded by the model's docStore

	// clusters are the document's Squeezed-Attention clusters (nil when it
	// was ingested without Options.Squeezed).
	clusters *squeezed.Index
}

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
	// StreamingBudget is the probe budget of a streaming prefill (0: the
	// prefill attended densely).
	StreamingBudget int `json:"streaming_budget,omitempty"`
	// HasClusters says that the document's Squeezed-Attention clusters are
	// stored beside its pages; ClusterSeconds is the time clustering and
	// calibration took.
	HasClusters    bool    `json:"clusters,omitempty"`
	ClusterSeconds float64 `json:"cluster_seconds,omitempty"`
	// ProbeRepsSeconds is the time an ingest with IngestOptions.ProbeReps
	// spent scoring local attention and building probe's representatives
	// (most of it inside PrefillSeconds: the scores are taken layer by
	// layer as the prefill hands over its queries).
	ProbeRepsSeconds float64 `json:"probe_reps_seconds,omitempty"`
	// ContentKey is the document's address in the shared store (set only
	// when the model has one, Options.Store): the model, the tokens and the
	// settings that change the stored bytes, hashed.
	ContentKey string `json:"content_key,omitempty"`
	// Source is "shared" when this process fetched the document's pages
	// from the shared store instead of prefilling them (PrefillSeconds is
	// then the original ingest's).
	Source string `json:"source,omitempty"`
}

// Clusters returns the document's Squeezed-Attention clusters, or nil.
func (d *Document) Clusters() *squeezed.Index { return d.clusters }

// IngestOptions choose how a document is prefilled.
type IngestOptions struct {
	// Streaming prefills under probe (ActQKV/InfLLM): each window of
	// tokens attends to the sinks, the local window and the blocks its
	// probe retrieves, within Budget, instead of to every earlier token,
	// so ingest cost grows about linearly with length. Off by default:
	// keys a later layer computes from an approximate attention can
	// differ from a dense prefill's. The probe representatives the
	// prefill builds are stored with the document.
	Streaming bool
	Budget    int            // streaming: tokens each window attends to (default 2048)
	Probe     probe.Settings // streaming and ProbeReps: probe's settings
	Sinks     int            // streaming: default 64
	Window    int            // streaming and ProbeReps: the local window, default 256

	// ProbeReps also builds probe's block representatives and query
	// statistics during a dense or HyperAttention prefill (with Probe's
	// block_size and repr_topk and the local Window: what a probe session
	// with those settings asks for) and stores them with the document.
	// Without them, the document's first probe question computes them by
	// prefilling the whole document once more with dense attention
	// (quadratic: over 30 minutes at 128k tokens on 2 cores). The prefill
	// hands every layer's queries to the host for the local-attention
	// scores (probe.Ingester), which a HyperAttention prefill does anyway.
	// A streaming prefill always builds them.
	ProbeReps bool

	// Hyper, when set, prefills the whole document in one forward pass
	// with HyperAttention on the chosen layers and exact attention on the
	// others. Questions and answers (decode) stay exact. Off by default:
	// see docs/hyper.md for what it costs in accuracy.
	Hyper *HyperOptions
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

// Ingest tokenizes text (with BOS), prefills it once with dense attention and
// keeps its pages in memory and on disk under id. An empty id uses a hash of
// the text. Ingesting the same text under the same id again returns the
// stored document without prefilling; other text replaces it. A replacement
// is atomic: the old version is stored and served until the new one is
// complete, and stays if the new one cannot be saved.
func (m *Model) Ingest(ctx context.Context, id, text string, progress Progress) (*Document, error) {
	sum := sha256.Sum256([]byte(text))
	toks, err := m.tok.Encode(text, true)
	if err != nil {
		return nil, err
	}
	return m.ingest(ctx, id, toks, hex.EncodeToString(sum[:]), IngestOptions{}, progress)
}

// IngestTokens is Ingest for text already tokenized (BOS included if wanted).
func (m *Model) IngestTokens(ctx context.Context, id string, toks []int32, progress Progress) (*Document, error) {
	return m.ingest(ctx, id, toks, tokensHash(toks), IngestOptions{}, progress)
}

// IngestTokensWith is IngestTokens with a choice of prefill (streaming,
// HyperAttention; see IngestOptions).
func (m *Model) IngestTokensWith(ctx context.Context, id string, toks []int32, o IngestOptions, progress Progress) (*Document, error) {
	return m.ingest(ctx, id, toks, tokensHash(toks), o, progress)
}

// tokensHash is a tokenized document's TextSHA256.
func tokensHash(toks []int32) string {
	h := sha256.New()
	for _, t := range toks {
		fmt.Fprintf(h, "%d,", t)
	}
	return "tokens:" + hex.EncodeToString(h.Sum(nil))
}

func (m *Model) ingest(ctx context.Context, id string, toks []int32, textHash string, o IngestOptions, progress Progress) (*Document, error) {
	if id == "" {
		id = "doc-" + textHash[len(textHash)-16:]
	}
	if !ValidDocumentID(id) {
		return nil, fmt.Errorf("invalid document id %q: use letters, digits, '.', '_' and '-' (at most 128)", id)
	}
	// probe's ingester, when the prefill also builds its representatives.
	var ing *probe.Ingester
	var repsKey string
	if o.ProbeReps && !o.Streaming {
		if err := m.windowedRefusal("probe"); err != nil {
			return nil, fmt.Errorf("ingest with probe representatives: %w", err)
		}
		window := o.Window
		if window == 0 {
			window = paging.DefaultWindow
		}
		var err error
		if ing, err = probe.NewIngester(paging.Config{PageSize: m.opts.PageSize, Window: window, Layers: m.cfg.Layers, KVHeads: m.cfg.KVHeads}, o.Probe); err != nil {
			return nil, fmt.Errorf("ingest with probe representatives: %w", err)
		}
		repsKey = probeRepsName(ing.Settings().BlockSize, ing.Settings().RepTopK, ing.Config().Window)
	}
	// The metadata says whether the text is the same; only then load pages.
	// A stored document of the same text is reused, unless clusters or
	// probe representatives are wanted and it has none (an older ingest):
	// then it is ingested again (for representatives, a prefill the first
	// probe question would otherwise make).
	if in, err := m.documentInfoLocal(id); err == nil && in.TextSHA256 == textHash && (m.opts.Squeezed == nil || in.HasClusters) &&
		(ing == nil || m.hasSide(id, repsKey)) {
		if d, err := m.openDocumentLocal(id); err == nil && d.TextSHA256 == textHash {
			if m.opts.Store != nil && d.ContentKey != "" {
				// Ingested here again: this text is what the id names now,
				// also if another instance pointed it elsewhere meanwhile.
				m.nameShared(ctx, id, d.ContentKey)
			}
			return d, nil
		}
	}
	if len(toks) == 0 {
		return nil, errors.New("empty document")
	}
	if len(toks) >= m.opts.ContextLength {
		return nil, fmt.Errorf("%w: the document has %d tokens; the context length is %d (raise ContextLength)", ErrContextFull, len(toks), m.opts.ContextLength)
	}
	if o.Streaming && o.Hyper != nil {
		return nil, errors.New("ingest: streaming prefill and HyperAttention are two prefills; choose one")
	}
	if o.Hyper != nil && m.cfg.AttnSoftcap > 0 {
		// HyperAttention computes plain softmax attention: no score cap.
		return nil, fmt.Errorf("ingest: HyperAttention does not support %s's soft-capped attention scores (attn_logit_softcapping %g): ingest densely", m.cfg.Arch, m.cfg.AttnSoftcap)
	}
	if m.opts.Squeezed != nil && m.cfg.SlidingWindow > 0 {
		return nil, fmt.Errorf("ingest: Squeezed-Attention clusters do not support %s's sliding-window layers yet: open the model without Options.Squeezed", m.cfg.Arch)
	}
	var use []bool // the layers that use HyperAttention
	if o.Hyper != nil {
		h := *o.Hyper
		var err error
		if use, err = h.validate(m.cfg); err != nil {
			return nil, err
		}
		o.Hyper = &h
	}
	var pol paging.Selector
	var err error
	var chunk int
	var streamSel *probe.Selector // the streaming prefill's selector
	if o.Streaming {
		if o.Budget == 0 {
			o.Budget = paging.DefaultBudget
		}
		pol, err = m.NewSelector(PolicyOptions{Policy: "probe", Budget: o.Budget, Sinks: o.Sinks, Window: o.Window,
			Extra: map[string]any{probe.OptionKey: o.Probe}})
		if err != nil {
			return nil, fmt.Errorf("streaming prefill: %w", err)
		}
		// One window of queries per forward pass, at most half the local
		// window, so that every query still sees at least that many
		// earlier tokens (InfLLM: exc_block_size 256 within n_local 512).
		streamSel = pol.(*probe.Selector)
		chunk = min(streamSel.Settings().ExcBlockSize, streamSel.Config().Window/2)
	} else if ing != nil {
		// Every page, as the dense method, with every layer's queries
		// scored for the representatives on the way.
		pol = ing
	} else if pol, err = paging.New("dense", paging.Config{PageSize: m.opts.PageSize, Layers: m.cfg.Layers, KVHeads: m.cfg.KVHeads}); err != nil {
		// (The layer count is needed by the sliding-window wrapper of
		// gemma models; without it their ingest was refused.)
		return nil, err
	}
	// With a shared store, a document some instance has ingested with the
	// same model, tokens and settings is fetched instead of prefilled. Not
	// there, damaged (then prefilled and stored again) or unreachable (then
	// prefilled here): the prefill below.
	var content string
	if m.opts.Store != nil {
		content = m.contentKey(toks, o, repsKey)
		m.shared.fetchMu.Lock()
		d, err := m.fetchShared(ctx, id, content)
		if err == nil {
			m.nameShared(ctx, id, content)
		}
		m.shared.fetchMu.Unlock()
		if err == nil {
			return d, nil
		}
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
	switch {
	case o.Hyper != nil:
		// The whole document in one batch: the recursion needs every query.
		var hc *hyperCache
		if hc, err = m.newHyperCache(cache, *o.Hyper, use, len(toks)); err == nil {
			s.cache = hc
		}
		if err == nil {
			err = ctx.Err()
		}
		if err == nil {
			if _, err = s.forward(toks, false, false); err == nil && progress != nil {
				progress(len(toks), len(toks))
			}
		}
	case !o.Streaming:
		// The compute buffer, sized once for the last batch, not
		// reallocated batch after batch (reserve.go). A prefill that
		// hands over its queries splits every pass, which a reservation
		// cannot (arch.Step.Reserve): it allocates as it goes.
		if ing == nil {
			err = m.reserveIngest(len(toks))
		}
		if err == nil {
			_, err = s.Eval(ctx, toks, false, progress)
		}
	}
	for start := 0; o.Streaming && start < len(toks) && err == nil; start += chunk {
		end := min(len(toks), start+chunk)
		_, err = s.Eval(ctx, toks[start:end], false, nil)
		if progress != nil && err == nil {
			progress(end, len(toks))
		}
	}
	prefill := time.Since(t0)
	s.Close()
	if err != nil {
		return nil, err
	}
	// Sliding-window layers keep, in memory and in the page file, only the
	// pages a question's window can read.
	cache.Store().TrimWindows()
	var reps *probe.Reps
	switch {
	case o.Streaming:
		if reps, err = streamSel.SequenceReps(cache.Store().Summaries(0), len(toks)); err != nil {
			return nil, err
		}
	case ing != nil:
		if reps, err = ing.Reps(); err != nil {
			return nil, fmt.Errorf("document %s: probe representatives: %w", id, err)
		}
	}
	d := &Document{
		Info: Info{
			ID: id, Tokens: len(toks), Pages: cache.Store().Pages(), PageSize: m.opts.PageSize,
			HostBytes: cache.Store().Bytes(), TextSHA256: textHash, Fingerprint: hex.EncodeToString(m.fp[:]),
			Created: time.Now().UTC(), PrefillSeconds: prefill.Seconds(), UpkeepSeconds: cache.Stats().Upkeep.Seconds(),
			ContentKey: content,
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
	switch {
	case o.Streaming:
		d.StreamingBudget = o.Budget
		st := streamSel.Settings()
		repsKey = probeRepsName(st.BlockSize, st.RepTopK, streamSel.Config().Window)
		d.probe = map[string]*probe.Reps{repsKey: reps}
	case ing != nil:
		d.ProbeRepsSeconds = ing.Took().Seconds()
		d.probe = map[string]*probe.Reps{repsKey: reps}
	}
	if content != "" {
		// Until the name is set (publishShared): a question here must not
		// read the id's old name and fetch the old version over this one.
		m.shared.fetchMu.Lock()
		defer m.shared.fetchMu.Unlock()
	}
	if err := m.saveDocument(d); err != nil {
		return nil, err
	}
	if reps != nil {
		if err := m.writeProbeReps(d, repsKey, reps); err != nil {
			return nil, err
		}
	}
	if content != "" {
		// The document is stored locally whatever happens here: a shared
		// store that cannot take it is reported by StoreStatus.
		m.publishShared(ctx, d)
	}
	return d, nil
}

// saveDocument stores d on the local tier and makes it the resident
// version of its id. The page file and clusters are streamed to new files;
// doc.json, renamed over the old one, is the commit point; the old page
// file is removed last (store.Local.Put). On any error before the commit
// the old version is untouched, on disk and in memory.
func (m *Model) saveDocument(d *Document) error {
	files := []store.File{{Name: store.PagesFile, Write: func(w io.Writer) error {
		return kvcache.WritePages(w, d.store, d.tokens, m.fp)
	}}}
	if d.clusters != nil {
		files = append(files, store.File{Name: store.ClustersFile, Write: func(w io.Writer) error {
			_, err := w.Write(d.clusters.Encode())
			return err
		}})
	}
	return m.commitDocument(d.Info, d, files)
}

// commitDocument writes a version of document info.ID with its files on
// the local tier. d is the version in memory, made resident; nil (a copy
// installed from the shared store, loaded and verified from disk next)
// only drops the old one (the tier's Committed hook does that).
func (m *Model) commitDocument(info Info, d *Document, files []store.File) error {
	st := m.documents()
	st.writeMu.Lock()
	defer st.writeMu.Unlock()
	meta, err := json.Marshal(info)
	if err != nil {
		return fmt.Errorf("save document %s: %w", info.ID, err)
	}
	if err := st.local.Put(context.Background(), info.ID, store.Version{Content: info.ContentKey, Meta: meta, Files: files}); err != nil {
		return err
	}
	if d != nil {
		st.mu.Lock()
		if cur, ok := st.resident[info.ID]; ok {
			st.dropLocked(cur) // loaded from disk since the commit: d is the same version
		}
		d.st.version = st.versions[info.ID]
		st.admitLocked(m, d)
		st.mu.Unlock()
	}
	return nil
}

// openDocumentLocal is OpenDocument on the local tier only: from memory,
// or loaded from disk (verifying every page checksum).
func (m *Model) openDocumentLocal(id string) (*Document, error) {
	if !ValidDocumentID(id) {
		return nil, fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	st := m.documents()
	for try := 0; ; try++ {
		st.mu.Lock()
		if d, ok := st.resident[id]; ok {
			st.lru.MoveToFront(d.st.elem)
			st.mu.Unlock()
			return d, nil
		}
		v := st.versions[id]
		st.mu.Unlock()

		d, err := m.loadDocument(id)

		st.mu.Lock()
		if st.versions[id] != v {
			// Deleted or replaced while loading: what was read may be the
			// old version, or an error from files being removed.
			st.mu.Unlock()
			if try == maxLoadRetry {
				return nil, fmt.Errorf("document %s changed %d times while loading; try again", id, try+1)
			}
			continue
		}
		if err != nil {
			st.mu.Unlock()
			return nil, err
		}
		if cur, ok := st.resident[id]; ok { // another load won
			st.lru.MoveToFront(cur.st.elem)
			d = cur
		} else {
			d.st.version = v
			st.admitLocked(m, d)
		}
		st.mu.Unlock()
		return d, nil
	}
}

// loadDocument reads a document from the local tier, checking its
// metadata against its folder, the model and its pages. It runs under the
// tier's read lock (View), so the files it reads are not removed meanwhile.
func (m *Model) loadDocument(id string) (*Document, error) {
	var d *Document
	var fnErr error // fully worded already
	err := m.documents().local.View(context.Background(), id, func(v store.Version) error {
		fnErr = m.readDocument(id, v, &d)
		return fnErr
	})
	if fnErr != nil {
		return nil, fnErr
	}
	if err != nil {
		return nil, m.localErr(id, err)
	}
	return d, nil
}

// readDocument reads the local tier's version v of id into *out.
func (m *Model) readDocument(id string, v store.Version, out **Document) error {
	info, err := m.checkMeta(id, v.Meta)
	if err != nil {
		return err
	}
	d := &Document{Info: info}
	*out = d
	want := m.Layout()
	want.PageSize = d.PageSize
	pages, _ := v.File(store.PagesFile)
	kv, toks, pinfo, err := kvcache.ReadPageFile(pages.Path, &want)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("document %s: %w: its page file is missing", id, kvcache.ErrCorrupt)
	}
	if err != nil {
		return fmt.Errorf("document %s: %w", id, err)
	}
	if pinfo.Fingerprint != m.fp || pinfo.Tokens != d.Tokens || pinfo.Pages != d.Pages {
		return fmt.Errorf("document %s: %w: pages do not match the metadata", id, kvcache.ErrCorrupt)
	}
	d.tokens, d.store = toks, kv
	if d.HasClusters {
		f, ok := v.File(store.ClustersFile)
		if !ok {
			return fmt.Errorf("document %s: %w: its clusters file is missing", id, kvcache.ErrCorrupt)
		}
		ix, err := squeezed.ReadFile(f.Path, m.cfg.Layers, m.cfg.KVHeads, m.cfg.HeadDim, d.Tokens)
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("document %s: %w: its clusters file is missing", id, kvcache.ErrCorrupt)
		}
		if err != nil {
			return fmt.Errorf("document %s: %w", id, err)
		}
		d.clusters = ix
	}
	return nil
}

// localErr words an error of the local tier for document id: no document
// is ErrNoDocument, unusable metadata is a corrupt document.
func (m *Model) localErr(id string, err error) error {
	switch {
	case store.IsNotFound(err):
		return fmt.Errorf("%w: %q", ErrNoDocument, id)
	case errors.Is(err, store.ErrBadMetadata):
		return fmt.Errorf("document %s: %w: %v", id, kvcache.ErrCorrupt, err)
	}
	return fmt.Errorf("document %s: %w", id, err)
}

// checkMeta parses id's doc.json and checks that it describes id for this
// model.
func (m *Model) checkMeta(id string, raw []byte) (Info, error) {
	var info Info
	if err := json.Unmarshal(raw, &info); err != nil {
		return info, fmt.Errorf("document %s: %w: %v: %v", id, kvcache.ErrCorrupt, store.ErrBadMetadata, err)
	}
	if info.ID != id {
		return info, fmt.Errorf("document %s: %w: its metadata names document %q", id, kvcache.ErrCorrupt, info.ID)
	}
	if info.Fingerprint != hex.EncodeToString(m.fp[:]) {
		return info, fmt.Errorf("document %s was ingested with another model", id)
	}
	return info, nil
}

// Documents lists the documents stored for this model: those whose
// metadata is complete and whose page file exists.
func (m *Model) Documents() ([]Info, error) {
	listed, err := m.documents().local.List(ValidDocumentID)
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, l := range listed {
		var info Info
		if json.Unmarshal(l.Meta, &info) != nil || info.ID != l.ID {
			continue // not a (complete) document
		}
		out = append(out, info)
	}
	return out, nil
}

// deleteDocumentLocal is DeleteDocument on the local tier only.
func (m *Model) deleteDocumentLocal(id string) error {
	if !ValidDocumentID(id) {
		return fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	st := m.documents()
	st.writeMu.Lock()
	defer st.writeMu.Unlock()
	resident := st.bump(id)
	err := st.local.Delete(context.Background(), id)
	// Again once the files are gone: a load that read them after the first
	// bump may have made the document resident again.
	st.bump(id)
	if store.IsNotFound(err) {
		if resident {
			return nil
		}
		return fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	return err
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
	s, err := m.DocumentSessionContext(ctx, doc, opts.PolicyOptions)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return s.Generate(ctx, q, opts.GenerateOptions)
}

// DocumentSession returns a session that starts with doc's tokens and pages
// and attends under the given policy.
func (m *Model) DocumentSession(doc *Document, o PolicyOptions) (*Session, error) {
	return m.DocumentSessionContext(context.Background(), doc, o)
}

// DocumentSessionContext is DocumentSession; ctx bounds the one-time work
// a method may need on the document first (probe's representatives for a
// document ingested without them: a prefill).
func (m *Model) DocumentSessionContext(ctx context.Context, doc *Document, o PolicyOptions) (*Session, error) {
	o, err := m.withProbeReps(ctx, doc, o)
	if err != nil {
		return nil, err
	}
	if method, _, err := paging.Parse(o.Policy); err == nil && method == "squeezed" && o.Extra[squeezed.OptionKey] == nil {
		if doc.clusters == nil {
			return nil, fmt.Errorf("document %s has no Squeezed-Attention clusters: ingest it again with runtime Options.Squeezed set (serve --squeezed)", doc.ID)
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
	// Pinned until the session closes: a document in use is never evicted.
	release := m.pin(doc)
	cache, err := m.newPaged(pol, capacity, doc.store)
	if err != nil {
		release()
		return nil, err
	}
	return &Session{m: m, cache: cache, tokens: slices.Clone(doc.tokens), capacity: capacity, release: release, pstep: newPagedStep(cache)}, nil
}

// LoadedDocuments describes the documents this process holds in host memory.
func (m *Model) LoadedDocuments() []Info {
	st := m.documents()
	st.mu.Lock()
	defer st.mu.Unlock()
	out := make([]Info, 0, len(st.resident))
	for _, d := range st.resident {
		out = append(out, d.Info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// documentInfoLocal is DocumentInfo on the local tier only.
func (m *Model) documentInfoLocal(id string) (Info, error) {
	if !ValidDocumentID(id) {
		return Info{}, fmt.Errorf("%w: %q", ErrNoDocument, id)
	}
	st := m.documents()
	for try := 0; ; try++ {
		st.mu.Lock()
		if d, ok := st.resident[id]; ok {
			st.mu.Unlock()
			return d.Info, nil
		}
		v := st.versions[id]
		st.mu.Unlock()
		in, err := m.statDocument(id)
		st.mu.Lock()
		changed := st.versions[id] != v
		st.mu.Unlock()
		if !changed || try == maxLoadRetry {
			return in, err
		}
	}
}

// statDocument checks id's metadata and its page file's header and size,
// without reading its pages.
func (m *Model) statDocument(id string) (Info, error) {
	var info Info
	var fnErr error // fully worded already
	err := m.documents().local.View(context.Background(), id, func(v store.Version) error {
		fnErr = m.statVersion(id, v, &info)
		return fnErr
	})
	if fnErr != nil {
		return Info{}, fnErr
	}
	if err != nil {
		return Info{}, m.localErr(id, err)
	}
	return info, nil
}

// statVersion checks the local tier's version v of id, into *out.
func (m *Model) statVersion(id string, v store.Version, out *Info) error {
	info, err := m.checkMeta(id, v.Meta)
	if err != nil {
		return err
	}
	*out = info
	pages, _ := v.File(store.PagesFile)
	pinfo, err := kvcache.ReadPageFileInfo(pages.Path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("document %s: %w: its page file is missing", id, kvcache.ErrCorrupt)
	}
	if err != nil {
		return fmt.Errorf("document %s: %w", id, err)
	}
	if pinfo.Fingerprint != m.fp || pinfo.Tokens != info.Tokens || pinfo.Pages != info.Pages || pinfo.Layout.PageSize != info.PageSize {
		return fmt.Errorf("document %s: %w: pages do not match the metadata", id, kvcache.ErrCorrupt)
	}
	return nil
}
