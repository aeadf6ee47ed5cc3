package runtime

import (
	"container/list"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"github.com/kvrecall/kvrecall/kvcache"
)

// DefaultMaxDocumentBytes is the host memory that opened documents may hold
// when Options.MaxDocumentBytes is 0: about 190 documents of 8k tokens on the
// built-in model, a few of a 1B model.
const DefaultMaxDocumentBytes = 4 << 30

// On disk, a document is a folder named by its id holding doc.json and the
// page file that doc.json names. A replacement writes a page file under a new
// name, then doc.json (each to a temporary file, synced, renamed), and only
// then removes the old page file: a crash at any point leaves the old
// version or the new one, whole. Temporary files and page files that no
// doc.json names are what a crash leaves behind; they are swept when the
// process first uses its documents and on every delete.
const (
	docMeta      = "doc.json"
	legacyPages  = "pages.kvp" // the name before page files were versioned
	dirLockName  = ".lock"
	tempInfix    = ".tmp-" // atomicfile's temporary names
	docDirPerm   = 0o700   // documents hold their text: owner only
	docFilePerm  = 0o600
	maxLoadRetry = 8
)

var pagesName = regexp.MustCompile(`^pages(-[0-9a-f]{16})?\.kvp$`)

// clustersName matches a page file version's Squeezed-Attention clusters
// (pages-X.kvs belongs to pages-X.kvp), probeName probe representatives
// (named by their settings, valid for every version of the same text).
var (
	clustersName = regexp.MustCompile(`^pages(-[0-9a-f]{16})?\.kvs$`)
	probeName    = regexp.MustCompile(`^probe-b[0-9]+-r[0-9]+-w[0-9]+\.kvr$`)
)

// storedMeta is doc.json: the document's Info and its page file.
type storedMeta struct {
	Info
	PagesFile string `json:"pages_file,omitempty"`
}

func (s storedMeta) pagesFile() string {
	if s.PagesFile == "" {
		return legacyPages
	}
	return s.PagesFile
}

// docStore is the model's documents in host memory: a map by id with an LRU
// list, bounded by Options.MaxDocumentBytes. Documents in use by a session
// are pinned and never evicted; an evicted document stays on disk and
// reloads on its next OpenDocument.
type docStore struct {
	once sync.Once
	// lock holds an exclusive flock on DataDir/.lock while this model owns
	// the folder; nil when another process does. Only the owner sweeps:
	// another process's temporary files are its ingests in progress.
	lock *os.File

	// writeMu serializes saves and deletes, so that the files of one id
	// change one operation at a time and a sweep never meets a save.
	writeMu sync.Mutex
	// filesMu keeps readers from seeing files half removed: loads hold it
	// shared while they read, deletes and the removal of a replaced page
	// file hold it exclusive.
	filesMu sync.RWMutex

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
}

// documents returns the store, sweeping the data folder on first use.
func (m *Model) documents() *docStore {
	st := &m.docs
	st.once.Do(func() {
		st.resident = map[string]*Document{}
		st.versions = map[string]uint64{}
		if err := os.MkdirAll(m.opts.DataDir, docDirPerm); err != nil {
			return // reads report the problem; nothing to sweep
		}
		f, err := os.OpenFile(filepath.Join(m.opts.DataDir, dirLockName), os.O_CREATE|os.O_RDWR, docFilePerm)
		if err != nil {
			return
		}
		if !lockFile(f) {
			f.Close()
			return
		}
		st.lock = f
		m.sweepDocuments()
	})
	return st
}

// closeDocuments releases the data folder (Model.Close).
func (m *Model) closeDocuments() {
	st := &m.docs
	st.writeMu.Lock()
	defer st.writeMu.Unlock()
	if st.lock != nil {
		st.lock.Close()
		st.lock = nil
	}
}

func isTemp(name string) bool { return strings.Contains(name, tempInfix) }

// sweepDocuments removes what interrupted writes left: temporary files, and
// page files (with their clusters) that no doc.json names (a crashed
// replacement's new pages, a crashed delete's remains). A folder without doc.json is not a document;
// it goes once empty. Unreadable metadata is left for a person to look at.
// Callers hold the folder lock and either writeMu or the once.
func (m *Model) sweepDocuments() {
	entries, err := os.ReadDir(m.opts.DataDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		switch {
		case isTemp(name):
			os.RemoveAll(filepath.Join(m.opts.DataDir, name))
		case e.IsDir() && ValidDocumentID(name):
			m.sweepDocument(name)
		}
	}
}

func (m *Model) sweepDocument(id string) {
	dir := m.docDir(id)
	meta, err := readMeta(dir)
	orphan := errors.Is(err, os.ErrNotExist)
	if err != nil && !orphan {
		meta.PagesFile = "" // keep every page file: which one is live is unknown
	}
	files, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, f := range files {
		n := f.Name()
		var stale bool
		switch {
		case pagesName.MatchString(n):
			stale = orphan || (meta.ID != "" && n != meta.pagesFile())
		case clustersName.MatchString(n):
			// A crashed replacement's clusters, or an older version's.
			stale = orphan || (meta.ID != "" && n != clustersFile(meta.pagesFile()))
		case probeName.MatchString(n):
			stale = orphan
		}
		if isTemp(n) || stale {
			os.Remove(filepath.Join(dir, n))
		}
	}
	if orphan {
		os.Remove(dir) // only if empty: other files are not ours to judge
	}
}

// readMeta reads and parses dir/doc.json.
func readMeta(dir string) (storedMeta, error) {
	var meta storedMeta
	b, err := os.ReadFile(filepath.Join(dir, docMeta))
	if err != nil {
		return meta, err
	}
	if err := json.Unmarshal(b, &meta); err != nil {
		return storedMeta{}, fmt.Errorf("%w: metadata: %v", kvcache.ErrCorrupt, err)
	}
	if !pagesName.MatchString(meta.pagesFile()) {
		return storedMeta{}, fmt.Errorf("%w: metadata names page file %q", kvcache.ErrCorrupt, meta.PagesFile)
	}
	return meta, nil
}

// newPagesName names a new version's page file.
func newPagesName() string {
	var b [8]byte
	rand.Read(b[:])
	return "pages-" + hex.EncodeToString(b[:]) + ".kvp"
}

// admitLocked makes d resident and evicts what the bound requires.
func (st *docStore) admitLocked(m *Model, d *Document) {
	st.resident[d.ID] = d
	d.st.elem = st.lru.PushFront(d)
	st.bytes += d.HostBytes
	st.evictLocked(m, d)
}

// dropLocked makes d no longer resident (it may still be pinned).
func (st *docStore) dropLocked(d *Document) {
	if d.st.elem == nil {
		return
	}
	st.lru.Remove(d.st.elem)
	d.st.elem = nil
	st.bytes -= d.HostBytes
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
	Bytes     int64  // their pages' bytes
	Limit     int64  // Options.MaxDocumentBytes in effect; negative: none
	Evictions uint64 // documents dropped from memory for the bound so far
}

// DocumentMemory reports the documents held in host memory.
func (m *Model) DocumentMemory() DocumentMemory {
	st := m.documents()
	st.mu.Lock()
	defer st.mu.Unlock()
	limit := m.opts.MaxDocumentBytes
	if limit == 0 {
		limit = DefaultMaxDocumentBytes
	}
	return DocumentMemory{Documents: len(st.resident), Bytes: st.bytes, Limit: limit, Evictions: st.evictions}
}
