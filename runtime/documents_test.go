package runtime_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

type docFixture struct {
	m    *runtime.Model
	voc  *haystack.Vocab
	c    *haystack.Case
	path string
	dir  string
}

func newDocFixture(t *testing.T, dir string, length int, depths []float64) *docFixture {
	t.Helper()
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(length, depths, 99)
	require.NoError(t, err)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 2, ContextLength: length + 64, DataDir: dir})
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return &docFixture{m: m, voc: voc, c: c, path: path, dir: dir}
}

func (fx *docFixture) text(t *testing.T) string {
	s, err := fx.m.Tokenizer().Decode(fx.c.Tokens[1:])
	require.NoError(t, err)
	return s[1:]
}

func (fx *docFixture) question(t *testing.T, n haystack.Needle) string {
	s, err := fx.m.Tokenizer().Decode(fx.voc.Question(n))
	require.NoError(t, err)
	return s[1:]
}

// helperResult is what the helper process prints.
type helperResult struct {
	Tokens       []int32 `json:"tokens"`
	PromptTokens int     `json:"prompt_tokens"`
	CachedTokens int     `json:"cached_tokens"`
	Err          string  `json:"err"`
}

// TestHelperAsk is not a test: the persistence test runs it in a new process
// to answer from a document another process ingested.
func TestHelperAsk(t *testing.T) {
	if os.Getenv("KVRECALL_HELPER") != "ask" {
		return
	}
	out := helperResult{}
	defer func() {
		json.NewEncoder(os.Stdout).Encode(out)
	}()
	m, err := runtime.Open(context.Background(), os.Getenv("KVRECALL_MODEL"), runtime.Options{Threads: 2, ContextLength: 4096, DataDir: os.Getenv("KVRECALL_DATA")})
	if err != nil {
		out.Err = err.Error()
		return
	}
	defer m.Close()
	doc, err := m.OpenDocument(os.Getenv("KVRECALL_DOC"))
	if err != nil {
		out.Err = err.Error()
		return
	}
	res, err := m.Ask(context.Background(), doc, os.Getenv("KVRECALL_QUESTION"), runtime.AskOptions{
		PolicyOptions:   runtime.PolicyOptions{Policy: "retro", Budget: 1024},
		GenerateOptions: runtime.GenerateOptions{MaxTokens: 3},
	})
	if err != nil {
		out.Err = err.Error()
		return
	}
	out.Tokens, out.PromptTokens, out.CachedTokens = res.Tokens, res.PromptTokens, res.CachedTokens
}

func askInNewProcess(t *testing.T, fx *docFixture, id, question string) helperResult {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperAsk$")
	cmd.Env = append(os.Environ(), "KVRECALL_HELPER=ask", "KVRECALL_MODEL="+fx.path, "KVRECALL_DATA="+fx.dir,
		"KVRECALL_DOC="+id, "KVRECALL_QUESTION="+question)
	out, err := cmd.Output()
	require.NoError(t, err, "helper: %s", out)
	var res helperResult
	line := strings.TrimSpace(string(out))
	line = line[strings.Index(line, "{"):]
	line = line[:strings.Index(line, "}")+1]
	require.NoError(t, json.Unmarshal([]byte(line), &res), "%s", out)
	return res
}

// pagesPath is the one page file of document id under dir.
func pagesPath(t *testing.T, dir, id string) string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, id, "pages*.kvp"))
	require.NoError(t, err)
	require.Len(t, m, 1, "page files of %s", id)
	return m[0]
}

