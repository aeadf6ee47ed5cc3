package runtime_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

const storeDocLen = 1000

// storeFixture holds two versions of one document's tokens, for replace tests.
type storeFixture struct {
	*docFixture
	v [2][]int32
}

func newStoreFixture(t *testing.T) *storeFixture {
	fx := newDocFixture(t, t.TempDir(), storeDocLen, []float64{0.5})
	other, err := fx.voc.NewCase(storeDocLen, []float64{0.3}, 7)
	require.NoError(t, err)
	return &storeFixture{docFixture: fx, v: [2][]int32{fx.c.Tokens, other.Tokens}}
}

// open is a restart: a new Model over the same data folder.
func (fx *storeFixture) open(t *testing.T, opts runtime.Options) *runtime.Model {
	t.Helper()
	opts.Threads, opts.ContextLength, opts.DataDir = 2, storeDocLen+64, fx.dir
	m, err := runtime.Open(context.Background(), fx.path, opts)
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return m
}

// tokensHash is IngestTokens's TextSHA256.
func tokensHash(toks []int32) string {
	h := sha256.New()
	for _, t := range toks {
		fmt.Fprintf(h, "%d,", t)
	}
	return "tokens:" + hex.EncodeToString(h.Sum(nil))
}

// version says which version of "doc" m serves (-1: none), after checking
// that memory, metadata, pages and listing agree and that nothing a crash
// leaves behind remains on disk.
func (fx *storeFixture) version(t *testing.T, m *runtime.Model) int {
	t.Helper()
	infos, err := m.Documents() // the first use of the documents sweeps
	require.NoError(t, err)
	var leftovers []string
	filepath.WalkDir(fx.dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.Contains(d.Name(), ".tmp-") {
			leftovers = append(leftovers, p)
		}
		return nil
	})
	require.Empty(t, leftovers, "temporary files are swept")
	d, err := m.OpenDocument("doc")
	if errors.Is(err, runtime.ErrNoDocument) {
		require.Empty(t, infos)
		_, err := os.Stat(filepath.Join(fx.dir, "doc"))
		require.True(t, errors.Is(err, os.ErrNotExist), "no half document is left: %v", err)
		return -1
	}
	require.NoError(t, err)
	require.Len(t, infos, 1)
	in, err := m.DocumentInfo("doc")
	require.NoError(t, err)
	require.Equal(t, d.Info, in)
	pagesPath(t, fx.dir, "doc") // exactly one page file
	for i, v := range fx.v {
		if d.TextSHA256 == tokensHash(v) {
			require.Equal(t, v, d.TokenIDs(), "metadata and pages are of one version")
			return i
		}
	}
	t.Fatalf("document %s is neither version", d.TextSHA256)
	return -2
}

// The test binary re-executed: ingests the tokens in KVRECALL_TOKENS as
// "doc" and kills itself with SIGKILL when atomicfile reaches the step in
// KVRECALL_KILL_AT ("pages:written", "meta:renamed", ...).
func TestHelperStore(t *testing.T) {
	if os.Getenv("KVRECALL_HELPER") != "store" {
		return
	}
	var toks []int32
	b, err := os.ReadFile(os.Getenv("KVRECALL_TOKENS"))
	if err == nil {
		err = json.Unmarshal(b, &toks)
	}
	if err != nil {
		t.Fatal(err)
	}
	if at := os.Getenv("KVRECALL_KILL_AT"); at != "" {
		atomicfile.Fault = func(path, step string) error {
			file := "meta"
			if strings.HasPrefix(filepath.Base(path), "pages") {
				file = "pages"
			}
			if file+":"+step == at {
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
				time.Sleep(time.Hour) // until the signal lands (a blocked select could read as a deadlock)
			}
			return nil
		}
	}
	m, err := runtime.Open(context.Background(), os.Getenv("KVRECALL_MODEL"), runtime.Options{Threads: 2, ContextLength: storeDocLen + 64, DataDir: os.Getenv("KVRECALL_DATA")})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	if _, err := m.IngestTokens(context.Background(), "doc", toks, nil); err != nil {
		t.Fatal(err)
	}
	fmt.Println("done")
}

