package runtime

import (
	"container/list"
	"sync"

	"github.com/kvrecall/kvrecall/store"
)

// DefaultMaxDocumentBytes is the host memory that opened documents may hold
// when Options.MaxDocumentBytes is 0: about 190 documents of 8k tokens on the
// built-in model, a few of a 1B model.
const DefaultMaxDocumentBytes = 4 << 30

// On disk, documents live in the local tier, store.Local: a folder per
// id holding doc.json and the page file it names, written atomically with
// doc.json last (see store/local.go and docs/server.md "Storage faults").
// With Options.Store the local tier is the cache in front of the shared one
// (shared.go).
const maxLoadRetry = 8

// docStore is the model's documents in host memory: a map by id with an LRU
// list, bounded by Options.MaxDocumentBytes. Documents in use by a session
// are pinned and never evicted; an evicted document stays on disk and
// reloads on its next OpenDocument.
type docStore struct {
	once sync.Once
	// local is the local tier (the data folder), opened on first use.
	local *store.Local

	// writeMu serializes saves and deletes with the bookkeeping below, so
	// that a document saved is made resident before a delete of its id can
	// run (the tier serializes its own file operations too).
	writeMu sync.Mutex

	mu        sync.Mutex
	resident  map[string]*Document
	lru       list.List // of *Document, most recently used first
	bytes     int64
	evictions uint64
	// versions counts the deletes and replacements of each id. A load from
	// disk that overlapped one is discarded (it may have read what was
	// being removed) and retried.
	versions map[string]uint64
}

// docState is a Document's bookkeeping, guarded by docStore.mu.
type docState struct {
	elem    *list.Element // in the LRU while resident
	pins    int           // sessions using the document
	version uint64        // versions[id] when it was loaded or saved
	// ordered is the part of docStore.bytes that is the document's
	// cluster-ordered KV copies (squeezed sessions build them on first
	// use, kvcache.Store.OrderedBytes), as last counted.
	ordered int64
}

// documents returns the store, opening the local tier (which sweeps the
// data folder) on first use.
func (m *Model) documents() *docStore {
	st := &m.docs
	st.once.Do(func() {
		st.resident = map[string]*Document{}
		st.versions = map[string]uint64{}
		l := store.OpenLocal(m.opts.DataDir)
		// A new version is committed: what memory holds of the id is
		// stale, and a load that read the old metadata must retry.
		l.Committed = func(id string) { st.bump(id) }
		st.writeMu.Lock() // closeDocuments reads it without the once
		st.local = l
		st.writeMu.Unlock()
	})
	return st
}

// bump records that id changed (replaced or deleted) and drops it from
// memory; it says whether it was resident.
func (st *docStore) bump(id string) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.versions[id]++
	if d, ok := st.resident[id]; ok {
		st.dropLocked(d)
		return true
	}
	return false
}

// closeDocuments releases the data folder (Model.Close).
func (m *Model) closeDocuments() {
	st := &m.docs
	st.writeMu.Lock()
	l := st.local
	st.writeMu.Unlock()
	if l != nil { // never opened: nothing to release (and no folder to create now)
		l.Close()
	}
}

// admitLocked makes d resident and evicts what the bound requires.
func (st *docStore) admitLocked(m *Model, d *Document) {
	st.resident[d.ID] = d
	d.st.elem = st.lru.PushFront(d)
	st.bytes += d.HostBytes
	d.st.ordered = 0
	st.recountLocked(d)
	st.evictLocked(m, d)
}

// recountLocked brings the bytes counted for resident d up to date with
// the ordered copies its sessions have built since (they are document
// memory: kept for the document's next sessions, so bounded with it).
func (st *docStore) recountLocked(d *Document) {
	if d.st.elem == nil || d.store == nil {
		return
	}
	cur := d.store.OrderedBytes()
	st.bytes += cur - d.st.ordered
	d.st.ordered = cur
}

// dropLocked makes d no longer resident (it may still be pinned).
func (st *docStore) dropLocked(d *Document) {
	if d.st.elem == nil {
		return
	}
	st.lru.Remove(d.st.elem)
	d.st.elem = nil
	st.bytes -= d.HostBytes + d.st.ordered
	d.st.ordered = 0
	if st.resident[d.ID] == d {
		delete(st.resident, d.ID)
	}
}

// evictLocked drops least recently used, unpinned documents other than keep
// until the resident bytes fit the bound. keep is the document being
// returned: it stays even if it alone is over the bound.
func (st *docStore) evictLocked(m *Model, keep *Document) {
	limit := m.opts.MaxDocumentBytes
	if limit < 0 {
		return
	}
	if limit == 0 {
		limit = DefaultMaxDocumentBytes
	}
	for e := st.lru.Back(); e != nil && st.bytes > limit; {
		prev := e.Prev()
		if d := e.Value.(*Document); d != keep && d.st.pins == 0 {
			st.dropLocked(d)
			st.evictions++
		}
		e = prev
	}
}

// pin marks d in use until the returned func is called: it is not evicted
// meanwhile. A pinned document that was evicted before (between
// OpenDocument and its session) becomes resident again unless its id was
// deleted or replaced since, so that it is counted and not loaded twice.
func (m *Model) pin(d *Document) (release func()) {
	st := m.documents()
	st.mu.Lock()
	d.st.pins++
	if d.st.elem != nil {
		st.lru.MoveToFront(d.st.elem)
	} else if _, ok := st.resident[d.ID]; !ok && st.versions[d.ID] == d.st.version {
		st.admitLocked(m, d)
	}
	st.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			st.mu.Lock()
			d.st.pins--
			st.recountLocked(d)
			if d.st.pins == 0 {
				st.evictLocked(m, nil)
			}
			st.mu.Unlock()
		})
	}
}

// DocumentMemory describes the documents held in host memory.
type DocumentMemory struct {
	Documents int    // resident documents
	Bytes     int64  // their pages' bytes, and the cluster-ordered KV copies their squeezed sessions built (counted when a session closes)
	Limit     int64  // Options.MaxDocumentBytes in effect; negative: none
	Evictions uint64 // documents dropped from memory for the bound so far
}

// DocumentMemory reports the documents held in host memory.
func (m *Model) DocumentMemory() DocumentMemory {
	st := m.documents()
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, d := range st.resident {
		st.recountLocked(d)
	}
	limit := m.opts.MaxDocumentBytes
	if limit == 0 {
		limit = DefaultMaxDocumentBytes
	}
	return DocumentMemory{Documents: len(st.resident), Bytes: st.bytes, Limit: limit, Evictions: st.evictions}
}
