package runtime

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kvrecall/kvrecall/store"
)

// ErrStoreUnavailable is returned for a document that is not on this
// process's local tier while the shared store cannot be reached: it may
// exist, so this is not ErrNoDocument (servers answer 503, not 404).
var ErrStoreUnavailable = errors.New("the shared document store is unavailable")

// sharedState is the model's side of Options.Store.
type sharedState struct {
	// fetchMu makes one fetch at a time: two questions on a document that
	// is not local yet fetch it once (the second finds it local).
	fetchMu sync.Mutex

	mu      sync.Mutex
	lastErr error // the last failure to reach the store (nil after a success)
	when    time.Time
}

func (s *sharedState) record(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil || errors.Is(err, store.ErrUnavailable) {
		s.lastErr, s.when = err, time.Now()
	}
}

// contentKey is a document's shared address: the model fingerprint, the
// token sequence and every setting that changes the stored bytes (page
// size, KV type, the page file's format, the prefill's kind, clustering).
//
// repsKey is the representatives file an ingest with ProbeReps builds
// (probeRepsName of the filled settings: the defaults applied, so that
// equal bytes get one key), empty without them.
func (m *Model) contentKey(toks []int32, o IngestOptions, repsKey string) string {
	settings := []string{
		fmt.Sprintf("page_size=%d", m.opts.PageSize),
		"kv=" + m.opts.KVType,
		"page_file=kvrpages-v1",
	}
	if o.Streaming {
		settings = append(settings, fmt.Sprintf("streaming=%d/%d/%d/%+v", o.Budget, o.Sinks, o.Window, o.Probe))
	}
	if repsKey != "" && !o.Streaming {
		// The copy carries a representatives file: one without it would
		// leave a second prefill to the first probe question.
		settings = append(settings, "probe_reps="+repsKey)
	}
	if o.Hyper != nil {
		b, _ := json.Marshal(*o.Hyper)
		settings = append(settings, "hyper="+string(b))
	}
	if m.opts.Squeezed != nil {
		b, _ := json.Marshal(*m.opts.Squeezed)
		settings = append(settings, "squeezed="+string(b))
	}
	return store.ContentKey(hex.EncodeToString(m.fp[:]), tokensHash(toks), settings...)
}

// sharedTier is the shared store as the model's second document tier
// (store.Shared: its ids namespaced by the model's fingerprint).
func (m *Model) sharedTier() *store.Shared {
	return store.NewShared(m.opts.Store, hex.EncodeToString(m.fp[:]))
}

// fetchShared installs the shared copy under content as document id on
// the local tier and opens it (every page checksum verified again): the
// local disk is the cache in front of the shared store.
func (m *Model) fetchShared(ctx context.Context, id, content string) (*Document, error) {
	var info Info
	var files []store.File
	err := m.sharedTier().ViewContent(ctx, content, func(v store.Version) error {
		if err := json.Unmarshal(v.Meta, &info); err != nil {
			return fmt.Errorf("document %s: shared copy %s: metadata: %v", id, content, err)
		}
		files = v.Files
		return nil
	})
	m.shared.record(err)
	if err != nil {
		return nil, err
	}
	if info.Fingerprint != hex.EncodeToString(m.fp[:]) || info.PageSize != m.opts.PageSize {
		// The content key covers both: a writer that disagrees is broken.
		return nil, fmt.Errorf("document %s: shared copy %s was stored for another model or page size", id, content)
	}
	info.ID, info.ContentKey, info.Source = id, content, "shared"
	v := store.Version{Files: files}
	_, hasPages := v.File(store.PagesFile)
	_, hasClusters := v.File(store.ClustersFile)
	if !hasPages || (info.HasClusters && !hasClusters) {
		return nil, fmt.Errorf("document %s: shared copy %s lacks its page file or clusters", id, content)
	}
	// Only the files the local tier knows (a newer writer's extra files
	// are not this build's to keep).
	var keep []store.File
	for _, f := range files {
		if f.Name == store.PagesFile || f.Name == store.ClustersFile || store.IsSideFile(f.Name) {
			keep = append(keep, f)
		}
	}
	if err := m.commitDocument(info, nil, keep); err != nil {
		return nil, err
	}
	return m.openDocumentLocal(id)
}

// fetchSharedByName fetches document id through the shared store's name
// index: when it is not on the local tier (stale == ""), or when the local
// copy has content address stale and the store names a newer version.
// ErrNoDocument when no instance stored it or its copy was damaged
// (reported), ErrStoreUnavailable when the store cannot be reached.
func (m *Model) fetchSharedByName(id, stale string) error {
	st := m.opts.Store
	m.shared.fetchMu.Lock()
	defer m.shared.fetchMu.Unlock()
	local, lerr := m.documentInfoLocal(id)
	switch {
	case stale == "" && !errors.Is(lerr, ErrNoDocument):
		return lerr // fetched meanwhile, or a local problem to report
	case stale != "" && (lerr != nil || local.ContentKey != stale):
		return nil // replaced meanwhile
	}
	// Bounded: a question must not hang on a store that stopped answering.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Resolved under fetchMu, which this instance's ingests hold from their
	// local commit until their name is set: a name read here is never one
	// that an ingest here is about to overwrite.
	content, err := m.sharedTier().Resolve(ctx, id)
	if err == nil && content == stale {
		return nil
	}
	if err == nil {
		_, err = m.fetchShared(ctx, id, content)
	} else {
		m.shared.record(err)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("%w: %q", ErrNoDocument, id)
	case errors.Is(err, store.ErrDamaged):
		return fmt.Errorf("%w: %q: %v", ErrNoDocument, id, err)
	case errors.Is(err, store.ErrUnavailable):
		return fmt.Errorf("document %s is not on this instance and %w (%s): %v", id, ErrStoreUnavailable, st, err)
	}
	return err
}