// ingestInChild ingests version v in a new process, killed at the step
// killAt or after killAfter (when > 0); it returns whether the process was
// killed and how long the ingest ran.
func (fx *storeFixture) ingestInChild(t *testing.T, v int, killAt string, killAfter time.Duration) (killed bool, took time.Duration) {
	t.Helper()
	tokFile := filepath.Join(t.TempDir(), "tokens.json")
	b, _ := json.Marshal(fx.v[v])
	require.NoError(t, os.WriteFile(tokFile, b, 0o600))
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperStore$")
	cmd.Env = append(os.Environ(), "KVRECALL_HELPER=store", "KVRECALL_MODEL="+fx.path, "KVRECALL_DATA="+fx.dir,
		"KVRECALL_TOKENS="+tokFile, "KVRECALL_KILL_AT="+killAt)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	sc := bufio.NewScanner(out)
	for sc.Scan() && sc.Text() != "ready" {
	}
	start := time.Now()
	if killAfter > 0 {
		time.AfterFunc(killAfter, func() { cmd.Process.Kill() })
	}
	for sc.Scan() {
	}
	err = cmd.Wait()
	took = time.Since(start)
	if err == nil {
		return false, took
	}
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	require.True(t, ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL, "helper failed: %v\n%s", err, stderr.String())
	return true, took
}

// kill -9 at the steps of an ingest and of a replacement, and at random
// times, each followed by a restart: the document is the old version or
// the new one, whole, never neither and never a mix; the restart answers
// without error and has swept what the kill left.
func TestKillDuringIngestAndReplace(t *testing.T) {
	fx := newStoreFixture(t)
	fx.m.Close()
	// A clean ingest in a child times the window for random kills.
	killed, took := fx.ingestInChild(t, 0, "", 0)
	require.False(t, killed)
	m := fx.open(t, runtime.Options{})
	require.Equal(t, 0, fx.version(t, m))
	m.Close()

	r := rand.New(rand.NewPCG(17, 0))
	random := func() time.Duration { return time.Duration(r.Int64N(int64(took) + 1)) }
	cases := []struct {
		name      string
		replace   bool
		killAt    string
		killAfter time.Duration
		want      int // -2: either
	}{
		{"ingest, pages written", false, "pages:written", 0, -1},
		{"ingest, pages renamed", false, "pages:renamed", 0, -1},
		{"ingest, metadata written", false, "meta:written", 0, -1},
		{"ingest, metadata renamed", false, "meta:renamed", 0, 1},
		{"replace, pages written", true, "pages:written", 0, 0},
		{"replace, pages renamed", true, "pages:renamed", 0, 0},
		{"replace, metadata written", true, "meta:written", 0, 0},
		{"replace, metadata renamed", true, "meta:renamed", 0, 1},
		{"replace, random time 1", true, "", random(), -2},
		{"replace, random time 2", true, "", random(), -2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// Set the stage in a process of its own, then hand the folder over.
			m := fx.open(t, runtime.Options{})
			if c.replace {
				_, err := m.IngestTokens(context.Background(), "doc", fx.v[0], nil)
				require.NoError(t, err)
			} else if err := m.DeleteDocument("doc"); err != nil {
				require.ErrorIs(t, err, runtime.ErrNoDocument)
			}
			m.Close()
			killed, _ := fx.ingestInChild(t, 1, c.killAt, c.killAfter)
			if c.killAt != "" {
				require.True(t, killed, "the kill point was reached")
			}
			m = fx.open(t, runtime.Options{})
			got := fx.version(t, m)
			switch {
			case c.want != -2:
				require.Equal(t, c.want, got)
			case c.replace:
				require.Contains(t, []int{0, 1}, got)
			}
			if killed || got != 1 {
				t.Logf("killed=%v, version after restart: %d", killed, got)
			}
			// The store works on: a replacement after the restart succeeds.
			_, err := m.IngestTokens(context.Background(), "doc", fx.v[1-max(got, 0)], nil)
			require.NoError(t, err)
			require.Equal(t, 1-max(got, 0), fx.version(t, m))
			m.Close()
		})
	}
}