// A document ingested by one process is answered by another without
// prefilling it again, with the same answer; a corrupt or truncated page
// file is reported, never used.
func TestDocumentPersistsAcrossProcesses(t *testing.T) {
	dir := t.TempDir()
	fx := newDocFixture(t, dir, 3000, []float64{0.4})
	ctx := context.Background()
	var progress []int
	doc, err := fx.m.Ingest(ctx, "book", fx.text(t), func(done, total int) { progress = append(progress, done) })
	require.NoError(t, err)
	require.Equal(t, fx.c.Tokens, doc.TokenIDs(), "text ingest tokenizes to the haystack")
	require.Equal(t, len(fx.c.Tokens), progress[len(progress)-1])
	n := fx.c.Needles[0]
	q := fx.question(t, n)
	res, err := fx.m.Ask(ctx, doc, q, runtime.AskOptions{
		PolicyOptions: runtime.PolicyOptions{Policy: "retro", Budget: 1024}, GenerateOptions: runtime.GenerateOptions{MaxTokens: 3}})
	require.NoError(t, err)
	require.Equal(t, n.Values, res.Tokens)

	// Ingesting the same text again is free; listing shows it.
	again, err := fx.m.Ingest(ctx, "book", fx.text(t), func(int, int) { t.Fatal("re-ingest must not prefill") })
	require.NoError(t, err)
	require.Same(t, doc, again)
	infos, err := fx.m.Documents()
	require.NoError(t, err)
	require.Len(t, infos, 1)
	require.Equal(t, "book", infos[0].ID)
	require.Equal(t, len(fx.c.Tokens), infos[0].Tokens)

	other := askInNewProcess(t, fx, "book", q)
	require.Empty(t, other.Err)
	require.Equal(t, res.Tokens, other.Tokens, "the new process gives the same answer")
	require.Equal(t, len(fx.c.Tokens), other.CachedTokens)
	require.Equal(t, 4, other.PromptTokens, "only the question was evaluated")

	pages := pagesPath(t, dir, "book")
	data, err := os.ReadFile(pages)
	require.NoError(t, err)
	for _, c := range []struct {
		name string
		data []byte
		want string
	}{
		{"flipped byte", func() []byte { b := append([]byte(nil), data...); b[len(b)/2] ^= 0x10; return b }(), "checksum mismatch"},
		{"truncated", data[:len(data)-1000], "truncated"},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.NoError(t, os.WriteFile(pages, c.data, 0o644))
			r := askInNewProcess(t, fx, "book", q)
			require.Contains(t, r.Err, c.want)
			require.Contains(t, r.Err, kvcache.ErrCorrupt.Error())
			require.Nil(t, r.Tokens)
		})
	}
	require.NoError(t, os.WriteFile(pages, data, 0o644))
	require.Empty(t, askInNewProcess(t, fx, "book", q).Err, "the restored file is good again")

	require.NoError(t, fx.m.DeleteDocument("book"))
	_, err = fx.m.OpenDocument("book")
	require.True(t, errors.Is(err, runtime.ErrNoDocument))
	require.True(t, errors.Is(fx.m.DeleteDocument("book"), runtime.ErrNoDocument))
	_, err = fx.m.Ingest(ctx, "../escape", "x", nil)
	require.ErrorContains(t, err, "invalid document id")
}

// Many goroutines ask questions of one document at once (run under -race by
// make test); each gets its own needle.
func TestConcurrentAsk(t *testing.T) {
	fx := newDocFixture(t, t.TempDir(), 2048, []float64{0.1, 0.3, 0.5, 0.7, 0.9})
	ctx := context.Background()
	doc, err := fx.m.IngestTokens(ctx, "shared", fx.c.Tokens, nil)
	require.NoError(t, err)
	questions := make([]string, len(fx.c.Needles))
	for i, n := range fx.c.Needles {
		questions[i] = fx.question(t, n)
	}
	const goroutines = 4
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i, n := range fx.c.Needles {
				if (i+g)%2 == 1 {
					continue
				}
				policy := []string{"retro", "quest"}[(i+g)%4/2]
				res, err := fx.m.Ask(ctx, doc, questions[i], runtime.AskOptions{
					PolicyOptions: runtime.PolicyOptions{Policy: policy, Budget: 1024}, GenerateOptions: runtime.GenerateOptions{MaxTokens: 3}})
				if err != nil {
					errs <- err
					return
				}
				if !equal(res.Tokens, n.Values) {
					errs <- fmt.Errorf("goroutine %d, %s, needle %d: got %v want %v", g, policy, i, res.Tokens, n.Values)
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