// checkFresh replaces d by the shared store's version when another
// instance re-ingested its id with other content since. A store that
// cannot be reached leaves d as it is (the local fallback, docs/store.md).
func (m *Model) checkFresh(d *Document) (*Document, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	content, err := m.sharedTier().Resolve(ctx, d.ID)
	cancel()
	m.shared.record(err)
	if err != nil || content == d.ContentKey {
		return d, nil
	}
	if err := m.fetchSharedByName(d.ID, d.ContentKey); err != nil {
		return nil, err
	}
	return m.openDocumentLocal(d.ID)
}

// publishShared stores d's files (as written on the local tier) in the
// shared tier and points its id at them. Another process's copy of the
// same content is kept if it was there first.
func (m *Model) publishShared(ctx context.Context, d *Document) {
	files, err := m.localFiles(d)
	if err != nil {
		m.shared.record(fmt.Errorf("%w: document %s: %v", store.ErrUnavailable, d.ID, err))
		return
	}
	meta, _ := json.Marshal(d.Info)
	ctx = context.WithoutCancel(ctx) // the ingest is done; a client leaving now must not cut the write
	m.shared.record(m.sharedTier().Put(ctx, d.ID, store.Version{Content: d.ContentKey, Meta: meta, Files: files}))
}

// nameShared points id at content in the store's name index: the last
// ingest of an id, on any instance, names what every instance answers.
func (m *Model) nameShared(ctx context.Context, id, content string) {
	m.shared.record(m.opts.Store.SetName(context.WithoutCancel(ctx), hex.EncodeToString(m.fp[:]), id, content))
}

// localFiles reads back d's page file, clusters and side files (probe
// representatives) from the local tier, under its read lock.
func (m *Model) localFiles(d *Document) ([]store.File, error) {
	var files []store.File
	err := m.documents().local.View(context.Background(), d.ID, func(v store.Version) error {
		if v.Content != d.ContentKey {
			return errors.New("replaced while being stored")
		}
		if _, ok := v.File(store.ClustersFile); d.HasClusters && !ok {
			return errors.New("its clusters file is missing")
		}
		for _, f := range v.Files {
			b, err := f.Bytes()
			if err != nil {
				return err
			}
			files = append(files, store.File{Name: f.Name, Data: b})
		}
		return nil
	})
	return files, err
}

// OpenDocument returns an ingested document: from memory, from the local
// disk (verifying every page checksum), or, with a shared store, fetched
// from it (every chunk verified) and kept on the local disk. With a store,
// a local copy whose id another instance has since re-ingested with other
// content is replaced by that version.
func (m *Model) OpenDocument(id string) (*Document, error) {
	d, err := m.openDocumentLocal(id)
	if err == nil && m.opts.Store != nil && d.ContentKey != "" {
		// One GET per question: the local copy may have been replaced
		// on another instance.
		return m.checkFresh(d)
	}
	if !errors.Is(err, ErrNoDocument) || m.opts.Store == nil || !ValidDocumentID(id) {
		return d, err
	}
	if err := m.fetchSharedByName(id, ""); err != nil {
		return nil, err
	}
	return m.openDocumentLocal(id)
}

// DocumentInfo describes a stored document without loading its pages. Its
// page file's header and size are checked (page checksums are checked when
// the document is opened). A document only in the shared store is fetched
// to the local tier first.
func (m *Model) DocumentInfo(id string) (Info, error) {
	in, err := m.documentInfoLocal(id)
	if !errors.Is(err, ErrNoDocument) || m.opts.Store == nil || !ValidDocumentID(id) {
		return in, err
	}
	if err := m.fetchSharedByName(id, ""); err != nil {
		return Info{}, err
	}
	return m.documentInfoLocal(id)
}

// DeleteDocument removes a document from memory and disk, and its id from
// the shared store (the content stays for other ids; Redis's eviction
// reclaims it). Whatever is left of a document on disk (page files without
// metadata, temporary files) is removed as well; ErrNoDocument means there
// was nothing under id.
func (m *Model) DeleteDocument(id string) error {
	err := m.deleteDocumentLocal(id)
	st := m.opts.Store
	if st == nil || !ValidDocumentID(id) {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rerr := m.sharedTier().Delete(ctx, id)
	if rerr == nil && errors.Is(err, ErrNoDocument) {
		err = nil // it was only in the shared store
	}
	m.shared.record(rerr)
	if errors.Is(rerr, store.ErrUnavailable) && err == nil {
		return fmt.Errorf("document %s was deleted here, but %w (%s) and other instances may still serve it: %v", id, ErrStoreUnavailable, st, rerr)
	}
	return err
}

// StoreStatus describes the shared store, for /health.
type StoreStatus struct {
	URL       string `json:"url"`
	Available bool   `json:"available"`
	// Error says why it is not, and that documents are then served from
	// the local tier only.
	Error     string      `json:"error,omitempty"`
	LastError string      `json:"last_error,omitempty"` // the last failed operation, if any since the last success
	Stats     store.Stats `json:"stats"`
}

// StoreStatus pings the shared store; nil when the model has none.
func (m *Model) StoreStatus(ctx context.Context) *StoreStatus {
	st := m.opts.Store
	if st == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	out := &StoreStatus{URL: st.String(), Stats: st.Stats()}
	if err := st.Ping(ctx); err != nil {
		out.Error = fmt.Sprintf("%v: serving documents from the local tier only", err)
	} else {
		out.Available = true
	}
	m.shared.mu.Lock()
	if m.shared.lastErr != nil {
		out.LastError = m.shared.lastErr.Error()
	}
	m.shared.mu.Unlock()
	return out
}