// A replacement that cannot be written (a full disk, injected through
// atomicfile's seam) fails whole: the old version stays served from memory,
// described by the API, listed, and is what a restart finds; nothing is
// left behind. A failed directory sync after the metadata's rename leaves
// the new version visible, so it is taken as the new version everywhere.
func TestReplaceOnFullDisk(t *testing.T) {
	enospc := &os.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}
	cases := []struct {
		file, step string
		want       int
	}{
		{"pages", "written", 0},
		{"meta", "written", 0},
		{"meta", "renamed", 1},
	}
	fx := newStoreFixture(t)
	t.Run("first ingest", func(t *testing.T) {
		m := fx.open(t, runtime.Options{})
		atomicfile.Fault = func(string, string) error { return enospc }
		_, err := m.IngestTokens(context.Background(), "doc", fx.v[0], nil)
		atomicfile.Fault = nil
		require.ErrorIs(t, err, syscall.ENOSPC)
		require.Equal(t, -1, fx.version(t, m), "nothing is left, not even a folder")
		m.Close()
	})
	for _, c := range cases {
		t.Run(c.file+" "+c.step, func(t *testing.T) {
			m := fx.open(t, runtime.Options{})
			old, err := m.IngestTokens(context.Background(), "doc", fx.v[0], nil)
			require.NoError(t, err)
			atomicfile.Fault = func(path, step string) error {
				isPages := strings.HasPrefix(filepath.Base(path), "pages")
				if step == c.step && isPages == (c.file == "pages") {
					return enospc
				}
				return nil
			}
			_, err = m.IngestTokens(context.Background(), "doc", fx.v[1], nil)
			atomicfile.Fault = nil
			if c.want == 0 {
				require.ErrorIs(t, err, syscall.ENOSPC)
				d, err := m.OpenDocument("doc")
				require.NoError(t, err)
				require.Same(t, old, d, "the old version is still the one in memory")
			} else {
				require.NoError(t, err)
			}
			require.Equal(t, c.want, fx.version(t, m))
			m.Close()
			m = fx.open(t, runtime.Options{})
			require.Equal(t, c.want, fx.version(t, m), "after a restart")
			require.NoError(t, m.DeleteDocument("doc"))
			m.Close()
		})
	}
}

// The same on a real full file system: a tmpfs with room for one version
// only (needs root and mount; the seam above covers the rest).
func TestReplaceOnFullTmpfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root; TestReplaceOnFullDisk injects the same fault")
	}
	fx := newStoreFixture(t)
	m := fx.open(t, runtime.Options{})
	_, err := m.IngestTokens(context.Background(), "doc", fx.v[0], nil)
	require.NoError(t, err)
	st, err := os.Stat(pagesPath(t, fx.dir, "doc"))
	require.NoError(t, err)
	m.Close()
	mnt := t.TempDir()
	size := st.Size() + 64<<10 // one page file and the metadata, not two page files
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v %s (TestReplaceOnFullDisk injects the same fault)", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	require.NoError(t, exec.Command("cp", "-a", filepath.Join(fx.dir, "doc"), mnt).Run())
	fx.dir = mnt
	m = fx.open(t, runtime.Options{})
	old, err := m.OpenDocument("doc")
	require.NoError(t, err)
	_, err = m.IngestTokens(context.Background(), "doc", fx.v[1], nil)
	require.ErrorIs(t, err, syscall.ENOSPC)
	d, err := m.OpenDocument("doc")
	require.NoError(t, err)
	require.Same(t, old, d)
	require.Equal(t, 0, fx.version(t, m))
	m.Close()
	m = fx.open(t, runtime.Options{})
	require.Equal(t, 0, fx.version(t, m), "after a restart")
}

