package store

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
)

// Local is the Tier on this machine's disk: the data folder. Its layout is
// the one kvrecall has always written, so existing folders keep loading:
//
//	<dir>/.lock                     advisory lock of the owning process
//	<dir>/<id>/doc.json             the metadata; names the version's page file
//	<dir>/<id>/pages-<random>.kvp   the version's page file ("pages")
//	<dir>/<id>/pages-<random>.kvs   its clusters ("clusters"), if any
//	<dir>/<id>/probe-b*-r*-w*.kvr   side files, kept across versions
//	<dir>/<id>/pages.kvp            the page file before page files were versioned
//
// A Put writes the new version's files under new names, then doc.json (each
// to a temporary file, synced, renamed, the folder synced), and only then
// removes the previous version's files: a crash at any point leaves the old
// version or the new one, whole. Temporary files and page files that no
// doc.json names are what a crash leaves behind; the owner of the folder
// sweeps them when it opens the folder and on every Delete.
type Local struct {
	dir string
	// lock holds an exclusive flock on dir/.lock while this process owns
	// the folder; nil when another does. Only the owner sweeps: another
	// process's temporary files are its writes in progress.
	lock *os.File

	// writeMu serializes Puts and Deletes, so that the files of one id
	// change one operation at a time and a sweep never meets a Put.
	writeMu sync.Mutex
	// filesMu keeps readers from seeing files half removed: View holds it
	// shared, the removal of a replaced or deleted version exclusive.
	filesMu sync.RWMutex

	// Committed, if set, is called with an id once a Put's metadata is
	// renamed into place and before the previous version's files are
	// removed: a cache of loaded documents invalidates there, so that a
	// load that read the old metadata and then misses its files knows to
	// retry.
	Committed func(id string)
}

// On-disk names and permissions (documents hold their text: owner only).
const (
	docMeta     = "doc.json"
	legacyPages = "pages.kvp" // the name before page files were versioned
	dirLockName = ".lock"
	tempInfix   = ".tmp-" // atomicfile's temporary names
	DirPerm     = 0o700
	FilePerm    = 0o600
)

var (
	pagesName = regexp.MustCompile(`^pages(-[0-9a-f]{16})?\.kvp$`)
	// clustersName: pages-X.kvs belongs to pages-X.kvp.
	clustersName = regexp.MustCompile(`^pages(-[0-9a-f]{16})?\.kvs$`)
	// sideName: side files are named by their settings and valid for every
	// version of the same text (probe representatives).
	sideName = regexp.MustCompile(`^probe-b[0-9]+-r[0-9]+-w[0-9]+\.kvr$`)
)

// IsSideFile says whether name can be a side file of a Local version.
func IsSideFile(name string) bool { return sideName.MatchString(name) && !isTemp(name) }

// ErrBadMetadata is wrapped by errors about a doc.json that cannot be used.
var ErrBadMetadata = errors.New("metadata")

// localMeta is the part of doc.json that Local reads; the rest is the
// caller's metadata, stored beside it.
type localMeta struct {
	PagesFile  string `json:"pages_file,omitempty"`
	ContentKey string `json:"content_key,omitempty"`
}

func (m localMeta) pagesFile() string {
	if m.PagesFile == "" {
		return legacyPages
	}
	return m.PagesFile
}

func clustersOf(pagesFile string) string { return strings.TrimSuffix(pagesFile, ".kvp") + ".kvs" }

func isTemp(name string) bool { return strings.Contains(name, tempInfix) }

// OpenLocal returns the Local tier in dir, creating it, taking the folder's
// lock if no other process holds it, and then sweeping what interrupted
// writes left. A folder that cannot be created or locked still opens:
// reads report the problem, and only the owner sweeps.
func OpenLocal(dir string) *Local {
	l := &Local{dir: dir}
	if err := os.MkdirAll(dir, DirPerm); err != nil {
		return l
	}
	f, err := os.OpenFile(filepath.Join(dir, dirLockName), os.O_CREATE|os.O_RDWR, FilePerm)
	if err != nil {
		return l
	}
	if !lockFile(f) {
		f.Close()
		return l
	}
	l.lock = f
	l.sweep()
	return l
}

// Close releases the folder's lock.
func (l *Local) Close() error {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	if l.lock != nil {
		l.lock.Close()
		l.lock = nil
	}
	return nil
}

// Owner says whether this process holds the folder's lock.
func (l *Local) Owner() bool {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	return l.lock != nil
}

func (l *Local) String() string { return "local:" + l.dir }

// Dir is the data folder.
func (l *Local) Dir() string { return l.dir }