// Crash leftovers are swept on first use and on delete; a document folder
// without metadata can be deleted.
func TestOrphansAreReclaimed(t *testing.T) {
	fx := newStoreFixture(t)
	ctx := context.Background()
	_, err := fx.m.IngestTokens(ctx, "doc", fx.v[0], nil)
	require.NoError(t, err)
	_, err = fx.m.IngestTokens(ctx, "orphan", fx.v[1], nil)
	require.NoError(t, err)
	fx.m.Close()
	live := pagesPath(t, fx.dir, "doc")
	write := func(p string) { require.NoError(t, os.WriteFile(p, []byte("leftover"), 0o600)) }
	// What kills leave: temporary files, a replacement's unnamed pages, a
	// document whose metadata never came (or whose delete was cut short).
	write(filepath.Join(fx.dir, "doc", ".pages-0123456789abcdef.kvp.tmp-123"))
	write(filepath.Join(fx.dir, "doc", ".doc.json.tmp-456"))
	write(filepath.Join(fx.dir, "doc", "pages-0123456789abcdef.kvp"))
	write(filepath.Join(fx.dir, "doc", "pages-0123456789abcdef.kvs")) // its clusters
	write(filepath.Join(fx.dir, "orphan", "pages-0123456789abcdef.kvs"))
	write(filepath.Join(fx.dir, "orphan", "probe-b128-r4-w256.kvr"))
	write(filepath.Join(fx.dir, "doc", "probe-b128-r4-w256.kvr")) // a live document's cache: kept
	require.NoError(t, os.Remove(filepath.Join(fx.dir, "orphan", "doc.json")))
	require.NoError(t, os.Mkdir(filepath.Join(fx.dir, "empty"), 0o700))
	write(filepath.Join(fx.dir, "empty", ".pages-0000000000000000.kvp.tmp-9"))
	write(filepath.Join(fx.dir, "notes.txt")) // not ours: kept

	m := fx.open(t, runtime.Options{})
	require.Equal(t, 0, fx.version(t, m), "first use sweeps")
	require.Equal(t, live, pagesPath(t, fx.dir, "doc"))
	_, err = os.Stat(filepath.Join(fx.dir, "doc", "pages-0123456789abcdef.kvs"))
	require.True(t, errors.Is(err, os.ErrNotExist), "a crashed replacement's clusters: %v", err)
	_, err = os.Stat(filepath.Join(fx.dir, "doc", "probe-b128-r4-w256.kvr"))
	require.NoError(t, err)
	for _, gone := range []string{"orphan", "empty"} {
		_, err := os.Stat(filepath.Join(fx.dir, gone))
		require.True(t, errors.Is(err, os.ErrNotExist), "%s: %v", gone, err)
	}
	_, err = os.Stat(filepath.Join(fx.dir, "notes.txt"))
	require.NoError(t, err)

	// Orphaned pages that appear later are deletable, and delete sweeps.
	require.NoError(t, os.Mkdir(filepath.Join(fx.dir, "orphan"), 0o700))
	write(filepath.Join(fx.dir, "orphan", "pages.kvp"))
	write(filepath.Join(fx.dir, "doc", ".doc.json.tmp-789"))
	_, err = m.OpenDocument("orphan")
	require.ErrorIs(t, err, runtime.ErrNoDocument)
	require.NoError(t, m.DeleteDocument("orphan"))
	_, err = os.Stat(filepath.Join(fx.dir, "orphan"))
	require.True(t, errors.Is(err, os.ErrNotExist))
	require.Equal(t, 0, fx.version(t, m), "delete swept the other document's temporary file")
	require.ErrorIs(t, m.DeleteDocument("orphan"), runtime.ErrNoDocument)
	require.ErrorIs(t, m.DeleteDocument("never"), runtime.ErrNoDocument)
}

// Metadata is checked against its folder and its pages; files are private.
func TestDocumentChecks(t *testing.T) {
	fx := newStoreFixture(t)
	ctx := context.Background()
	_, err := fx.m.IngestTokens(ctx, "doc", fx.v[0], nil)
	require.NoError(t, err)
	fx.m.Close()
	st, err := os.Stat(filepath.Join(fx.dir, "doc"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), st.Mode().Perm())
	for _, p := range []string{filepath.Join(fx.dir, "doc", "doc.json"), pagesPath(t, fx.dir, "doc")} {
		st, err := os.Stat(p)
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), p)
	}
	require.NoError(t, exec.Command("cp", "-a", filepath.Join(fx.dir, "doc"), filepath.Join(fx.dir, "copy")).Run())
	pages := pagesPath(t, fx.dir, "doc")
	data, err := os.ReadFile(pages)
	require.NoError(t, err)
	cases := []struct {
		name   string
		id     string
		break_ func()
		want   string
	}{
		{"metadata of another id", "copy", func() {}, `names document "doc"`},
		{"pages missing", "doc", func() { os.Remove(pages) }, "page file is missing"},
		{"pages truncated", "doc", func() { os.WriteFile(pages, data[:len(data)-10], 0o600) }, "truncated"},
		{"pages of another length", "doc", func() {
			_, err := fx.open(t, runtime.Options{DataDir: fx.dir}).IngestTokens(ctx, "other", fx.v[0][:500], nil)
			require.NoError(t, err)
			other, _ := os.ReadFile(pagesPath(t, fx.dir, "other"))
			os.WriteFile(pages, other, 0o600)
		}, "do not match the metadata"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.break_()
			m := fx.open(t, runtime.Options{})
			_, err := m.DocumentInfo(c.id)
			require.ErrorIs(t, err, kvcache.ErrCorrupt)
			require.ErrorContains(t, err, c.want)
			_, err = m.OpenDocument(c.id)
			require.ErrorIs(t, err, kvcache.ErrCorrupt)
			require.ErrorContains(t, err, c.want)
			m.Close()
			require.NoError(t, os.WriteFile(pages, data, 0o600))
		})
	}
}

// Opened documents are bounded by MaxDocumentBytes, least recently used
// first; one in use by a session is not evicted until the session closes;
// an evicted document reopens from disk.
func TestDocumentMemoryBound(t *testing.T) {
	fx := newStoreFixture(t)
	ctx := context.Background()
	other, err := fx.voc.NewCase(storeDocLen, []float64{0.7}, 8)
	require.NoError(t, err)
	for i, toks := range [][]int32{fx.v[0], fx.v[1], other.Tokens} {
		_, err := fx.m.IngestTokens(ctx, fmt.Sprint("d", i), toks, nil)
		require.NoError(t, err)
	}
	one := fx.m.LoadedDocuments()[0].HostBytes
	fx.m.Close()
	m := fx.open(t, runtime.Options{MaxDocumentBytes: 2*one + one/2})
	open := func(id string) *runtime.Document {
		d, err := m.OpenDocument(id)
		require.NoError(t, err)
		return d
	}
	loaded := func() (ids []string) {
		for _, in := range m.LoadedDocuments() {
			ids = append(ids, in.ID)
		}
		return ids
	}
	d0 := open("d0")
	open("d1")
	require.Equal(t, runtime.DocumentMemory{Documents: 2, Bytes: 2 * one, Limit: 2*one + one/2}, m.DocumentMemory())
	open("d2")
	require.Equal(t, []string{"d1", "d2"}, loaded(), "d0 was least recently used")
	open("d1")
	require.NotSame(t, d0, open("d0"), "d0 reloads from disk")
	require.Equal(t, []string{"d0", "d1"}, loaded(), "d2 was least recently used")
	require.Equal(t, uint64(2), m.DocumentMemory().Evictions)

	// d0 in use and least recently used: d1 goes instead.
	s, err := m.DocumentSession(open("d0"), runtime.PolicyOptions{Policy: "retro", Budget: 512})
	require.NoError(t, err)
	open("d1")
	open("d2")
	require.Equal(t, []string{"d0", "d2"}, loaded())
	// Both in use: a third one goes over the bound; closing d0's session
	// evicts d0, now least recently used.
	s2, err := m.DocumentSession(open("d2"), runtime.PolicyOptions{Policy: "retro", Budget: 512})
	require.NoError(t, err)
	open("d1")
	require.Equal(t, []string{"d0", "d1", "d2"}, loaded(), "pinned documents stay")
	require.Equal(t, 3*one, m.DocumentMemory().Bytes)
	s.Close()
	require.Equal(t, []string{"d1", "d2"}, loaded())
	s2.Close()
	require.Equal(t, int64(2*one), m.DocumentMemory().Bytes)

	// An evicted document still answers, and its answer is the needle.
	evicted := open("d0") // evicts d2
	open("d2")            // evicts d1
	open("d1")            // evicts d0
	require.NotContains(t, loaded(), "d0")
	n := fx.c.Needles[0]
	res, err := m.Ask(ctx, evicted, fx.question(t, n), runtime.AskOptions{
		PolicyOptions: runtime.PolicyOptions{Policy: "retro", Budget: 512}, GenerateOptions: runtime.GenerateOptions{MaxTokens: 3}})
	require.NoError(t, err)
	require.Equal(t, n.Values, res.Tokens)
}