// validID keeps an id to one folder name inside the data folder.
func validID(id string) bool {
	return id != "" && id != "." && id != ".." && !strings.ContainsAny(id, `/\`) && !strings.HasPrefix(id, ".") && !isTemp(id)
}

func (l *Local) docDir(id string) string { return filepath.Join(l.dir, id) }

// readMeta reads and parses dir/doc.json: the Local part and the raw JSON.
func readMeta(dir string) (localMeta, json.RawMessage, error) {
	var meta localMeta
	b, err := os.ReadFile(filepath.Join(dir, docMeta))
	if err != nil {
		return meta, nil, err
	}
	if err := json.Unmarshal(b, &meta); err != nil {
		return localMeta{}, nil, fmt.Errorf("%w: %v", ErrBadMetadata, err)
	}
	if !pagesName.MatchString(meta.pagesFile()) {
		return localMeta{}, nil, fmt.Errorf("%w names page file %q", ErrBadMetadata, meta.PagesFile)
	}
	return meta, b, nil
}

// newPagesName names a new version's page file.
func newPagesName() string {
	var b [8]byte
	rand.Read(b[:])
	return "pages-" + hex.EncodeToString(b[:]) + ".kvp"
}

// Put writes v as id's new version: its page file and clusters under new
// names, then doc.json (v.Meta with the page file's name and v.Content
// added), the commit point; then the previous version's page file and
// clusters are removed and the side files written (best effort). On an error before the commit the previous version
// is untouched. A failed folder sync after doc.json's rename leaves the new
// version visible, so Put then succeeds.
func (l *Local) Put(ctx context.Context, id string, v Version) error {
	if !validID(id) {
		return fmt.Errorf("save document %q: invalid id", id)
	}
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	pagesF, ok := v.File(PagesFile)
	if !ok {
		return fmt.Errorf("save document %s: no page file", id)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(v.Meta, &fields); err != nil {
		return fmt.Errorf("save document %s: metadata: %v", id, err)
	}
	dir := l.docDir(id)
	if err := os.MkdirAll(l.dir, DirPerm); err != nil {
		return fmt.Errorf("save document %s: %w", id, err)
	}
	if err := os.Mkdir(dir, DirPerm); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("save document %s: %w", id, err)
	}
	old, _, oldErr := readMeta(dir)
	fail := func(err error) error {
		if errors.Is(oldErr, os.ErrNotExist) {
			os.Remove(dir) // a first ingest leaves no empty folder (kept if not empty)
		}
		return fmt.Errorf("save document %s: %w", id, err)
	}
	name := newPagesName()
	pages := filepath.Join(dir, name)
	clusters := filepath.Join(dir, clustersOf(name))
	write := func(path string, f File) error {
		return atomicfile.Write(path, FilePerm, func(out *os.File) error {
			w := bufio.NewWriterSize(out, 1<<20)
			if err := f.writeTo(w); err != nil {
				return err
			}
			return w.Flush()
		})
	}
	if err := write(pages, pagesF); err != nil {
		return fail(err)
	}
	var sides []File
	for _, f := range v.Files {
		var err error
		switch {
		case f.Name == PagesFile:
			continue
		case f.Name == ClustersFile:
			err = write(clusters, f)
		case IsSideFile(f.Name):
			sides = append(sides, f) // after the commit, below
		default:
			err = fmt.Errorf("unknown file %q", f.Name)
		}
		if err != nil {
			os.Remove(pages)
			os.Remove(clusters)
			return fail(err)
		}
	}
	fields["pages_file"], _ = json.Marshal(name)
	if v.Content != "" {
		fields["content_key"], _ = json.Marshal(v.Content)
	}
	b, err := json.MarshalIndent(fields, "", "  ")
	if err == nil {
		err = atomicfile.WriteBytes(filepath.Join(dir, docMeta), b, FilePerm)
	}
	if err != nil {
		// A failed directory sync comes after the rename: then the new
		// version is what a reader sees, and the caller must agree.
		if now, _, rerr := readMeta(dir); rerr != nil || now.PagesFile != name {
			os.Remove(pages)
			os.Remove(clusters)
			return fail(err)
		}
	}
	if l.Committed != nil {
		l.Committed(id)
	}
	if oldErr == nil && old.pagesFile() != name {
		l.filesMu.Lock()
		os.Remove(filepath.Join(dir, old.pagesFile()))
		os.Remove(filepath.Join(dir, clustersOf(old.pagesFile())))
		l.filesMu.Unlock()
	}
	// Side files last: a failed Put must not leave one in the folder (a
	// first Put's folder would stay), and they are derived data that their
	// reader checks against the text and recomputes when missing or stale
	// (probe representatives), so one that cannot be written now is left
	// out rather than failing a committed version.
	for _, f := range sides {
		write(filepath.Join(dir, f.Name), f)
	}
	return nil
}

// View calls fn with id's current version: v.Meta is doc.json as stored,
// the files are paths on disk (the page file's is given even if it is
// missing: its reader reports that; clusters only if present). fn runs
// under the lock that a replacement's removal of old files takes.
func (l *Local) View(ctx context.Context, id string, fn func(Version) error) error {
	if !validID(id) {
		return errNotFound(id)
	}
	l.filesMu.RLock()
	defer l.filesMu.RUnlock()
	dir := l.docDir(id)
	meta, raw, err := readMeta(dir)
	if errors.Is(err, os.ErrNotExist) {
		return errNotFound(id)
	}
	if err != nil {
		return err
	}
	v := Version{Content: meta.ContentKey, Meta: raw,
		Files: []File{{Name: PagesFile, Path: filepath.Join(dir, meta.pagesFile())}}}
	if c := filepath.Join(dir, clustersOf(meta.pagesFile())); fileExists(c) {
		v.Files = append(v.Files, File{Name: ClustersFile, Path: c})
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if IsSideFile(e.Name()) {
			v.Files = append(v.Files, File{Name: e.Name(), Path: filepath.Join(dir, e.Name())})
		}
	}
	return fn(v)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// SidePath is where id's side file name lives (read it with its format's
// reader; it may be missing).
func (l *Local) SidePath(id, name string) string { return filepath.Join(l.docDir(id), name) }

// WriteSide adds side file name to id's current version with write(path)
// (an atomic write), under the lock that Delete takes, so that a delete
// never races it.
func (l *Local) WriteSide(id, name string, write func(path string) error) error {
	if !validID(id) || !IsSideFile(name) {
		return fmt.Errorf("document %s: invalid side file %q", id, name)
	}
	l.filesMu.RLock()
	defer l.filesMu.RUnlock()
	return write(l.SidePath(id, name))
}

// Delete removes id's folder: doc.json first, so that a half-deleted
// document is never visible, even to another process; then the rest, and
// whatever a crash left (page files without doc.json, temporary files).
func (l *Local) Delete(ctx context.Context, id string) error {
	if !validID(id) {
		return errNotFound(id)
	}
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	dir := l.docDir(id)
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return errNotFound(id)
	}
	l.filesMu.Lock()
	err := os.Remove(filepath.Join(dir, docMeta))
	if err == nil || errors.Is(err, os.ErrNotExist) {
		err = os.RemoveAll(dir)
	}
	l.filesMu.Unlock()
	if err != nil {
		return fmt.Errorf("delete document %s: %w", id, err)
	}
	atomicfile.SyncDir(l.dir)
	if l.lock != nil {
		l.sweep()
	}
	return nil
}

// Listed is one complete document in the folder.
type Listed struct {
	ID   string
	Meta json.RawMessage
}

// List returns the documents whose doc.json is readable and whose page
// file exists, by id. valid filters folder names (the caller's id rules).
func (l *Local) List(valid func(id string) bool) ([]Listed, error) {
	entries, err := os.ReadDir(l.dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Listed
	for _, e := range entries {
		if !e.IsDir() || !validID(e.Name()) || (valid != nil && !valid(e.Name())) {
			continue
		}
		dir := l.docDir(e.Name())
		meta, raw, err := readMeta(dir)
		if err != nil || !fileExists(filepath.Join(dir, meta.pagesFile())) {
			continue // not a (complete) document
		}
		out = append(out, Listed{ID: e.Name(), Meta: raw})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// sweep removes what interrupted writes left: temporary files, and page
// files (with their clusters) that no doc.json names (a crashed
// replacement's new pages, a crashed delete's remains). A folder without
// doc.json is not a document; it goes once empty. Unreadable metadata is
// left for a person to look at. Callers hold the folder lock and writeMu
// (or are OpenLocal).
func (l *Local) sweep() {
	entries, err := os.ReadDir(l.dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		switch {
		case isTemp(name):
			os.RemoveAll(filepath.Join(l.dir, name))
		case e.IsDir() && validID(name):
			l.sweepDocument(name)
		}
	}
}

func (l *Local) sweepDocument(id string) {
	dir := l.docDir(id)
	meta, raw, err := readMeta(dir)
	orphan := errors.Is(err, os.ErrNotExist)
	live := ""
	if err == nil && hasID(raw) {
		live = meta.pagesFile()
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
			stale = orphan || (live != "" && n != live)
		case clustersName.MatchString(n):
			// A crashed replacement's clusters, or an older version's.
			stale = orphan || (live != "" && n != clustersOf(live))
		case sideName.MatchString(n):
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

// hasID says whether doc.json names an id: metadata that does not is not
// trusted to say which page file is live (every one is kept).
func hasID(raw json.RawMessage) bool {
	var v struct {
		ID string `json:"id"`
	}
	return json.Unmarshal(raw, &v) == nil && v.ID != ""
}