// DeleteDocument racing OpenDocument's load from disk never leaves the
// deleted document in memory (run under -race by make test).
func TestDeleteRacesOpen(t *testing.T) {
	fx := newStoreFixture(t)
	_, err := fx.m.IngestTokens(context.Background(), "doc", fx.v[0], nil)
	require.NoError(t, err)
	backup := filepath.Join(t.TempDir(), "doc")
	require.NoError(t, exec.Command("cp", "-a", filepath.Join(fx.dir, "doc"), backup).Run())
	m := fx.m
	for i := 0; i < 40; i++ {
		require.NoError(t, m.DeleteDocument("doc"))
		require.NoError(t, exec.Command("cp", "-a", backup, fx.dir).Run())
		var wg sync.WaitGroup
		var openErr, delErr error
		wg.Add(2)
		go func() { defer wg.Done(); _, openErr = m.OpenDocument("doc") }()
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i%8) * 100 * time.Microsecond)
			delErr = m.DeleteDocument("doc")
		}()
		wg.Wait()
		require.NoError(t, delErr)
		if openErr != nil {
			require.ErrorIs(t, openErr, runtime.ErrNoDocument, "iteration %d", i)
		}
		require.Empty(t, m.LoadedDocuments(), "iteration %d: the deleted document came back", i)
		_, err := m.OpenDocument("doc")
		require.ErrorIs(t, err, runtime.ErrNoDocument, "iteration %d", i)
		require.NoError(t, exec.Command("cp", "-a", backup, fx.dir).Run())
	}
}

// A data folder has one owner at a time: a second model on it (another
// process, in production) does not sweep, since temporary files may be the
// owner's ingests in progress. Once the owner closes, the next one sweeps.
func TestOneOwnerSweeps(t *testing.T) {
	fx := newStoreFixture(t)
	ctx := context.Background()
	_, err := fx.m.IngestTokens(ctx, "doc", fx.v[0], nil)
	require.NoError(t, err)
	tmp := filepath.Join(fx.dir, "doc", ".pages-0123456789abcdef.kvp.tmp-1")
	require.NoError(t, os.WriteFile(tmp, []byte("in progress"), 0o600))
	second := fx.open(t, runtime.Options{})
	d, err := second.OpenDocument("doc")
	require.NoError(t, err)
	require.Equal(t, fx.v[0], d.TokenIDs(), "a second model serves the documents")
	require.NoError(t, os.Mkdir(filepath.Join(fx.dir, "junk"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(fx.dir, "junk", "pages.kvp"), nil, 0o600))
	require.NoError(t, second.DeleteDocument("junk"), "a delete, which sweeps when owning")
	_, err = os.Stat(tmp)
	require.NoError(t, err, "but does not sweep")
	second.Close()
	fx.m.Close()
	third := fx.open(t, runtime.Options{})
	require.Equal(t, 0, fx.version(t, third), "the next owner sweeps")
}

// Questions keep being answered while other documents push theirs out of
// memory (run under -race by make test): a document in use is never
// evicted under its session, and the bound holds once all are done.
func TestEvictionDuringAsk(t *testing.T) {
	fx := newStoreFixture(t)
	ctx := context.Background()
	for i, v := range fx.v {
		_, err := fx.m.IngestTokens(ctx, fmt.Sprint("d", i), v, nil)
		require.NoError(t, err)
	}
	one := fx.m.LoadedDocuments()[0].HostBytes
	fx.m.Close()
	m := fx.open(t, runtime.Options{MaxDocumentBytes: one})
	n := fx.c.Needles[0]
	q := fx.question(t, n)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; i < 3; i++ {
			d, err := m.OpenDocument("d0")
			if err == nil {
				var res *runtime.Result
				res, err = m.Ask(ctx, d, q, runtime.AskOptions{
					PolicyOptions: runtime.PolicyOptions{Policy: "retro", Budget: 512}, GenerateOptions: runtime.GenerateOptions{MaxTokens: 3}})
				if err == nil && !equal(res.Tokens, n.Values) {
					err = fmt.Errorf("answer %v, want %v", res.Tokens, n.Values)
				}
			}
			if err != nil {
				errs <- err
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < 12; i++ {
			if _, err := m.OpenDocument(fmt.Sprint("d", i%2)); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	mem := m.DocumentMemory()
	require.LessOrEqual(t, mem.Bytes, one)
	require.Positive(t, mem.Evictions)
}
